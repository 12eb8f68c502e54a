"""The exactly-once protocol, driven through a test-only method (`toy_method`).

Each test reproduces a way the protocol used to fail when tried as a hostile user would: a
request answered "already applied" on an adapter that still held the data, a removal applied
twice, a stale preparation, wrong artifacts accepted, edits computed from stale text, a
crash that left an unrecorded adapter, racing requests that forked, guessable ledger hashes.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import toy_method
from tiny_assets import make_tiny_checkpoint

from jaxunlearn.checkpoint import read_adapter_metadata, save_adapter
from jaxunlearn.cli import main
from jaxunlearn.data import load_examples, save_examples
from jaxunlearn.models import split_lora
from jaxunlearn.unlearn import (
    ArtifactMismatchError,
    ConflictingRequestError,
    Ledger,
    LedgerError,
    LineageError,
    NoEffectError,
    ObjectiveWorsenedError,
    PreparationMismatchError,
    Removal,
    ResponseEdit,
    Sources,
    WholeDatasetError,
    apply_request,
    id_hash,
    open_adapter,
)

TOY = toy_method.NAME
TESTS = pathlib.Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


# Smaller adapters than the default's rank 32 on every projection: the protocol does not
# depend on their size.
SMALL_ADAPTER = ["--rank", "8", "--alpha", "16", "--targets", "q_proj,v_proj"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A corpus, a tiny checkpoint and a fine-tune of it (a registered root adapter)."""
    root = tmp_path_factory.mktemp("protocol")
    assert main(["make-data", "--people", "4", "--seed", "3", "--out", str(root / "corpus")]) == 0
    model = make_tiny_checkpoint(root / "model")
    data = root / "corpus" / "train.jsonl"
    arguments = [
        "finetune", "--model", str(model), "--data", str(data), "--out", str(root / "run"),
        "--steps", "3", "--batch-size", "8", "--learning-rate", "1e-2", "--no-progress",
        *SMALL_ADAPTER,
    ]  # fmt: skip
    assert main(arguments) == 0
    ids = [example.id for example in load_examples(data)]
    return {
        "root": root,
        "model": model,
        "data": data,
        "adapter": root / "run" / "adapter",
        "ids": ids,
    }


@pytest.fixture
def lineage(trained, tmp_path):
    """A private copy of the fine-tune's output (adapter + ledger), so tests do not interact."""
    run = tmp_path / "run"
    shutil.copytree(trained["root"] / "run", run)
    # The copied adapter's provenance names the original ledger path: move the ledger with it.
    ledger = Ledger(run / "unlearn-ledger.jsonl")
    return {**trained, "adapter": run / "adapter", "ledger": ledger.path, "dir": tmp_path}


def sources(assets, **changes):
    return Sources(**{"base_model": assets["model"], "data": assets["data"], **changes})


def apply(assets, request, out, **options):
    return apply_request(
        request,
        adapter=options.pop("adapter", assets["adapter"]),
        out=assets["dir"] / out,
        sources=options.pop("sources", sources(assets)),
        method=options.pop("method", TOY),
        ledger=options.pop("ledger", assets["ledger"]),
        **options,
    )


def lora_of(path, assets) -> list[np.ndarray]:
    opened = open_adapter(path, assets["model"])
    return [np.asarray(leaf) for leaf in jax.tree.leaves(split_lora(opened.model)[1])]


def provenance_of(path) -> dict:
    return read_adapter_metadata(path)["provenance"]


def test_finetune_writes_provenance_and_registers_the_root(trained):
    provenance = provenance_of(trained["adapter"])
    assert provenance["example_ids"] == trained["ids"]
    assert provenance["train_config"]["l2_regularization"] == pytest.approx(1e-2)
    assert len(provenance["base_model"]["digest"]) == 64
    ledger = Ledger(trained["root"] / "run" / "unlearn-ledger.jsonl")
    assert provenance["ledger"]["id"] == ledger.id
    assert [record.type for record in ledger.records()] == ["root"]


def test_a_request_on_another_lineage_is_applied_and_a_repeat_is_a_no_op(lineage):
    forget_ab = Removal(lineage["ids"][:2])
    first = apply(lineage, forget_ab, "u1")
    assert first.applied
    # C applied to u0 goes to the head (u1): the removal of A,B is not undone.
    second = apply(lineage, Removal([lineage["ids"][2]]), "u2")
    assert second.applied
    assert second.parent == os.fspath(lineage["dir"] / "u1")
    assert any("successors" in note for note in second.notes)
    held = set(provenance_of(lineage["dir"] / "u2")["example_ids"])
    assert not held & set(lineage["ids"][:3])
    # "Remove A,B" on u2 is a no-op, and says where its result is.
    again = apply(lineage, forget_ab, "u3", adapter=lineage["dir"] / "u2")
    assert not again.applied
    assert again.adapter == os.fspath(lineage["dir"] / "u1")
    assert not (lineage["dir"] / "u3").exists()
    # A branch from u0 is another lineage: there, removing A,B is new and is applied.
    branch = apply(lineage, Removal([lineage["ids"][2]]), "b1", branch=True)
    assert branch.applied
    assert branch.parent == os.fspath(lineage["adapter"])
    on_branch = apply(lineage, forget_ab, "b2", adapter=lineage["dir"] / "b1")
    assert on_branch.applied
    assert not set(provenance_of(lineage["dir"] / "b2")["example_ids"]) & set(lineage["ids"][:3])


def test_the_same_removal_is_applied_once(lineage):
    forget = Removal(lineage["ids"][:1])
    first = apply(lineage, forget, "u1")
    for adapter, out in ((lineage["adapter"], "again-from-u0"), (lineage["dir"] / "u1", "again")):
        repeat = apply(lineage, forget, out, adapter=adapter)
        assert not repeat.applied
        assert repeat.record == first.record
        assert not (lineage["dir"] / out).exists()
    records = Ledger(lineage["ledger"]).records()
    assert [record.type for record in records] == ["root", "intent", "commit"]


def test_removed_ids_do_not_come_back_and_everything_left_cannot_be_removed(lineage):
    ids = lineage["ids"]
    apply(lineage, Removal(ids[:2]), "u1")
    kept = provenance_of(lineage["dir"] / "u1")["example_ids"]
    assert kept == ids[2:]
    with pytest.raises(ConflictingRequestError, match="already removed"):
        apply(lineage, Removal(ids[1:3]), "u2")
    with pytest.raises(WholeDatasetError):
        apply(lineage, Removal(ids[2:]), "u2")
    assert not (lineage["dir"] / "u2").exists()


def test_an_update_that_changes_nothing_is_refused(lineage):
    from toy_method import DescentSettings

    with pytest.raises(NoEffectError, match="changes the adapter"):
        apply(lineage, Removal(lineage["ids"][:1]), "u1", settings=DescentSettings(steps=0))
    with pytest.raises(ObjectiveWorsenedError, match="worse on a held sample"):
        apply(
            lineage,
            Removal(lineage["ids"][:1]),
            "u1",
            settings=DescentSettings(learning_rate=1e4),
        )
    assert not (lineage["dir"] / "u1").exists()
    assert [record.type for record in Ledger(lineage["ledger"]).records()] == ["root"]


def test_a_preparation_made_at_another_adapter_is_refused(lineage):
    preparation = lineage["dir"] / "preparation"
    apply(lineage, Removal(lineage["ids"][:1]), "u1", preparation=preparation)
    assert preparation.exists()
    with pytest.raises(PreparationMismatchError, match="made at adapter"):
        apply(
            lineage,
            Removal(lineage["ids"][1:2]),
            "u2",
            adapter=lineage["dir"] / "u1",
            preparation=preparation,
        )


@pytest.mark.parametrize("artifact", ["weights", "flipped_bytes", "tokenizer"])
def test_other_base_weights_or_tokenizer_are_refused(lineage, tmp_path, artifact):
    other = tmp_path / "other-model"
    shutil.copytree(lineage["model"], other)
    if artifact == "weights":
        make_tiny_checkpoint(tmp_path / "seed-1", seed=1)
        shutil.copy(tmp_path / "seed-1" / "model.safetensors", other / "model.safetensors")
    elif artifact == "flipped_bytes":
        weights = bytearray((other / "model.safetensors").read_bytes())
        for offset in range(len(weights) - 64, len(weights)):
            weights[offset] ^= 0xFF
        (other / "model.safetensors").write_bytes(bytes(weights))
    else:
        tokenizer = json.loads((other / "tokenizer.json").read_text())
        tokenizer["added_tokens"] = tokenizer["added_tokens"][:-1]
        (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    expected = "tokenizer" if artifact == "tokenizer" else "base model"
    with pytest.raises(ArtifactMismatchError, match=expected):
        apply(
            lineage, Removal(lineage["ids"][:1]), "u1", sources=sources(lineage, base_model=other)
        )
    # A user who knows why may skip the check.
    skip = "tokenizer" if artifact == "tokenizer" else "base_model"
    skipped = apply(
        lineage,
        Removal(lineage["ids"][:1]),
        "u1",
        sources=sources(lineage, base_model=other),
        skip_checks=[skip],
    )
    assert skipped.applied


def test_edited_data_text_is_refused_naming_the_example(lineage, tmp_path):
    examples = load_examples(lineage["data"])
    examples[3] = type(examples[3])(
        id=examples[3].id, prompt=examples[3].prompt, response=examples[3].response + " (edited)"
    )
    edited = tmp_path / "edited.jsonl"
    save_examples(examples, edited)
    with pytest.raises(ArtifactMismatchError, match=repr(examples[3].id)):
        apply(lineage, Removal(lineage["ids"][:1]), "u1", sources=sources(lineage, data=edited))


def test_a_tampered_alpha_is_refused(lineage):
    tampered = lineage["dir"] / "tampered"
    metadata = read_adapter_metadata(lineage["adapter"])
    metadata["lora"]["alpha"] *= 2
    opened = open_adapter(lineage["adapter"], lineage["model"])
    save_adapter(tampered, split_lora(opened.model)[1], metadata=metadata)
    with pytest.raises(LineageError, match="differs from every adapter"):
        apply(lineage, Removal(lineage["ids"][:1]), "u1", adapter=tampered)


def test_edits_chain_on_the_current_text(lineage, tmp_path):
    target = lineage["ids"][4]
    first = apply(lineage, ResponseEdit({target: " first correction"}), "u1")
    assert first.applied
    # The original file holds the text before the edit: refused, saying why.
    with pytest.raises(ArtifactMismatchError, match="edited by an earlier request"):
        apply(
            lineage,
            ResponseEdit({target: " second correction"}),
            "u2",
            adapter=lineage["dir"] / "u1",
        )
    updated = _with_response(lineage["data"], target, " first correction", tmp_path / "1.jsonl")
    second = apply(
        lineage,
        ResponseEdit({target: " second correction"}),
        "u2",
        adapter=lineage["dir"] / "u1",
        sources=sources(lineage, data=updated),
    )
    assert second.applied
    # Removing an edited example needs saying so.
    updated = _with_response(lineage["data"], target, " second correction", tmp_path / "2.jsonl")
    with pytest.raises(ConflictingRequestError, match="edited"):
        apply(lineage, Removal([target]), "u3", adapter=lineage["dir"] / "u2",
              sources=sources(lineage, data=updated))  # fmt: skip
    removed = apply(
        lineage,
        Removal([target]),
        "u3",
        adapter=lineage["dir"] / "u2",
        sources=sources(lineage, data=updated),
        allow_edited_removal=True,
    )
    assert target not in provenance_of(removed.adapter)["example_ids"]


def _with_response(data, example_id, response, path):
    examples = load_examples(data)
    index = [example.id for example in examples].index(example_id)
    examples[index] = dataclasses.replace(examples[index], response=response)
    save_examples(examples, path)
    return path


def test_the_ledger_and_adapter_hold_no_guessable_id_hashes(lineage):
    forget = lineage["ids"][:2]
    apply(lineage, Removal(forget), "u1")
    texts = [pathlib.Path(lineage["ledger"]).read_text()]
    texts.append(json.dumps(provenance_of(lineage["dir"] / "u1")))
    for forgotten in forget:
        guesses = {
            forgotten,
            id_hash(forgotten),
            hashlib.sha256(forgotten.encode()).hexdigest(),
        }
        for text in texts:
            assert not any(guess in text for guess in guesses)
    key = pathlib.Path(lineage["ledger"] + ".key")
    assert key.stat().st_mode & 0o077 == 0


def test_a_tampered_ledger_line_is_detected(lineage):
    apply(lineage, Removal(lineage["ids"][:1]), "u1")
    path = pathlib.Path(lineage["ledger"])
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"removal"', '"query_edit"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match="seal"):
        Ledger(path).records()


def test_stale_copies_are_listed_and_purged(trained, tmp_path):
    # A lineage of its own: purging deletes the files its ledger names, the fine-tune's too.
    arguments = [
        "finetune", "--model", str(trained["model"]), "--data", str(trained["data"]),
        "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "8", "--no-progress",
        *SMALL_ADAPTER,
    ]  # fmt: skip
    assert main(arguments) == 0
    lineage = {
        **trained,
        "adapter": tmp_path / "run" / "adapter",
        "ledger": os.fspath(tmp_path / "run" / "unlearn-ledger.jsonl"),
        "dir": tmp_path,
    }
    first = apply(lineage, Removal(lineage["ids"][:1]), "u1")
    kinds = {copy.kind for copy in first.stale}
    assert {"adapter", "checkpoints", "data"} <= kinds
    second = apply(
        lineage, Removal(lineage["ids"][1:2]), "u2", adapter=tmp_path / "u1", purge_stale=True
    )
    assert set(second.purged) == {
        os.fspath(tmp_path / "run" / "adapter"),
        os.fspath(tmp_path / "run" / "checkpoints"),
        os.fspath(tmp_path / "u1"),
    }
    assert not (tmp_path / "run" / "adapter").exists()
    assert not (tmp_path / "u1").exists()
    assert (tmp_path / "u2").exists()
    assert os.path.exists(lineage["data"])  # The user's own file is never deleted.


def _run_cli(lineage, out, *, kill_at=None, extra=()):
    """`jaxunlearn unlearn` with the toy method in a subprocess (killed at `kill_at`)."""
    arguments = [
        "unlearn", "--method", TOY, "--model", str(lineage["model"]),
        "--adapter", str(lineage["adapter"]), "--data", str(lineage["data"]),
        "--ledger", lineage["ledger"], "--out", str(lineage["dir"] / out), *extra,
    ]  # fmt: skip
    code = f"import sys, toy_method; from jaxunlearn.cli import main; sys.exit(main({arguments!r}))"
    environment = _subprocess_environment(lineage)
    if kill_at:
        environment["JAXUNLEARN_TEST_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300
    )


def _subprocess_environment(lineage):
    # JAX's persistent compilation cache, shared by the runs of one module: each subprocess
    # would otherwise compile the same small programs again.
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
        "JAX_COMPILATION_CACHE_DIR": str(lineage["root"] / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


@pytest.fixture(scope="module")
def uninterrupted(trained, tmp_path_factory):
    """The LoRA leaves of the first id's removal run without interruption on a fresh copy."""
    clean = {**trained, "dir": tmp_path_factory.mktemp("uninterrupted")}
    shutil.copytree(trained["root"] / "run", clean["dir"] / "run")
    clean["adapter"] = clean["dir"] / "run" / "adapter"
    clean["ledger"] = os.fspath(clean["dir"] / "run" / "unlearn-ledger.jsonl")
    apply(clean, Removal([trained["ids"][0]]), "u1")
    return lora_of(clean["dir"] / "u1", clean)


@pytest.mark.parametrize("kill_at", ["staged", "intent", "renamed", "committed"])
def test_a_kill_at_any_step_recovers_to_the_uninterrupted_state(lineage, kill_at, uninterrupted):
    forget = ["--forget", lineage["ids"][0]]
    killed = _run_cli(lineage, "u1", kill_at=kill_at, extra=forget)
    assert killed.returncode == -9, killed.stderr
    # The next request recovers; run in this process (the CLI and `apply_request` are one
    # implementation, test_cli_unlearn.py), it reuses this module's compiled programs.
    rerun = apply(lineage, Removal([lineage["ids"][0]]), "u1")
    assert rerun.adapter == os.fspath(lineage["dir"] / "u1")
    types = [record.type for record in Ledger(lineage["ledger"]).records()]
    assert types == ["root", "intent", "commit"]
    assert (lineage["dir"] / "u1").exists()
    assert not [p for p in lineage["dir"].iterdir() if ".staging-" in p.name]
    assert provenance_of(lineage["dir"] / "u1")["example_ids"] == lineage["ids"][1:]
    # The same adapter as a run that was never interrupted.
    recovered = lora_of(lineage["dir"] / "u1", lineage)
    assert all(np.array_equal(a, b) for a, b in zip(recovered, uninterrupted, strict=True))


def test_two_concurrent_requests_make_a_chain(lineage):
    arguments = [
        [
            "unlearn",
            "--method",
            TOY,
            "--model",
            str(lineage["model"]),
            "--adapter",
            str(lineage["adapter"]),
            "--data",
            str(lineage["data"]),
            "--ledger",
            lineage["ledger"],
            "--out",
            str(lineage["dir"] / out),
            "--forget",
            forget,
        ]
        for out, forget in (("a", lineage["ids"][0]), ("b", lineage["ids"][1]))
    ]
    environment = _subprocess_environment(lineage)
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import sys, toy_method; from jaxunlearn.cli import main; "
                f"sys.exit(main({argv!r}))",
            ],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in arguments
    ]
    for process in processes:
        _, error = process.communicate(timeout=300)
        assert process.returncode == 0, error
    intents = [r for r in Ledger(lineage["ledger"]).records() if r.type == "intent"]
    assert len(intents) == 2
    # The second intent's parent is the first's output: a chain, not a fork.
    assert intents[1]["parent"] == intents[0]["adapter_digest"]
    last = provenance_of(intents[1]["adapter"])
    assert not set(last["example_ids"]) & set(lineage["ids"][:2])
