"""Fine-tunes the tiny LoRA Llama on one device and on an fsdp × tensor mesh, and reports.

Run by `test_train.py` in a subprocess with 8 fake CPU devices; prints one JSON line.
"""

import json
import sys
import tempfile

import jax
import numpy as np
from flax import nnx
from multi_device import device_shares
from training_fixtures import FakeDataset, tiny_lora_model

from jaxunlearn import parallel
from jaxunlearn.train import TrainConfig, finetune

CONFIG = TrainConfig(
    learning_rate=1e-2,
    warmup_steps=1,
    num_steps=3,
    batch_size=8,
    grad_accumulation=2,
    eval_every=3,
    checkpoint_every=2,
    seed=3,
)


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def spec(array) -> list:
    return [list(a) if isinstance(a, tuple) else a for a in array.sharding.spec]


def main(fsdp: int, tensor: int) -> dict:
    train, held_out = FakeDataset(32, seed=1), FakeDataset(8, seed=2)
    single = tiny_lora_model(dropout=0.1)
    single_run = finetune(single, train, config=CONFIG, eval_data=held_out, progress=False)

    mesh = parallel.make_mesh(fsdp=fsdp, tensor=tensor)
    sharded = tiny_lora_model(dropout=0.1)
    with tempfile.TemporaryDirectory() as checkpoints:
        sharded_run = finetune(
            sharded,
            train,
            config=CONFIG,
            eval_data=held_out,
            checkpoint_dir=checkpoints,
            progress=False,
            mesh=mesh,
        )
        # The finished run resumed on the mesh: its last checkpoint read back into the
        # shardings, optimizer state included.
        resumed = tiny_lora_model(dropout=0.1)
        finetune(
            resumed,
            train,
            config=CONFIG,
            checkpoint_dir=checkpoints,
            resume=True,
            progress=False,
            mesh=mesh,
        )
    lora = nnx.state(sharded, nnx.LoRAParam)
    adam = sharded_run.opt_state[1][0]
    want = jax.tree.leaves(nnx.state(single, nnx.LoRAParam))
    layer = sharded.model.layers[0]
    return {
        "lora_relative_error": max(
            relative_error(g, w) for g, w in zip(jax.tree.leaves(lora), want, strict=True)
        ),
        "resumed_relative_error": max(
            relative_error(g, w)
            for g, w in zip(
                jax.tree.leaves(nnx.state(resumed, nnx.LoRAParam)),
                jax.tree.leaves(lora),
                strict=True,
            )
        ),
        "loss_error": max(
            abs(a - b)
            for a, b in zip(sharded_run.history.losses, single_run.history.losses, strict=True)
        ),
        "eval_loss_error": abs(
            sharded_run.history.eval_losses[-1] - single_run.history.eval_losses[-1]
        ),
        "specs": {
            "q_lora_a": spec(layer.self_attn.q_proj.lora_a.get_value()),
            "q_lora_b": spec(layer.self_attn.q_proj.lora_b.get_value()),
            "q_kernel": spec(layer.self_attn.q_proj.base.kernel.get_value()),
            "down_lora_a": spec(layer.mlp.down_proj.lora_a.get_value()),
        },
        # Adam's moments of q's A, and its step count (optax.chain: clipping, then AdamW).
        "adam_mu_q_lora_a": spec(
            adam.mu["model"]["layers"][0]["self_attn"]["q_proj"]["lora_a"].get_value()
        ),
        "adam_count": spec(adam.count),
        "opt_state_devices": sorted(
            {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(sharded_run.opt_state)}
        ),
        "base_share": device_shares(
            nnx.state(sharded, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))), mesh
        ),
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
