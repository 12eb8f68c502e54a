"""Memory of the fixed curvature sample: saved linearizations against products recomputed per batch.

For a model of SmolLM-135M's shape (Llama, width 576, 30 layers, tied 49,152-token embeddings;
random weights, LoRA on every projection) and a curvature sample of N examples in batches,
prints per N: the bytes every batch's saved linearization takes (`curvature.
linearization_bytes`, from abstract evaluation) and the compiled memory of one product of the
operator that recomputes each batch's product (arguments + temporaries + outputs, from
`memory_analysis()`), which LLMEraser uses when the linearizations exceed
`CurvatureSettings.linearization_budget_gib`.

    python experiments/curvature_sample_memory.py                    # N = 16, 32, 96, 128
    python experiments/curvature_sample_memory.py --samples 16 32 --length 128 --json

XLA:CPU's default scheduler reports the sum of all temporaries rather than a peak; this script
sets `--xla_cpu_enable_concurrency_optimized_scheduler=false` (as `jaxunlearn plan` does)
before JAX starts, so the figures are peaks.
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()

import jax
import numpy as np

from jaxunlearn import curvature
from jaxunlearn.batch import Batch
from jaxunlearn.models import add_lora, architecture_config, from_config

SMOLLM_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
GIB = 2**30


def random_batch(rng, rows: int, length: int, vocab: int) -> Batch:
    loss = np.zeros((rows, length), np.float32)
    loss[:, length // 2 :] = 1.0
    return Batch(
        input_ids=rng.integers(0, vocab, (rows, length)).astype(np.int32),
        attention_mask=np.ones((rows, length), np.int32),
        loss_mask=loss,
        example_mask=np.ones((rows,), bool),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 32, 96, 128])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--kind", choices=curvature.CURVATURE_KINDS, default="gauss_newton")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as directory:
        (pathlib.Path(directory) / "config.json").write_text(json.dumps(SMOLLM_135M))
        config = architecture_config(directory)
    model = from_config(config, key=jax.random.key(0))
    add_lora(
        model,
        rank=options.rank,
        alpha=options.rank,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        key=jax.random.key(1),
    )
    graphdef, lora, base = curvature.split_for_curvature(model)
    rng = np.random.default_rng(0)
    rows = []
    for size in options.samples:
        batches = [
            random_batch(rng, options.batch_size, options.length, config.vocab_size)
            for _ in range(-(-size // options.batch_size))
        ]
        saved = curvature.linearization_bytes(graphdef, lora, base, batches, kind=options.kind)
        operator = curvature.fixed_curvature(
            graphdef, lora, base, batches, kind=options.kind, linearize=False
        )
        compiled = jax.jit(lambda op, v: op(v)).lower(operator, lora).compile()
        memory = compiled.memory_analysis()
        recomputed = (
            memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
        )
        rows.append(
            {
                "sample": size,
                "batches": len(batches),
                "linearized_gib": saved / GIB,
                "recomputed_product_gib": recomputed / GIB,
            }
        )
        print(f"sample {size}: done", file=sys.stderr, flush=True)
    if options.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{options.kind}, batches of {options.batch_size} × {options.length} tokens, "
        f"LoRA r={options.rank} on every projection, float32"
    )
    print("| sample | batches | saved linearizations GiB | recomputed product GiB |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['sample']} | {row['batches']} | {row['linearized_gib']:.2f} | "
            f"{row['recomputed_product_gib']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
