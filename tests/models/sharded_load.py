"""Loads a sharded-index checkpoint whole and straight onto an fsdp × tensor mesh, and reports.

Run by `test_checkpoint_io.py` in a subprocess with 8 fake CPU devices; prints one JSON line.
"""

import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from multi_device import device_shares

from jaxunlearn import parallel
from jaxunlearn.models import GPT2Config, ModelConfig, from_config, load, save

CONFIGS = {
    # Stored [out, in] and transposed on reading.
    "llama": ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        attention_bias=True,
    ),
    # Conv1D projections, stored [in, out] as we keep them.
    "gpt2": GPT2Config(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=16
    ),
}


def main(fsdp: int, tensor: int) -> dict:
    mesh = parallel.make_mesh(fsdp=fsdp, tensor=tensor)
    report = {}
    for name, config in CONFIGS.items():
        with tempfile.TemporaryDirectory() as directory:
            # Several files and an index: tensors are read from the file the index names.
            save(from_config(config, key=jax.random.key(0)), directory, max_shard_bytes=8192)
            for dtype in (jnp.float32, jnp.bfloat16):
                whole = nnx.state(load(directory, dtype=dtype))
                sharded = nnx.state(load(directory, dtype=dtype, mesh=mesh))
                pairs = zip(jax.tree.leaves(sharded), jax.tree.leaves(whole), strict=True)
                report[f"{name}_{jnp.dtype(dtype).name}"] = {
                    "max_abs_difference": max(
                        float(np.max(np.abs(np.asarray(s, np.float64) - np.asarray(w, np.float64))))
                        for s, w in pairs
                    ),
                    "dtypes": sorted({str(leaf.dtype) for leaf in jax.tree.leaves(sharded)}),
                    "devices": sorted(
                        {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(sharded)}
                    ),
                    "share": device_shares(sharded, mesh),
                }
    return report


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
