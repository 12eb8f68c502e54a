"""Benchmark of the curvature kernels on a transformer-shaped toy with LoRA-shaped parameters.

Prints the median wall-clock time (after compilation) of a gradient, a Hessian-vector product,
one product of a reused linearization (`kernels.linearize_hvp`), a Gauss-Newton product, one
product of a reused Gauss-Newton linearization (`kernels.linearize_gnvp`) and a 10-step CG
solve, all measured in this one run, and their ratios to the gradient.

    python experiments/bench_kernels.py            # defaults: 4 layers, width 256, 8 x 128 tokens
    python experiments/bench_kernels.py --help
"""

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import kernels


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab: int = 2048
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp: int = 1024
    rank: int = 8
    batch: int = 8
    length: int = 128


def init_toy(config: ToyConfig, key: jax.Array):
    """Frozen base weights and LoRA adapters (A random, B non-zero) on q and v of each layer."""
    keys = iter(jax.random.split(key, 16 * config.layers + 4))

    def normal(shape, scale):
        return jax.random.normal(next(keys), shape, jnp.float32) * scale

    d, m = config.width, config.mlp
    base = {
        "embed": normal((config.vocab, d), 0.02),
        "layers": [
            {
                "q": normal((d, d), d**-0.5),
                "k": normal((d, d), d**-0.5),
                "v": normal((d, d), d**-0.5),
                "o": normal((d, d), d**-0.5),
                "up": normal((d, m), d**-0.5),
                "down": normal((m, d), m**-0.5),
            }
            for _ in range(config.layers)
        ],
    }
    lora = [
        {
            name: {"a": normal((d, config.rank), d**-0.5), "b": normal((config.rank, d), 0.01)}
            for name in ("q", "v")
        }
        for _ in range(config.layers)
    ]
    tokens = jax.random.randint(next(keys), (config.batch, config.length), 0, config.vocab)
    return base, lora, tokens


def rms_norm(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def logits_fn(config: ToyConfig):
    def logits(lora, base, tokens):
        x = base["embed"][tokens]
        batch, length, width = x.shape
        head_dim = width // config.heads
        causal = jnp.tril(jnp.ones((length, length), bool))
        for layer, adapter in zip(base["layers"], lora, strict=True):
            h = rms_norm(x)
            q = h @ layer["q"] + (h @ adapter["q"]["a"]) @ adapter["q"]["b"]
            k = h @ layer["k"]
            v = h @ layer["v"] + (h @ adapter["v"]["a"]) @ adapter["v"]["b"]
            q, k, v = (t.reshape(batch, length, config.heads, head_dim) for t in (q, k, v))
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim)
            weights = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
            attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
            x = x + attended @ layer["o"]
            x = x + jax.nn.gelu(rms_norm(x) @ layer["up"]) @ layer["down"]
        return rms_norm(x) @ base["embed"].T

    return logits


def next_token_loss(logits, tokens):
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))


def loss_of_logits(logits, base, tokens):
    """Gauss-Newton's `loss_fn(outputs, *args)`: it receives the model's arguments too."""
    del base
    return next_token_loss(logits, tokens)


def median_seconds(operations: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall-clock seconds of each operation, timed round-robin.

    Interleaving the operations (one call of each per round) exposes them all to the same
    background load, so their ratios stay fair on a busy machine.
    """
    for operation in operations.values():  # compile and warm up
        jax.block_until_ready(operation())
        jax.block_until_ready(operation())
    times = {name: [] for name in operations}
    for _ in range(repeats):
        for name, operation in operations.items():
            start = time.perf_counter()
            jax.block_until_ready(operation())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(ToyConfig):
        parser.add_argument(f"--{field.name}", type=int, default=field.default)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cg-steps", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    options = parser.parse_args()
    config = ToyConfig(**{f.name: getattr(options, f.name) for f in dataclasses.fields(ToyConfig)})

    base, lora, tokens = init_toy(config, jax.random.key(0))
    logits = logits_fn(config)

    def loss(adapter, frozen, batch):
        return next_token_loss(logits(adapter, frozen, batch), batch)

    direction = kernels.tree_random_normal_like(jax.random.key(1), lora)

    gradient = jax.jit(jax.grad(loss))
    hessian_product = jax.jit(lambda p, v, f, t: kernels.hvp(loss, p, v, f, t))
    gauss_newton_product = jax.jit(
        lambda p, v, f, t: kernels.gnvp(logits, loss_of_logits, p, v, f, t)
    )
    linearized = kernels.linearize_hvp(loss, lora, base, tokens)
    linearized_gauss_newton = kernels.linearize_gnvp(logits, loss_of_logits, lora, base, tokens)

    @jax.jit
    def cg_solve(p, b, f, t):
        operator = kernels.linearize_hvp(loss, p, f, t)
        return kernels.cg(operator, b, damping=1.0, tol=0.0, max_steps=options.cg_steps)

    cg_name = f"cg_{options.cg_steps}_steps"
    cg_status = cg_solve(lora, direction, base, tokens)
    seconds = median_seconds(
        {
            "grad": lambda: gradient(lora, base, tokens),
            "hvp": lambda: hessian_product(lora, direction, base, tokens),
            "linearized_product": lambda: linearized(direction),
            "gnvp": lambda: gauss_newton_product(lora, direction, base, tokens),
            "linearized_gnvp_product": lambda: linearized_gauss_newton(direction),
            cg_name: lambda: cg_solve(lora, direction, base, tokens),
        },
        options.repeats,
    )
    ratios = {f"{name}/grad": value / seconds["grad"] for name, value in seconds.items()}
    del ratios["grad/grad"]
    figures = {
        "config": dataclasses.asdict(config),
        "lora_parameters": int(sum(np.size(leaf) for leaf in jax.tree.leaves(lora))),
        "base_parameters": int(sum(np.size(leaf) for leaf in jax.tree.leaves(base))),
        "backend": jax.default_backend(),
        "devices": [str(device) for device in jax.devices()],
        "jax_version": jax.__version__,
        "median_seconds": seconds,
        "ratios": ratios,
        "cg_steps_taken": int(cg_status.steps),
    }
    if options.json:
        print(json.dumps(figures, indent=2))
        return
    print(
        f"toy transformer: {config.layers} layers, width {config.width}, "
        f"{figures['base_parameters']:,} frozen + {figures['lora_parameters']:,} LoRA parameters, "
        f"batch {config.batch} x {config.length} tokens, {figures['backend']} "
        f"(jax {jax.__version__})"
    )
    print(f"{'operation':<28}{'median ms':>12}{'/ grad':>10}")
    for name, value in seconds.items():
        print(f"{name:<28}{value * 1e3:>12.1f}{value / seconds['grad']:>10.2f}")


if __name__ == "__main__":
    main()
