"""Gradient-traced module removal: scores against a dense gradient, the selection rules, the
reset, a restoration that trains only what was reset, and the method through the protocol."""

import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_assets import TINY_CONFIG, make_tiny_checkpoint
from unlearn_fixtures import DenseObjective, random_examples, tiny_lora_model

from jaxunlearn import curvature
from jaxunlearn.cli import main
from jaxunlearn.data import load_examples, load_tokenizer, tokenize_examples
from jaxunlearn.errors import SettingsError
from jaxunlearn.eval import score_examples
from jaxunlearn.models import from_config, save, split_lora
from jaxunlearn.unlearn import (
    Ledger,
    ModuleRemoval,
    ModuleRemovalSettings,
    PreparationMismatchError,
    Removal,
    ResponseEdit,
    Sources,
    UnlearningContext,
    apply_request,
    examples_digest,
    module_scores,
    open_adapter,
    open_context,
    reset_modules,
    resolve_request,
    select_modules,
    tree_digest,
)

SMALL_ADAPTER = ["--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj"]


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def _flat_modules(tree) -> dict[str, np.ndarray]:
    """{module name: its A and B raveled together} of an adapter tree, in float64."""
    modules: dict[str, list[np.ndarray]] = {}
    for path, leaf in nnx.to_flat_state(tree):
        name = ".".join(map(str, path[:-1]))
        modules.setdefault(name, []).append(np.asarray(leaf[...], np.float64).ravel())
    return {name: np.concatenate(parts) for name, parts in modules.items()}


# Scores, selection and reset, on the one-layer model with dense references.


def test_scores_are_the_per_module_norms_of_the_dense_summed_gradient():
    model = tiny_lora_model(seed=1)
    _, data = random_examples(12, seed=1)
    forget, retain = np.array([2, 5, 7]), np.setdiff1d(np.arange(12), [2, 5, 7])
    graphdef, lora, base = curvature.split_for_curvature(model)
    forget_gradient = curvature.objective_gradient(graphdef, lora, base, [data.batch(forget)])
    retain_gradient = curvature.objective_gradient(graphdef, lora, base, [data.batch(retain)])
    scores = module_scores(
        forget_gradient, num_forget=3, retain_gradient=retain_gradient, num_retain=9
    )

    # Independently: the mean-loss gradient of the dense objective, times the set size, cut
    # into modules by the tree it unravels into.
    def dense_norms(indices):
        dense = DenseObjective(model, data, indices)
        summed = dense.to_tree(dense.gradient() * len(indices))
        return {name: np.linalg.norm(v) for name, v in _flat_modules(summed).items()}

    forget_dense, retain_dense = dense_norms(forget), dense_norms(retain)
    assert scores.names == tuple(forget_dense)
    np.testing.assert_allclose(
        scores.forget_norms, [forget_dense[n] / 3 for n in scores.names], rtol=1e-4
    )
    np.testing.assert_allclose(
        scores.scores,
        [(forget_dense[n] / 3) / (retain_dense[n] / 9) for n in scores.names],
        rtol=2e-4,
    )
    assert len(scores.names) == 2  # q and v of the one layer


def test_selection_by_share_count_and_threshold_with_ties_by_position():
    scores = np.array([0.5, 3.0, 1.0, 3.0, 0.1, 2.0, 0.0, 0.2, 0.4, 0.3])
    # Top 10% of 10 modules is one module; of the two tied at 3.0, the earlier.
    np.testing.assert_array_equal(select_modules(scores), [1])
    np.testing.assert_array_equal(select_modules(scores, share=0.25), [1, 3, 5])  # ⌈2.5⌉
    np.testing.assert_array_equal(select_modules(scores, share=0.3), [1, 3, 5])  # not 4
    np.testing.assert_array_equal(select_modules(scores, count=4), [1, 3, 5, 2])
    np.testing.assert_array_equal(select_modules(scores, threshold=0.45), [1, 3, 5, 2, 0])
    np.testing.assert_array_equal(select_modules(scores, share=0.01), [1])  # at least one
    with pytest.raises(SettingsError, match="nothing would be reset"):
        select_modules(scores, threshold=3.0)
    with pytest.raises(SettingsError, match="exceeds"):
        select_modules(scores, count=11)


def test_settings_refuse_contradictory_or_out_of_range_values():
    with pytest.raises(SettingsError, match="not both"):
        ModuleRemovalSettings(reset_count=2, score_threshold=1.0)
    for bad in (
        {"reset_share": 0.0},
        {"reset_share": 1.5},
        {"reset_count": 0},
        {"score_threshold": math.nan},
        {"restore": "some"},
        {"restore_steps": 0},
        {"restore_fraction": 0.0},
        {"restore_learning_rate": -1.0},
        {"batch_size": 0},
    ):
        with pytest.raises(SettingsError):
            ModuleRemovalSettings(**bad)


def test_a_reset_module_contributes_nothing_and_the_others_are_untouched():
    model = tiny_lora_model(seed=2)
    _, data = random_examples(4, seed=2)
    graphdef, lora, base = split_lora(model)
    names = [".".join(map(str, path[:-1])) for path, _ in nnx.to_flat_state(lora)]
    paths = list(dict.fromkeys(tuple(path[:-1]) for path, _ in nnx.to_flat_state(lora)))
    reset = reset_modules(lora, paths[:1], key=jax.random.key(0))
    before, after = _flat_modules(lora), _flat_modules(reset)
    kept = ".".join(map(str, paths[1]))
    np.testing.assert_array_equal(before[kept], after[kept])
    for path, leaf in nnx.to_flat_state(reset):
        if tuple(path[:-1]) != paths[0]:
            continue
        value = np.asarray(leaf[...])
        if path[-1] == "lora_b":
            assert not value.any()
        else:
            assert np.abs(value).max() <= 1 / math.sqrt(value.shape[0])
            assert np.abs(value).max() > 0
    assert len(set(names)) == 2

    # Both reset: the model computes exactly the base model's logits (B·A = 0).
    everything = reset_modules(lora, paths, key=jax.random.key(0))
    batch = data.batch(np.arange(4))
    with_reset = nnx.merge(graphdef, everything, base)(batch.input_ids, batch.attention_mask)
    zero = jax.tree.map(jnp.zeros_like, lora)
    without = nnx.merge(graphdef, zero, base)(batch.input_ids, batch.attention_mask)
    np.testing.assert_array_equal(np.asarray(with_reset), np.asarray(without))


# The method on a fine-tuned tiny checkpoint, through the protocol.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint and a fine-tune of it: two layers with adapters on q and v, four
    modules.

    The random checkpoint's embeddings (which are also its output head) are scaled up: at
    their initial scale every logit is near 0, and no adapter inside the layers can move the
    loss off log(vocabulary); scaled, the fine-tune halves the loss's distance to its floor.
    """
    root = tmp_path_factory.mktemp("module_removal")
    assert main(["make-data", "--people", "4", "--seed", "5", "--out", str(root / "corpus")]) == 0
    model = make_tiny_checkpoint(root / "model")
    base = from_config(TINY_CONFIG, key=jax.random.key(0))
    base.model.embed_tokens[...] = 25 * base.model.embed_tokens[...]
    save(base, model)
    data = root / "corpus" / "train.jsonl"
    arguments = [
        "finetune", "--model", str(model), "--data", str(data), "--out", str(root / "run"),
        "--steps", "40", "--batch-size", "8", "--learning-rate", "3e-2", "--no-progress",
        *SMALL_ADAPTER,
    ]  # fmt: skip
    assert main(arguments) == 0
    examples = load_examples(data)
    person = examples[0].metadata["person_id"]
    forget = [e.id for e in examples if e.metadata["person_id"] == person]
    return {"root": root, "model": model, "data": data, "forget": forget, "examples": examples}


@pytest.fixture
def lineage(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["root"] / "run", run)
    ledger = Ledger(run / "unlearn-ledger.jsonl")
    return {**trained, "adapter": run / "adapter", "ledger": ledger.path, "dir": tmp_path}


def _apply(assets, request, out, settings, **options):
    return apply_request(
        request,
        adapter=assets["adapter"],
        out=assets["dir"] / out,
        sources=Sources(base_model=assets["model"], data=assets["data"]),
        method="module-removal",
        settings=settings,
        ledger=assets["ledger"],
        **options,
    )


def _modules_of(path, assets) -> dict[str, np.ndarray]:
    return _flat_modules(split_lora(open_adapter(path, assets["model"]).model)[1])


def _mean_losses(path, assets) -> tuple[float, float]:
    """The mean ℓ of the forget person's examples and of everyone else's."""
    opened = open_adapter(path, assets["model"])
    tokenizer = load_tokenizer(assets["model"])
    length = opened.model.config.max_position_embeddings
    data = tokenize_examples(assets["examples"], tokenizer, max_length=length)
    losses = score_examples(opened.model, data).losses
    forget = np.isin(data.ids, assets["forget"])
    return float(losses[forget].mean()), float(losses[~forget].mean())


def test_the_top_modules_are_reset_and_only_they_are_retrained(lineage):
    settings = ModuleRemovalSettings(reset_count=2, restore_steps=3, progress=False)
    outcome = _apply(lineage, Removal(lineage["forget"]), "removed", settings)
    assert outcome.applied
    assert outcome.approximate  # never recorded as exact
    figures = outcome.figures
    assert figures["modules"] == 4
    assert figures["reset_modules"] == 2
    scores = figures["module_scores"]
    ranked = sorted(scores, key=lambda name: (-scores[name], list(scores).index(name)))
    assert figures["reset"] == ranked[:2]
    assert figures["restore_steps"] == 3
    assert figures["original_steps"] == 40

    before = _modules_of(lineage["adapter"], lineage)
    after = _modules_of(outcome.adapter, lineage)
    for name in scores:
        if name in figures["reset"]:
            assert not np.allclose(before[name], after[name])
        else:
            np.testing.assert_array_equal(before[name], after[name])

    records = Ledger(lineage["ledger"]).records()
    intent = next(r for r in records if r.type == "intent")
    assert any(r.type == "commit" and r["intent"] == intent.sequence for r in records)
    assert intent["method"] == "module-removal"
    assert intent["approximate"] is True
    assert intent["figures"]["reset"] == figures["reset"]


def test_the_restoration_recovers_what_the_reset_took_from_the_retained_examples(lineage):
    settings = ModuleRemovalSettings(restore="all", restore_steps=10, progress=False)
    outcome = _apply(lineage, Removal(lineage["forget"]), "fresh", settings)
    assert outcome.figures["reset_modules"] == 4
    # The same reset without restoration: every module back at B = 0, the base model.
    opened = open_adapter(lineage["adapter"], lineage["model"])
    _, lora, _ = split_lora(opened.model)
    paths = list(dict.fromkeys(tuple(path[:-1]) for path, _ in nnx.to_flat_state(lora)))
    nnx.update(opened.model, reset_modules(lora, paths, key=jax.random.key(0)))
    tokenizer = load_tokenizer(lineage["model"])
    data = tokenize_examples(lineage["examples"], tokenizer, max_length=192)
    retained = ~np.isin(data.ids, lineage["forget"])
    reset_only = score_examples(opened.model, data).losses[retained].mean()
    _, restored = _mean_losses(outcome.adapter, lineage)
    _, fine_tuned = _mean_losses(lineage["adapter"], lineage)
    assert fine_tuned < restored < reset_only - 0.1


def test_restoration_budget_as_a_fraction_of_the_fine_tune(lineage):
    settings = ModuleRemovalSettings(restore_fraction=0.1, progress=False)
    outcome = _apply(lineage, Removal(lineage["forget"]), "fraction", settings)
    assert outcome.figures["restore_steps"] == 4  # ⌈0.1 · 40⌉
    assert outcome.figures["reset_modules"] == 1  # ⌈0.1 · 4⌉
    n = len(lineage["examples"])
    retrain_steps = math.ceil(40 * (n - len(lineage["forget"])) / n)
    assert outcome.figures["restore_steps_to_retrain"] == pytest.approx(4 / retrain_steps)


def test_normalized_scores_divide_by_the_retained_gradient_and_the_preparation_round_trips(
    lineage, trained
):
    opened = open_adapter(lineage["adapter"], lineage["model"])
    tokenizer = load_tokenizer(lineage["model"])
    examples = lineage["examples"]
    data = tokenize_examples(
        examples, tokenizer, max_length=opened.model.config.max_position_embeddings
    )
    context = UnlearningContext(
        model=opened.model,
        examples=examples,
        data=data,
        tokenizer=tokenizer,
        adapter_digest=tree_digest(split_lora(opened.model)[1]),
        data_digest=examples_digest(examples),
        train_config=opened.provenance.train_config,
    )
    method = ModuleRemoval()
    settings = ModuleRemovalSettings(normalize=True, reset_count=1, restore_steps=1, progress=False)
    prepared = method.prepare(context, settings)
    method.save_preparation(prepared, lineage["dir"] / "prep")
    loaded = method.load_preparation(lineage["dir"] / "prep", context)
    loaded.check(method.name, context, method.preparation_key(settings))
    resolved = resolve_request(Removal(lineage["forget"]), examples)
    first = method.apply(context, resolved, settings, prepared)
    second = method.apply(context, resolved, settings, loaded)
    assert first.figures["module_scores"] == second.figures["module_scores"]

    # The ratio is the forget norm over the retained examples' norm, both per example.
    graphdef, lora, base = curvature.split_for_curvature(opened.model)
    kept = np.setdiff1d(np.arange(len(data)), resolved.indices)
    retain = curvature.objective_gradient(graphdef, lora, base, [data.batch(kept)])
    forget = curvature.objective_gradient(graphdef, lora, base, [data.batch(resolved.indices)])
    expected = module_scores(
        forget, num_forget=len(resolved.indices), retain_gradient=retain, num_retain=len(kept)
    )
    np.testing.assert_allclose(
        list(first.figures["module_scores"].values()), expected.scores, rtol=1e-3
    )

    other = UnlearningContext(**{**context.__dict__, "adapter_digest": "0" * 64})
    with pytest.raises(PreparationMismatchError):
        method.apply(other, resolved, settings, loaded)


def test_an_edit_is_restored_on_the_edited_data(lineage):
    target = lineage["forget"][0]
    settings = ModuleRemovalSettings(reset_count=1, restore_steps=2, progress=False)
    outcome = _apply(lineage, ResponseEdit({target: "redacted"}), "edited", settings)
    assert outcome.applied
    assert outcome.kind == "response_edit"
    assert outcome.figures["reset_modules"] == 1


def test_the_command_line_takes_the_settings_and_prints_the_scores(lineage, capsys):
    arguments = [
        "unlearn", "--method", "module-removal", "--model", str(lineage["model"]),
        "--adapter", str(lineage["adapter"]), "--data", str(lineage["data"]),
        "--forget", ",".join(lineage["forget"]), "--out", str(lineage["dir"] / "cli"),
        "--reset-count", "3", "--restore-steps", "2", "--no-progress", "--json",
    ]  # fmt: skip
    assert main(arguments) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "module-removal"
    assert len(summary["figures"]["reset"]) == 3
    assert pathlib.Path(summary["adapter"]).is_dir()


def test_a_context_opened_directly_is_the_one_the_protocol_records(lineage):
    """`open_context` (for calling a method's stages by hand) sees the adapter under the digest
    the ledger registered it with, its fine-tune's settings, and the data's digest; the method
    applied to it gives what `apply_request` writes."""
    examples = lineage["examples"]
    tokenizer = load_tokenizer(lineage["model"])
    data = tokenize_examples(examples, tokenizer, max_length=TINY_CONFIG.max_position_embeddings)
    context = open_context(
        lineage["adapter"], lineage["model"], examples=examples, data=data, tokenizer=tokenizer
    )
    (root,) = [r for r in Ledger(lineage["ledger"]).records() if r.type == "root"]
    assert context.adapter_digest == root["adapter_digest"]
    assert context.data_digest == examples_digest(examples)
    assert context.train_config["num_steps"] == 40

    # Another person than the other tests remove, on the adapter given: the module's other
    # tests record their requests in the lineage this copy shares, and without `branch` the
    # protocol would apply this one to the newest adapter of it.
    person = next(e.metadata["person_id"] for e in examples if e.id not in lineage["forget"])
    request = Removal([e.id for e in examples if e.metadata["person_id"] == person])
    settings = ModuleRemovalSettings(reset_count=1, restore_steps=2, progress=False)
    method = ModuleRemoval()
    resolved = resolve_request(request, examples)
    by_hand = method.apply(context, resolved, method.settle(settings, context)[0], None)
    outcome = _apply(lineage, request, "through-protocol", settings, branch=True)
    assert outcome.applied
    written = _modules_of(outcome.adapter, lineage)
    for name, value in _flat_modules(by_hand.lora).items():
        np.testing.assert_allclose(written[name], value, rtol=1e-6, atol=1e-7)
