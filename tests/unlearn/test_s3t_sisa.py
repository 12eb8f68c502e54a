"""S3T and SISA: trained stage by stage, requests served exactly from checkpoints, purged.

The exactness checks train the served models again directly, on the data that survives the
requests, with the test's own partition, layer selection and stage sequence, and compare the
arrays bit for bit.
"""

import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_assets import make_tiny_checkpoint

from jaxunlearn.adapter import LoraSettings, attach_lora
from jaxunlearn.checkpoint import load_adapter
from jaxunlearn.cli import main
from jaxunlearn.data import load_examples, load_tokenizer, tokenize_examples
from jaxunlearn.errors import SettingsError, UserError
from jaxunlearn.eval import adapter_statistics, model_statistic
from jaxunlearn.models import ModelConfig, from_config, load, split_lora
from jaxunlearn.train import finetune
from jaxunlearn.unlearn import (
    EnsembleError,
    LineageError,
    Provenance,
    QueryEdit,
    Removal,
    RequestError,
    S3TSettings,
    SISASettings,
    Sources,
    StageRecipe,
    apply_request,
    group_filter,
    layer_groups,
    layer_index,
    open_ensemble,
    partition_examples,
    read_ensemble,
    train_ensemble,
)

TESTS = pathlib.Path(__file__).resolve().parent.parent
ADAPTER = ["--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj"]
SHARDS, SLICES = 2, 2


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A corpus, a tiny 2-layer checkpoint, an S3T ensemble (by the CLI) and a SISA one."""
    root = tmp_path_factory.mktemp("s3t")
    assert main(["make-data", "--people", "4", "--seed", "3", "--out", str(root / "corpus")]) == 0
    model_dir = make_tiny_checkpoint(root / "model")
    data = root / "corpus" / "train.jsonl"
    finetune_s3t(model_dir, data, root / "s3t")
    examples = load_examples(data)
    tokenizer = load_tokenizer(model_dir)
    tokenized = tokenize_examples(examples, tokenizer, max_length=192)
    settings = LoraSettings(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), dropout=0.0)
    model = attach_lora(load(model_dir), settings, key=jax.random.key(0))
    provenance = Provenance.of_training(
        base_model=model_dir,
        tokenizer=model_dir,
        data=data,
        examples=examples,
        train_config=None,
        tokenization={"max_length": 192, "truncate": False, "buckets": list(tokenized.buckets)},
    )
    recipe = read_ensemble(root / "s3t" / "ensemble").recipe
    train_ensemble(
        model,
        examples,
        tokenized,
        method="sisa",
        shards=SHARDS,
        slices=SLICES,
        out=root / "sisa" / "ensemble",
        provenance=provenance,
        ledger=root / "sisa" / "unlearn-ledger.jsonl",
        lora_settings=settings,
        recipe=StageRecipe.from_json(recipe),
        progress=False,
    )
    return {
        "root": root,
        "model": model_dir,
        "data": data,
        "examples": examples,
        "tokenized": tokenized,
        "ids": [example.id for example in examples],
    }


def finetune_s3t(model_dir, data, out):
    arguments = [
        "finetune", "--model", str(model_dir), "--data", str(data), "--out", str(out),
        "--method", "s3t", "--shards", str(SHARDS), "--slices", str(SLICES), "--budget", "2",
        "--epochs", "1", "--batch-size", "8", "--learning-rate", "1e-2", "--no-progress",
        *ADAPTER,
    ]  # fmt: skip
    assert main(arguments) == 0


def run_copy(trained, tmp_path, method):
    """A private copy of one trained run (ensemble + ledger).

    The copied ledger still names the shared run's root folder (the ledger records where each
    adapter was written), so a test that purges stale copies trains its own run instead.
    """
    shutil.copytree(trained["root"] / method, tmp_path / method)
    return {
        **trained,
        "dir": tmp_path,
        "ensemble": tmp_path / method / "ensemble",
        "ledger": os.fspath(tmp_path / method / "unlearn-ledger.jsonl"),
    }


def request(run, what, adapter, out, **options):
    return apply_request(
        what,
        adapter=adapter,
        out=run["dir"] / out,
        sources=Sources(base_model=run["model"], data=run["data"]),
        ledger=run["ledger"],
        progress=False,
        **options,
    )


def lora_arrays(folder, model):
    _, template, _ = split_lora(model)
    return load_adapter(folder, target=template)[0]


def assert_bitwise_equal(tree, reference):
    leaves, other = jax.tree.leaves(tree), jax.tree.leaves(reference)
    assert len(leaves) == len(other) > 0
    for leaf, expected in zip(leaves, other, strict=True):
        assert np.asarray(leaf).dtype == np.asarray(expected).dtype
        assert np.array_equal(np.asarray(leaf), np.asarray(expected))


def in_layers(layers):
    """The test's own selection: the path holds ("layers", i) for a chosen i."""

    def chosen(path, value):
        pairs = itertools.pairwise(path)
        return any(name == "layers" and index in layers for name, index in pairs)

    return nnx.All(nnx.LoRAParam, chosen)


def train_directly(run, recipe, *, shard, order_index, order, stages, removed, groups, edited=()):
    """The model of `order` of `shard` trained from the initialization for `stages` stages on
    the partition (redrawn here) less the removed examples."""
    model = attach_lora(
        load(run["model"]),
        LoraSettings(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), dropout=0.0),
        key=jax.random.key(0),  # finetune's --seed 0
    )
    examples = [e for e in run["examples"] if e.id not in removed]
    for example in edited:
        examples = [example if e.id == example.id else e for e in examples]
    data = tokenize_examples(examples, load_tokenizer(run["model"]), max_length=192)
    partition = partition_examples(run["ids"], SHARDS, SLICES, seed=recipe.train_config.seed)
    surviving = [[i for i in ids if i not in removed] for ids in partition[shard]]
    for stage in range(1, stages + 1):
        ids = [i for slice_number in order[:stage] for i in surviving[slice_number]]
        config = recipe.stage_config(len(ids), shard=shard, order=order_index, stage=stage)
        subset = data.subset(data.indices_of(ids))
        finetune(
            model, subset, config=config, trainable=in_layers(groups[stage - 1]), progress=False
        )
    return split_lora(model)[1]


def served_members(folder, run):
    opened = open_ensemble(folder, run["model"])
    return opened, {shard: lora for shard, _, lora in opened.served_members()}


def checkpoint_folders(root):
    """Every stage checkpoint on disk under `root`."""
    return {
        os.fspath(path)
        for path in pathlib.Path(root).rglob("*")
        if path.is_dir() and (path.name.startswith("stage-") or path.name == "init")
    }


def referenced(folder):
    opened = open_ensemble(folder, "unused")
    return {
        opened.checkpoint_path(stage): set(opened.ensemble.stage_ids(shard, model.order, number))
        for shard, models in enumerate(opened.ensemble.models)
        for model in models
        for number, stage in enumerate(model.stages)
    }


# Layer groups.


def test_layer_groups_are_top_down_blocks_chosen_by_index_not_by_name():
    assert layer_groups(range(6), 4) == ((5, 4), (3, 2), (1,), (0,))
    assert layer_groups([0, 1], 2) == ((1,), (0,))
    with pytest.raises(SettingsError, match="at least 3 adapted"):
        layer_groups([0, 1], 3)
    config = ModelConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=12, num_heads=1,
        num_kv_heads=1, head_dim=8,
    )  # fmt: skip
    model = attach_lora(
        from_config(config, key=jax.random.key(0)),
        LoraSettings(rank=1, alpha=1.0, targets=("q_proj",), dropout=0.0),
        key=jax.random.key(1),
    )
    selected = nnx.state(model, group_filter([1]))
    layers = {layer_index(path) for path, _ in nnx.to_flat_state(selected)}
    # A name match on "layers.1" would also take layers 10 and 11.
    assert layers == {1}
    assert layer_index(("transformer", "h", 10, "attn")) == 10
    assert layer_index(("lm_head",)) is None


def test_partition_is_disjoint_complete_and_seeded():
    ids = [f"e{i}" for i in range(23)]
    partition = partition_examples(ids, 3, 2, seed=5)
    flat = [i for slices in partition for ids_ in slices for i in ids_]
    assert sorted(flat) == sorted(ids)
    assert len(flat) == len(set(flat))
    assert {len(ids_) for slices in partition for ids_ in slices} <= {3, 4}
    assert partition == partition_examples(ids, 3, 2, seed=5)
    assert partition != partition_examples(ids, 3, 2, seed=6)
    with pytest.raises(SettingsError, match="at least 24 examples"):
        partition_examples(ids, 4, 6, seed=0)


def test_a_grouped_partition_keeps_each_group_in_one_slice():
    ids = [f"e{i}" for i in range(40)]
    people = [f"p{i % 9}" for i in range(40)]  # 9 people of 4 or 5 examples, interleaved
    partition = partition_examples(ids, 2, 2, seed=1, groups=people)
    flat = [i for slices in partition for ids_ in slices for i in ids_]
    assert sorted(flat) == sorted(ids)
    assert len(flat) == len(set(flat))
    where = {people[ids.index(i)]: set() for i in ids}
    for shard, slices in enumerate(partition):
        for position, ids_ in enumerate(slices):
            assert list(ids_) == sorted(ids_, key=ids.index)
            for i in ids_:
                where[people[ids.index(i)]].add((shard, position))
    assert all(len(places) == 1 for places in where.values())
    # Slices hold whole groups, as equal in groups as they can be: 9 people over 4 slices.
    counts = sorted(len({people[ids.index(i)] for i in ids_}) for s in partition for ids_ in s)
    assert counts == [2, 2, 2, 3]
    assert partition != partition_examples(ids, 2, 2, seed=1)
    with pytest.raises(SettingsError, match="at least 12 groups"):
        partition_examples(ids, 3, 4, seed=0, groups=people)
    with pytest.raises(ValueError, match="keys for 40 ids"):
        partition_examples(ids, 2, 2, seed=0, groups=people[:-1])


def test_finetune_group_by_refuses_a_field_the_examples_lack(trained, tmp_path, capsys):
    arguments = [
        "finetune", "--model", str(trained["model"]), "--data", str(trained["data"]),
        "--out", str(tmp_path / "run"), "--method", "s3t", "--shards", "2", "--slices", "2",
        "--group-by", "no_such_field", "--no-progress", *ADAPTER,
    ]  # fmt: skip
    assert main(arguments) == 2
    assert "no metadata field 'no_such_field'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "ensemble").exists()
    assert main(["finetune", "--model", "m", "--data", "d", "--out", "o", "--group-by", "x"]) == 2


# Exactness.


def test_s3t_serves_after_removals_exactly_what_direct_training_on_the_surviving_data_gives(
    trained, tmp_path
):
    run = run_copy(trained, tmp_path, "s3t")
    root = read_ensemble(run["ensemble"])
    recipe = StageRecipe.from_json(root.recipe)
    assert root.groups == ((1,), (0,))
    assert [m.order for m in root.models[0]] == [(0, 1), (1, 0)]
    first = root.partition[0][1][0]  # shard 0, slice 1
    second = root.partition[1][0][:2]  # shard 1, slice 0
    one = request(run, Removal([first]), run["ensemble"], "u1", method="s3t")
    two = request(
        run, Removal(second), run["dir"] / "u1", "u2", method="s3t",
        settings=S3TSettings(retrain=True),
    )  # fmt: skip
    assert one.applied
    assert two.applied
    assert not one.approximate
    assert one.figures["checkpoints_invalidated"] == 3
    assert one.figures["stages_retrained"] == 0
    # Shard 0: order (0, 1) keeps stage 1 (slice 0 only), order (1, 0) lost both stages.
    assert one.figures["served_stages"] == [1, 2]
    # Retraining redoes shard 1's lost stages (2 + 1) and completes shard 0's short models
    # (1 + 2), which the first request left without retraining.
    assert two.figures["stages_retrained"] == 6
    assert two.figures["served_stages"] == [2, 2]
    opened, members = served_members(run["dir"] / "u2", run)
    assert opened.ensemble.served() == (0, 0)
    removed = {first, *second}
    for shard, stages in ((0, 2), (1, 2)):
        model = opened.ensemble.models[shard][0]
        direct = train_directly(
            run, recipe, shard=shard, order_index=0, order=model.order, stages=stages,
            removed=removed, groups=root.groups,
        )  # fmt: skip
        assert_bitwise_equal(members[shard], direct)
    # The retrained stage 2 of shard 1's other order too.
    other = opened.ensemble.models[1][1]
    direct = train_directly(
        run, recipe, shard=1, order_index=1, order=other.order, stages=2, removed=removed,
        groups=root.groups,
    )  # fmt: skip
    assert_bitwise_equal(opened.load_stage(other.stages[2]), direct)


def test_sisa_retrains_the_shard_from_the_slice_before_and_equals_direct_training(
    trained, tmp_path
):
    run = run_copy(trained, tmp_path, "sisa")
    root = read_ensemble(run["ensemble"])
    assert root.budget == 1
    assert root.groups == ((0, 1), (0, 1))
    untouched_before = root.models[1][0].stages[-1].digest
    late, early = root.partition[0][1][0], root.partition[0][0][0]
    one = request(run, Removal([late]), run["ensemble"], "u1", method="sisa")
    assert one.figures["stages_retrained"] == 1
    assert one.figures["checkpoints_invalidated"] == 1
    two = request(run, Removal([early]), run["dir"] / "u1", "u2", method="sisa")
    assert two.figures["stages_retrained"] == 2
    assert two.figures["checkpoints_invalidated"] == 2
    opened, members = served_members(run["dir"] / "u2", run)
    direct = train_directly(
        run, StageRecipe.from_json(root.recipe), shard=0, order_index=0, order=(0, 1), stages=2,
        removed={late, early}, groups=root.groups,
    )  # fmt: skip
    assert_bitwise_equal(members[0], direct)
    assert opened.ensemble.models[1][0].stages[-1].digest == untouched_before
    # Without retraining, SISA falls back and says how much of the shard is served.
    three = request(
        run, Removal([root.partition[1][1][0]]), run["dir"] / "u2", "u3", method="sisa",
        settings=SISASettings(retrain=False),
    )  # fmt: skip
    assert three.figures["stages_retrained"] == 0
    assert three.figures["served_stages"] == [2, 1]
    assert "1 of 2" in three.message or "2, 1 of 2" in three.message


# Purge.


def test_no_checkpoint_that_saw_removed_examples_is_left_on_disk(trained, tmp_path):
    # Its own run: purging stale copies deletes the root manifest where the ledger says it is.
    finetune_s3t(trained["model"], trained["data"], tmp_path / "s3t")
    run = {
        **trained,
        "dir": tmp_path,
        "ensemble": tmp_path / "s3t" / "ensemble",
        "ledger": os.fspath(tmp_path / "s3t" / "unlearn-ledger.jsonl"),
    }
    root = read_ensemble(run["ensemble"])
    saw = referenced(run["ensemble"])
    assert checkpoint_folders(tmp_path) == set(saw)
    removed = [root.partition[0][0][0], root.partition[1][1][1]]
    one = request(run, Removal(removed[:1]), run["ensemble"], "u1", method="s3t")
    saw.update(referenced(run["dir"] / "u1"))
    two = request(
        run, Removal(removed[1:]), run["dir"] / "u1", "u2", method="s3t",
        settings=S3TSettings(retrain=True),
    )  # fmt: skip
    saw.update(referenced(run["dir"] / "u2"))
    on_disk = checkpoint_folders(tmp_path)
    for folder in on_disk:
        assert not saw[folder] & set(removed), folder
    # What is left is exactly what the newest ensemble names: nothing orphaned.
    assert on_disk == set(referenced(run["dir"] / "u2"))
    deleted = set(one.purged) | set(two.purged)
    assert deleted
    assert not deleted & on_disk
    ledger = [json.loads(line) for line in pathlib.Path(run["ledger"]).read_text().splitlines()]
    invalidated = {p for row in ledger if row.get("type") == "intent" for p in row["invalidated"]}
    assert invalidated == deleted
    # The earlier manifests are listed as stale, and deleted on request.
    assert [copy.kind for copy in two.stale] == ["manifest", "manifest", "data"]
    three = request(
        run, Removal([root.partition[0][1][1]]), run["dir"] / "u2", "u3", method="s3t",
        purge_stale=True,
    )  # fmt: skip
    assert not (run["ensemble"] / "ensemble.json").exists()
    assert [copy.kind for copy in three.stale] == ["data"]


def test_a_purge_interrupted_after_the_commit_is_finished_by_the_next_request(trained, tmp_path):
    run = run_copy(trained, tmp_path, "s3t")
    root = read_ensemble(run["ensemble"])
    victim = root.partition[0][0][0]
    arguments = [
        "unlearn", "--method", "s3t", "--model", str(run["model"]),
        "--adapter", str(run["ensemble"]), "--data", str(run["data"]),
        "--ledger", run["ledger"], "--out", str(tmp_path / "u1"), "--forget", victim,
    ]  # fmt: skip
    code = f"import sys; from jaxunlearn.cli import main; sys.exit(main({arguments!r}))"
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
        "JAXUNLEARN_TEST_KILL_AT": "committed",
        "HF_HOME": str(tmp_path / "hf"),
    }
    killed = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr
    lost = root.models[0][0].stages[1:]
    left = [run["ensemble"] / stage.path for stage in lost]
    assert all(folder.exists() for folder in left)  # committed, not yet purged
    again = request(run, Removal([root.partition[1][0][0]]), tmp_path / "u1", "u2", method="s3t")
    assert not any(folder.exists() for folder in left)
    assert {os.fspath(folder) for folder in left} <= set(again.purged)


# Serving and refusals.


def test_a_shard_without_models_is_left_out_and_said_so_and_an_empty_ensemble_refuses(
    trained, tmp_path
):
    run = run_copy(trained, tmp_path, "s3t")
    root = read_ensemble(run["ensemble"])
    both = [root.partition[0][0][0], root.partition[0][1][0]]
    one = request(run, Removal(both), run["ensemble"], "u1", method="s3t")
    assert one.figures["served_stages"] == [0, 2]
    assert one.figures["shards_served"] == 1
    assert any("Shard(s) 0 have no model left" in note for note in one.notes)
    opened = open_ensemble(tmp_path / "u1", run["model"])
    assert opened.serving_model().num_members == 1
    rest = [root.partition[1][0][0], root.partition[1][1][0]]
    request(run, Removal(rest), tmp_path / "u1", "u2", method="s3t")
    with pytest.raises(EnsembleError, match="No shard"):
        open_ensemble(tmp_path / "u2", run["model"]).serving_model()
    # A retraining request completes every model short of stages, not only those it touches.
    last = root.partition[1][0][1]
    again = request(
        run, Removal([last]), tmp_path / "u2", "u3", method="s3t",
        settings=S3TSettings(retrain=True),
    )  # fmt: skip
    assert again.figures["served_stages"] == [SLICES, SLICES]
    assert again.figures["stages_retrained"] == SHARDS * 2 * SLICES  # budget 2
    assert not any("no model left" in note for note in again.notes)
    opened, members = served_members(tmp_path / "u3", run)
    model = opened.ensemble.models[0][opened.ensemble.served()[0]]
    direct = train_directly(
        run, StageRecipe.from_json(root.recipe), shard=0, order_index=opened.ensemble.served()[0],
        order=model.order, stages=SLICES, removed={*both, *rest, last}, groups=root.groups,
    )  # fmt: skip
    assert_bitwise_equal(members[0], direct)


def test_repeats_wrong_methods_edits_and_tampering_are_handled(trained, tmp_path):
    run = run_copy(trained, tmp_path, "s3t")
    root = read_ensemble(run["ensemble"])
    victim = root.partition[1][1][0]
    first = request(run, Removal([victim]), run["ensemble"], "u1", method="s3t")
    repeat = request(run, Removal([victim]), run["ensemble"], "u9", method="s3t")
    assert first.applied
    assert not repeat.applied
    assert repeat.adapter == first.adapter
    assert not (tmp_path / "u9").exists()
    with pytest.raises(UserError, match="--method s3t"):
        request(run, Removal([root.partition[0][0][0]]), tmp_path / "u1", "x", method="llmeraser")
    with pytest.raises(UserError, match="is an S3T ensemble"):
        request(run, Removal([root.partition[0][0][0]]), tmp_path / "u1", "x", method="sisa")
    with pytest.raises(RequestError, match="retrain"):
        request(
            run, QueryEdit([(root.partition[0][0][0], "new?")]), tmp_path / "u1", "x", method="s3t"
        )
    with pytest.raises(SettingsError, match="prepare nothing"):
        request(
            run, Removal([root.partition[0][0][0]]), tmp_path / "u1", "x", method="s3t",
            preparation=tmp_path / "p",
        )  # fmt: skip
    manifest = tmp_path / "u1" / "ensemble.json"
    record = json.loads(manifest.read_text())
    record["models"][0][0]["stages"] = record["models"][0][0]["stages"][:1]
    manifest.write_text(json.dumps(record))
    with pytest.raises(LineageError, match="differs"):
        request(run, Removal([root.partition[0][0][0]]), tmp_path / "u1", "x", method="s3t")
    assert not (tmp_path / "x").exists()


def test_finetune_refuses_sharded_flags_that_do_not_fit(trained, tmp_path, capsys):
    base = [
        "finetune", "--model", str(trained["model"]), "--data", str(trained["data"]),
        "--out", str(tmp_path / "x"), "--no-progress",
    ]  # fmt: skip
    cases = [
        (["--shards", "2"], "need --method s3t"),
        (["--method", "sisa", "--shards", "2"], "needs --shards and --slices"),
        (["--method", "sisa", "--shards", "2", "--slices", "2", "--budget", "2"], "--budget"),
        (["--method", "s3t", "--shards", "2", "--slices", "2", "--steps", "3"], "--steps"),
        (["--method", "s3t", "--shards", "2", "--slices", "3", *ADAPTER], "at least 3 adapted"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "ensemble").exists()


def test_the_audit_scores_an_ensemble_as_it_serves(trained):
    """`adapter_statistics` (what `jaxunlearn audit` scores) takes an ensemble folder and
    scores the served combination, not one shard's model."""
    folder = trained["root"] / "s3t" / "ensemble"
    forget = trained["tokenized"].subset(np.arange(6))
    (statistic,) = adapter_statistics([folder], forget, base_model=trained["model"])
    served = open_ensemble(folder, trained["model"]).serving_model()
    assert statistic == pytest.approx(model_statistic(served, forget), rel=1e-6)
    opened, members = served_members(folder, trained)
    assert len(members) == SHARDS  # no request yet: every shard serves
    one_shard = opened.model
    nnx.update(one_shard, members[0])
    assert statistic != pytest.approx(model_statistic(one_shard, forget), rel=1e-6)
