"""The heavy operations timed on whatever accelerators are present, on one mesh over all of them.

For a model (a shipped architecture such as Llama-2-7B, a config.json, or by default a small
Llama that runs on a laptop CPU) with random weights and LoRA adapters, on `--mesh` (default:
every device on fsdp), prints:

- training: tokens/s of `jaxunlearn.train.finetune` itself over `--train-steps` steps (after
  compilation, from its own history);
- the curvature products against the gradient, each jitted as LLMEraser runs it and timed
  best-of-`--repeats` side by side in one run: the summed gradient, the Hessian-vector product
  and the Gauss-Newton product of one batch, and the ratios HVP/grad and GGN/grad;
- a request against retraining: LLMEraser's default request (the forget set's gradients, then
  `--cg-steps` CG steps, each one Gauss-Newton product per curvature-sample batch) counted in
  the time of these operations, and written as the number of training steps it costs, beside
  the training steps of a retrain of `--retrain-examples` examples for `--epochs` epochs.

The request figure is built from the measured times of its parts, not from a run of
`apply_request` (which would need a checkpoint on disk); the parts are the programs a request
runs, so it leaves out only file work and the solver's vector arithmetic.

    python experiments/bench_scale.py                          # the small CPU configuration
    python experiments/bench_scale.py --model Llama-2-7B --batch 4 --length 2048 --dtype bfloat16
    python experiments/bench_scale.py --model Llama-2-13B --mesh fsdp=4,tensor=2 --json
"""

import argparse
import dataclasses
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn import curvature, kernels, parallel
from jaxunlearn.batch import Batch
from jaxunlearn.data import TokenizedDataset
from jaxunlearn.models import ModelConfig, add_lora, architecture_config, from_config
from jaxunlearn.train import TrainConfig, finetune

# About 12M parameters, 4 layers: a few seconds per operation on two CPU cores.
SMALL = ModelConfig(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=688,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    head_dim=32,
)


@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int
    length: int
    rank: int
    targets: tuple[str, ...]
    dtype: str
    remat: bool


def build_model(config, workload: Workload, placement: parallel.Placement):
    """Random base weights (in `workload.dtype`) with float32 LoRA adapters whose B is random
    too (so that the gradient and the products are not of a zero adapter), on the mesh."""
    model = from_config(
        config, key=jax.random.key(0), dtype=jnp.dtype(workload.dtype), remat=workload.remat
    )
    add_lora(
        model,
        rank=workload.rank,
        alpha=float(workload.rank),
        targets=workload.targets,
        key=jax.random.key(1),
    )
    noise = kernels.tree_random_normal_like(jax.random.key(2), nnx.state(model, nnx.LoRAParam))
    nnx.update(model, jax.tree.map(lambda x: 0.01 * x, noise))
    return placement.model(model)


def random_data(rows: int, workload: Workload, vocab: int, seed: int) -> TokenizedDataset:
    """`rows` examples of exactly `workload.length` random tokens, the first quarter prompt."""
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(3, vocab, size=workload.length).astype(np.int32) for _ in range(rows)]
    return TokenizedDataset(
        [f"example-{i}" for i in range(rows)],
        tokens,
        [workload.length // 4] * rows,
        pad_id=0,
        buckets=(workload.length,),
        max_length=workload.length,
    )


def best_seconds(function, repeats: int) -> float:
    """The best wall time of `repeats` calls, after one call that compiles."""
    jax.block_until_ready(function())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="shipped name or config.json (default: a small Llama)")
    parser.add_argument("--mesh", default="auto")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-remat", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--cg-steps", type=int, default=7, help="LLMEraser's default CG budget")
    parser.add_argument("--sample", type=int, default=96, help="curvature-sample examples")
    parser.add_argument("--forget", type=int, default=32, help="examples a request removes")
    parser.add_argument("--retrain-examples", type=int, default=600)
    parser.add_argument("--epochs", type=float, default=24.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    config = SMALL if args.model is None else architecture_config(args.model)
    workload = Workload(
        batch=args.batch,
        length=args.length,
        rank=args.rank,
        targets=tuple(args.targets.split(",")),
        dtype=args.dtype,
        remat=not args.no_remat,
    )
    placement = parallel.Placement(parallel.mesh_from_spec(args.mesh))
    placement.check_batch_size(args.batch)
    model = build_model(config, workload, placement)
    vocab = config.vocab_size

    # Training: finetune's own steps, timed by its history (compilation excluded).
    train_data = random_data(args.batch * args.train_steps, workload, vocab, seed=0)
    train_config = TrainConfig(
        learning_rate=1e-4,
        warmup_steps=0,
        num_steps=args.train_steps,
        batch_size=args.batch,
        seed=0,
    )
    trained = finetune(
        model,
        train_data,
        config=train_config,
        progress=False,
        mesh=placement.mesh,
        rules=placement.rules,
    )
    history = trained.history
    train_step_seconds = (history.wall_seconds - history.compile_seconds) / args.train_steps

    # The curvature programs of one batch, jitted as LLMEraser runs them, side by side.
    graphdef, lora, base = curvature.split_for_curvature(trained.model)
    host_batch = random_data(args.batch, workload, vocab, seed=1).batch(np.arange(args.batch))
    batch: Batch = placement.batch(host_batch)
    hessian = curvature.batch_product(graphdef, "hessian")
    gauss_newton = curvature.batch_product(graphdef, "gauss_newton")
    gradient = jax.jit(jax.grad(curvature.objective(graphdef)))
    programs = {
        "gradient": lambda: gradient(lora, base, batch),
        "hessian_product": lambda: hessian(lora, base, batch, lora),
        "gauss_newton_product": lambda: gauss_newton(lora, base, batch, lora),
    }
    seconds = {}
    with parallel.activations_on(placement):
        for name, program in programs.items():
            seconds[name] = best_seconds(program, args.repeats)

    sample_batches = math.ceil(args.sample / args.batch)
    forget_batches = math.ceil(args.forget / args.batch)
    request_seconds = (
        forget_batches * seconds["gradient"]
        + args.cg_steps * sample_batches * seconds["gauss_newton_product"]
    )
    retrain_steps = math.ceil(args.epochs * args.retrain_examples / args.batch)
    tokens_per_step = args.batch * args.length
    report = {
        "model": args.model or "small Llama (12M)",
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "mesh": placement.describe(),
        "workload": dataclasses.asdict(workload),
        "train_tokens_per_second": tokens_per_step / train_step_seconds,
        "train_step_seconds": train_step_seconds,
        "seconds": seconds,
        "hvp_over_gradient": seconds["hessian_product"] / seconds["gradient"],
        "ggn_over_gradient": seconds["gauss_newton_product"] / seconds["gradient"],
        "request": {
            "forget_gradient_batches": forget_batches,
            "cg_steps": args.cg_steps,
            "sample_batches_per_product": sample_batches,
            "seconds": request_seconds,
            "in_train_steps": request_seconds / train_step_seconds,
        },
        "retrain": {
            "steps": retrain_steps,
            "seconds": retrain_steps * train_step_seconds,
        },
        "request_over_retrain": request_seconds / (retrain_steps * train_step_seconds),
    }
    print(json.dumps(report, indent=None if args.json else 2))
    if not args.json:
        print(
            f"| {report['model']} | {report['mesh']} | {report['train_tokens_per_second']:.0f} "
            f"| {report['hvp_over_gradient']:.2f} | {report['ggn_over_gradient']:.2f} "
            f"| {report['request']['in_train_steps']:.1f} of {retrain_steps} "
            f"| {report['request_over_retrain']:.3f} |",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
