"""One LLMEraser request applied on one device and on an fsdp × tensor mesh, and a report.

Run by `test_sharded_request.py` in a subprocess with 8 fake CPU devices; prints one JSON line.
The same request goes through `apply_request` twice, on copies of one fine-tune (each with its
own ledger): once on the default device, once with the base read block by block onto the mesh.
The mesh's LiSSA solve (mini-batches drawn on the devices) is compared at the method level,
where its outcome's shardings can be read.
"""

import contextlib
import dataclasses
import io
import json
import pathlib
import shutil
import sys
import tempfile

import jax
import numpy as np
from flax import nnx
from multi_device import device_shares
from tiny_assets import make_tiny_checkpoint

from jaxunlearn import parallel
from jaxunlearn.cli import main
from jaxunlearn.data import load_examples, load_tokenizer, tokenize_examples
from jaxunlearn.models import split_lora
from jaxunlearn.unlearn import (
    CurvatureSettings,
    EraserSettings,
    LLMEraser,
    Removal,
    Sources,
    UnlearningContext,
    apply_request,
    examples_digest,
    open_adapter,
    resolve_request,
)

# Influence mode (the short fine-tune is far from a minimum, where a Newton step overshoots),
# with a damping that keeps C + λI well conditioned: an ill-conditioned solve amplifies the
# rounding of a different summation order, which is not what this compares.
SETTINGS = EraserSettings(mode="influence", max_steps=12, curvature=CurvatureSettings(damping=0.05))


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def host(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def largest_error(got, want) -> float:
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    return max(relative_error(g, w) for g, w in pairs)


def spec(array) -> list:
    """The array's partition spec, trailing unsplit dimensions written out (JAX may drop them)."""
    entries = [list(a) if isinstance(a, tuple) else a for a in array.sharding.spec]
    return entries + [None] * (array.ndim - len(entries))


def finetune_arguments(root: pathlib.Path, out: pathlib.Path) -> list[str]:
    """The `jaxunlearn finetune` command line of the fine-tune every request here starts from
    (the corpus and model `fine_tune` makes under `root`), writing to `out`."""
    model, data = root / "model", root / "corpus" / "train.jsonl"
    return [
        "finetune", "--model", str(model), "--data", str(data), "--out", str(out),
        "--steps", "30", "--batch-size", "8", "--learning-rate", "1e-2", "--no-progress",
        "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj,down_proj",
        "--l2-regularization", "1e-3",
    ]  # fmt: skip


def fine_tune(root: pathlib.Path) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        corpus = ["make-data", "--people", "4", "--seed", "3", "--out", str(root / "corpus")]
        assert main(corpus) == 0
        model = make_tiny_checkpoint(root / "model")
        data = root / "corpus" / "train.jsonl"
        assert main(finetune_arguments(root, root / "run")) == 0
    return {"model": model, "data": data, "run": root / "run"}


def request_on(assets: dict, name: str, removal: Removal, placement: parallel.Placement):
    """Applies `removal` to a private copy of the fine-tune; returns (outcome, its LoRA)."""
    run = assets["run"].parent / f"run-{name}"
    shutil.copytree(assets["run"], run)
    outcome = apply_request(
        removal,
        adapter=run / "adapter",
        out=run / "unlearned",
        sources=Sources(base_model=assets["model"], data=assets["data"]),
        ledger=run / "unlearn-ledger.jsonl",
        settings=SETTINGS,
        placement=placement,
        log=lambda line: None,
    )
    opened = open_adapter(run / "unlearned", assets["model"])
    return outcome, split_lora(opened.model)[1]


def method_on(assets: dict, removal: Removal, placement: parallel.Placement, settings):
    """LLMEraser's outcome for `removal` at the fine-tune with `settings`, computed by the
    method directly (so that its arrays, and their shardings, can be read)."""
    opened = open_adapter(assets["run"] / "adapter", assets["model"], placement=placement)
    examples = load_examples(assets["data"])
    tokenizer = load_tokenizer(assets["model"])
    context = UnlearningContext(
        model=opened.model,
        examples=examples,
        data=tokenize_examples(examples, tokenizer, max_length=192),
        tokenizer=tokenizer,
        adapter_digest="adapter",
        data_digest=examples_digest(examples),
        train_config={"l2_regularization": 1e-3},
        placement=placement,
    )
    method = LLMEraser()
    settings, _ = method.settle(settings, context)
    resolved = resolve_request(removal, examples)
    prepared = method.prepare(context, settings)
    return method.apply(context, resolved, settings, prepared), prepared.value


def main_report(fsdp: int, tensor: int) -> dict:
    mesh = parallel.make_mesh(fsdp=fsdp, tensor=tensor)
    on_mesh = parallel.Placement(mesh)
    with tempfile.TemporaryDirectory() as directory:
        assets = fine_tune(pathlib.Path(directory))
        ids = [example.id for example in load_examples(assets["data"])]
        removal = Removal(ids[:3])
        single, single_lora = request_on(assets, "single", removal, parallel.ONE_DEVICE)
        sharded, sharded_lora = request_on(assets, "mesh", removal, on_mesh)
        lissa = dataclasses.replace(SETTINGS, solver="lissa", max_steps=20)
        lissa_single, _ = method_on(assets, removal, parallel.ONE_DEVICE, lissa)
        lissa_sharded, _ = method_on(assets, removal, on_mesh, lissa)
        # No linearization kept: every CG product recomputes each batch's, in a loop on the mesh.
        recompute = dataclasses.replace(
            SETTINGS,
            curvature=dataclasses.replace(SETTINGS.curvature, linearization_budget_gib=0.0),
        )
        recomputed, _ = method_on(assets, removal, on_mesh, recompute)
        saved, _ = method_on(assets, removal, on_mesh, SETTINGS)
        opened = open_adapter(assets["run"] / "adapter", assets["model"], placement=on_mesh)
    fine_tuned = host(split_lora(opened.model)[1])
    layer = lissa_sharded.lora["model"]["layers"][0]
    reference = opened.model.model.layers[0]
    figures = ("update_norm", "solver_steps", "damping", "held_objective_after")
    return {
        "applied": [single.applied, sharded.applied],
        "lora_relative_error": largest_error(sharded_lora, single_lora),
        "update_relative_error": largest_error(
            [a - b for a, b in zip(host(sharded_lora), fine_tuned, strict=True)],
            [a - b for a, b in zip(host(single_lora), fine_tuned, strict=True)],
        ),
        "figures": {name: [single.figures[name], sharded.figures[name]] for name in figures},
        "lissa_relative_error": largest_error(lissa_sharded.lora, lissa_single.lora),
        "recomputed_relative_error": largest_error(recomputed.lora, saved.lora),
        "recomputed_devices": sorted(
            {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(recomputed.lora)}
        ),
        "specs": {
            "q_lora_a": spec(layer["self_attn"]["q_proj"]["lora_a"].get_value()),
            "q_lora_b": spec(layer["self_attn"]["q_proj"]["lora_b"].get_value()),
            "down_lora_a": spec(layer["mlp"]["down_proj"]["lora_a"].get_value()),
        },
        "reference_specs": {
            "q_lora_a": spec(reference.self_attn.q_proj.lora_a.get_value()),
            "q_lora_b": spec(reference.self_attn.q_proj.lora_b.get_value()),
            "down_lora_a": spec(reference.mlp.down_proj.lora_a.get_value()),
        },
        "lora_devices": sorted(
            {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(lissa_sharded.lora)}
        ),
        "base_share": device_shares(
            nnx.state(opened.model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))), mesh
        ),
    }


if __name__ == "__main__":
    print(json.dumps(main_report(int(sys.argv[1]), int(sys.argv[2]))))
