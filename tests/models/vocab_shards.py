"""The objective over vocabulary chunks on a mesh that splits the vocabulary, and reports.

Run by `test_output_head.py` in a subprocess with 8 fake CPU devices (fsdp=4 × tensor=2, the
vocabulary split over tensor); prints one JSON line.
"""

import json
import re

import jax
import numpy as np
from output_head_cases import CHUNK, derivatives, tiny_batch, tiny_lora_model
from tiny_assets import TINY_CONFIG

from jaxunlearn import curvature, parallel


def largest_all_gather_rows(hlo: str, width: int) -> int:
    """The most rows of `width` columns that any all-gather of the program produces (its result
    shapes read from the compiled text): a gathered head would show the whole vocabulary."""
    rows = 0
    for line in hlo.splitlines():
        if "all-gather(" not in line and "all-gather-start(" not in line:
            continue
        result = line.split("=", 1)[1].split("all-gather", 1)[0]
        for dims in re.findall(r"\[([\d,]+)\]", result):
            shape = [int(d) for d in dims.split(",")]
            if shape[-1] == width:
                rows = max(rows, int(np.prod(shape[:-1])))
    return rows


def main() -> dict:
    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    placement = parallel.Placement(mesh)
    batch = tiny_batch(TINY_CONFIG.vocab_size, rows=4)
    report = {}
    reference = derivatives(tiny_lora_model(True, None), batch)
    for name, chunk in (("whole", None), ("chunked", CHUNK)):
        model = tiny_lora_model(True, chunk)
        parallel.shard_model(model, mesh)
        on_mesh = parallel.put(batch, placement.row_sharding(len(batch.input_ids)))
        with parallel.activations_on(placement):
            report[f"{name}_vocab_splits"] = parallel.vocab_splits(TINY_CONFIG.vocab_size)
            values = derivatives(model, on_mesh)
            graphdef, lora, base = curvature.split_for_curvature(model)
            hlo = (
                curvature._summed_gradient.lower(lora, base, on_mesh, graphdef=graphdef)
                .compile()
                .as_text()
            )
        report[f"{name}_max_difference"] = {
            key: max(
                float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
                / max(float(np.max(np.abs(np.asarray(want)))), 1e-30)
                for got, want in zip(
                    jax.tree.leaves(values[key]), jax.tree.leaves(reference[key]), strict=True
                )
            )
            for key in reference
        }
        report[f"{name}_gathered_head_rows"] = largest_all_gather_rows(hlo, TINY_CONFIG.hidden_size)
    report["vocab"] = TINY_CONFIG.vocab_size
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
