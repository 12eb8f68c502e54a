"""Forward-pass throughput of the jaxunlearn Llama against transformers' eager PyTorch Llama.

Both run the same ~20M-parameter random checkpoint on the same batch, side by side in one
process, and the script prints tokens/s for each and their ratio (JSON, then a Markdown row).

    python experiments/bench_model_forward.py --batch 8 --length 128 --repeats 5
"""

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from jaxunlearn.models import load

# About 20M parameters: 2 × 32000 × 256 embeddings/head plus 4 layers of 0.73M.
BENCH_CONFIG = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)


def best_seconds(runs, repeats):
    """Best wall time of each run; the runs alternate so both see the same machine load."""
    for run in runs:
        run()  # warm-up (and compilation for JAX)
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, run_times in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            run_times.append(time.perf_counter() - start)
    return [min(run_times) for run_times in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BENCH_CONFIG))
        reference.save_pretrained(directory)
        reference = transformers.LlamaForCausalLM.from_pretrained(
            directory, attn_implementation="eager"
        ).eval()
        model = load(directory)
    parameters = sum(p.numel() for p in reference.parameters())

    rng = np.random.default_rng(0)
    ids = rng.integers(0, BENCH_CONFIG["vocab_size"], (args.batch, args.length), dtype=np.int32)
    mask = np.ones_like(ids)
    torch_ids, torch_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

    forward = jax.jit(lambda m, i, a: m(i, a))
    jax_ids, jax_mask = jax.device_put(ids), jax.device_put(mask)
    jax_logits = np.asarray(forward(model, jax_ids, jax_mask))
    with torch.no_grad():
        torch_logits = reference(input_ids=torch_ids, attention_mask=torch_mask).logits.numpy()

    def run_jax():
        forward(model, jax_ids, jax_mask).block_until_ready()

    def run_torch():
        with torch.no_grad():
            reference(input_ids=torch_ids, attention_mask=torch_mask)

    tokens = args.batch * args.length
    jax_seconds, torch_seconds = best_seconds([run_jax, run_torch], args.repeats)
    result = {
        "parameters": parameters,
        "batch": args.batch,
        "length": args.length,
        "max_abs_logit_difference": float(np.max(np.abs(jax_logits - torch_logits))),
        "jax_tokens_per_s": tokens / jax_seconds,
        "torch_eager_tokens_per_s": tokens / torch_seconds,
        "jax_over_torch": torch_seconds / jax_seconds,
        "devices": str(jax.devices()),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    print(
        f"| {parameters / 1e6:.1f}M params, {args.batch}×{args.length} | "
        f"JAX {result['jax_tokens_per_s']:.0f} tok/s | "
        f"torch eager {result['torch_eager_tokens_per_s']:.0f} tok/s | "
        f"ratio {result['jax_over_torch']:.2f}× |"
    )


if __name__ == "__main__":
    main()
