"""The LoRA gradient tests' two sides: our LoRA's loss and gradients, a hand-written PyTorch LoRA
with the same next-token loss, and the comparison of their gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from model_references import positions_from_mask

from jaxunlearn.models import add_lora, join_lora, split_lora

# The LoRA both sides use: PyTorch's scales its update by ALPHA / RANK as ours does.
RANK = 4
ALPHA = 8.0


@functools.partial(jax.jit, static_argnums=1)
def perturbed(lora, scale):
    """`lora` plus `scale` times standard normal noise, in one compiled step."""
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def next_token_loss(logits, ids, mask, xp):
    """Mean next-token cross-entropy over pairs of real tokens, for jnp or torch."""
    if xp is torch:
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = torch.gather(log_probs, -1, ids[:, 1:, None])[..., 0]
    else:
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
    weights = mask[:, :-1] * mask[:, 1:]
    return -(picked * weights).sum() / weights.sum()


def lora_loss_and_gradients(model, targets, ids, mask):
    """Adds a LoRA to `targets` of `model` and returns it with `next_token_loss` on the batch and
    the loss's gradient with respect to it.

    B starts at zero, where the gradient with respect to A vanishes: it is perturbed.
    """
    add_lora(model, rank=RANK, alpha=ALPHA, targets=targets, key=jax.random.key(1))
    graphdef, lora, base = split_lora(model)
    lora = perturbed(lora, 0.05)

    def loss(lora):
        logits = join_lora(graphdef, lora, base)(ids, mask)
        return next_token_loss(logits, ids, jnp.asarray(mask, jnp.float32), jnp)

    value, grads = jax.jit(jax.value_and_grad(loss))(lora)
    return lora, value, grads


class TorchLoRA(torch.nn.Module):
    """A hand-written PyTorch LoRA around an nn.Linear or Conv1D, with A [in, r] and B [r, out]."""

    def __init__(self, base, lora_a, lora_b, scaling):
        super().__init__()
        self.base = base
        self.lora_a = torch.nn.Parameter(torch.tensor(np.asarray(lora_a)))
        self.lora_b = torch.nn.Parameter(torch.tensor(np.asarray(lora_b)))
        self.scaling = scaling

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a @ self.lora_b) * self.scaling


def torch_loss_and_gradients(reference, ids, mask):
    """`next_token_loss` of a PyTorch LM on a padded batch (positions counted as ours are) and
    its gradients, by parameter name, for the parameters that require them."""
    torch_ids = torch.tensor(ids, dtype=torch.long)
    logits = reference(
        input_ids=torch_ids,
        attention_mask=torch.tensor(mask, dtype=torch.long),
        position_ids=torch.tensor(positions_from_mask(mask), dtype=torch.long),
    ).logits
    loss = next_token_loss(logits, torch_ids, torch.tensor(mask, dtype=torch.float32), torch)
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in reference.named_parameters() if p.grad is not None}
    return loss.item(), grads


def assert_gradients_match(jax_grads, torch_grads):
    """The LoRA gradients (an nnx state) have the same names as PyTorch's and each is within
    1e-4 relative error of it; returns the worst error."""
    flat = {".".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(jax_grads)}
    assert set(torch_grads) == set(flat)
    worst = 0.0
    for key, gradient in flat.items():
        expected = torch_grads[key]
        error = np.linalg.norm(np.asarray(gradient) - expected) / np.linalg.norm(expected)
        worst = max(worst, error)
        assert error <= 1e-4, key
    return worst
