"""`jaxunlearn unlearn` and `jaxunlearn demo` end to end on a tiny checkpoint.

One removal is applied once (a module fixture) and the tests that need an applied request
reuse it: every real LLMEraser run costs a few seconds of compilation on a CPU.
"""

import contextlib
import io
import json
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_assets import make_tiny_checkpoint

from jaxunlearn import kernels
from jaxunlearn.adapter import (
    LoraSettings,
    attach_lora,
    load_lora,
    read_lora_settings,
    save_lora,
)
from jaxunlearn.cli import main
from jaxunlearn.data import load_examples
from jaxunlearn.models import load, load_peft_adapter, save_peft_adapter, split_lora
from jaxunlearn.unlearn import Ledger, file_sha256

# The smallest settings that still run every stage: sample, spectrum, solve.
TINY_ERASER = [
    "--solver", "cg", "--curvature", "gauss_newton", "--sample-size", "8",
    "--spectrum-steps", "4", "--max-steps", "5", "--batch-size", "8",
]  # fmt: skip
FORGET = ["person-00000/biography", "person-00000/fact/email"]


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A corpus, a tiny checkpoint, and one fine-tuned-looking adapter in both formats."""
    root = tmp_path_factory.mktemp("unlearn")
    assert main(["make-data", "--people", "4", "--seed", "1", "--out", str(root / "corpus")]) == 0
    model_dir = make_tiny_checkpoint(root / "model")
    data = root / "corpus" / "train.jsonl"
    model = load(model_dir)
    settings = LoraSettings(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    attach_lora(model, settings, key=jax.random.key(1))
    _, lora, _ = split_lora(model)
    # B starts at zero; a trained adapter's does not, and it gives A its gradients.
    noise = jax.tree.map(lambda leaf: 0.05 * jax.random.normal(jax.random.key(2), leaf.shape), lora)
    nnx.update(model, jax.tree.map(np.add, lora, noise))
    ids = [example.id for example in load_examples(data)]
    save_lora(model, root / "adapter", settings=settings, description={"example_ids": ids})
    save_peft_adapter(model, root / "peft", base_model_name_or_path="tiny/base")
    return {
        "root": root,
        "model": model_dir,
        "data": data,
        "adapter": root / "adapter",
        "peft": root / "peft",
    }


def unlearn_arguments(assets, *request, out, adapter=None, peft=None):
    source = ["--peft-adapter", str(peft)] if peft else ["--adapter", str(adapter)]
    return [
        "unlearn", "--method", "llmeraser", "--model", str(assets["model"]), *source,
        "--data", str(assets["data"]), *request, "--out", str(out), *TINY_ERASER,
    ]  # fmt: skip


def lora_leaves(model) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(split_lora(model)[1])]


def assert_differs(before, after):
    assert all(np.all(np.isfinite(leaf)) for leaf in after)
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


@pytest.fixture(scope="module")
def removal(assets, tmp_path_factory):
    """Removes FORGET from the jaxunlearn adapter once, with --json and a new --preparation."""
    runs = tmp_path_factory.mktemp("runs")
    out = runs / "unlearned"
    arguments = unlearn_arguments(
        assets, "--forget", ",".join(FORGET), out=out, adapter=assets["adapter"]
    )
    arguments += ["--preparation", str(runs / "preparation"), "--json"]
    buffer = io.StringIO()  # capsys is per test; this output is shared by several
    with contextlib.redirect_stdout(buffer):
        status = main(arguments)
    return {
        "status": status,
        "out": out,
        "runs": runs,
        "arguments": arguments,
        "stdout": buffer.getvalue(),
        "ledger": assets["root"] / "unlearn-ledger.jsonl",  # beside the adapter
        "preparation": runs / "preparation",
    }


def intents(ledger_path) -> list:
    return [record for record in Ledger(ledger_path).records() if record.type == "intent"]


def test_removal_writes_a_changed_adapter_and_one_text_free_ledger_record(assets, removal):
    assert removal["status"] == 0
    summary = json.loads(removal["stdout"])  # --json: stdout is the JSON object alone
    out = removal["out"]
    assert summary["applied"] is True
    assert summary["adapter"] == str(out.absolute())
    assert summary["kind"] == "removal"
    assert summary["num_examples"] == 2
    assert summary["figures"]["solver_steps"] == 5
    assert summary["figures"]["prepare_seconds"] > 0  # prepared in this run, and saved
    assert summary["approximate"] is True  # CG stopped at its 5-step budget
    assert (removal["preparation"]).is_dir()

    before, _ = load_lora(load(assets["model"]), assets["adapter"])
    after, metadata = load_lora(load(assets["model"]), out)
    assert_differs(lora_leaves(before), lora_leaves(after))
    # The new adapter stands for the data less the removed examples, and does not name them.
    provenance = metadata["provenance"]
    assert not set(FORGET) & set(provenance["example_ids"])
    assert len(provenance["example_ids"]) == len(load_examples(assets["data"])) - 2
    assert [step["kind"] for step in provenance["requests"]] == ["removal"]

    (intent,) = intents(removal["ledger"])
    assert intent.sequence == summary["record"]
    assert intent["kind"] == "removal"
    assert intent["num_examples"] == 2
    assert intent["adapter"] == str(out.absolute())
    assert intent["adapter_digest"] == summary["adapter_digest"]
    assert intent["settings"]["solver"] == "cg"
    assert intent["settings"]["curvature"]["sample_size"] == 8
    ledger_text = removal["ledger"].read_text()
    for example in load_examples(assets["data"]):
        if example.id in FORGET:
            assert example.id not in ledger_text
            assert example.response.strip() not in ledger_text
            assert example.prompt.strip() not in ledger_text


def test_repeating_a_request_is_a_no_op(assets, removal, capsys):
    ledger_before = removal["ledger"].read_bytes()
    adapter_before = file_sha256(removal["out"])
    # The same command without --json (its --out now exists), and the ids in another order to
    # a new --out.
    assert removal["arguments"][-1] == "--json"
    assert main(removal["arguments"][:-1]) == 0
    assert "already applied" in capsys.readouterr().out
    again = removal["runs"] / "again"
    reordered = unlearn_arguments(
        assets, "--forget", ",".join(reversed(FORGET)), out=again, adapter=assets["adapter"]
    )
    assert main([*reordered, "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["applied"] is False
    assert summary["adapter"] == str(removal["out"].absolute())
    assert "already applied" in captured.err
    assert not again.exists()
    assert removal["ledger"].read_bytes() == ledger_before
    assert file_sha256(removal["out"]) == adapter_before


def test_a_request_touching_removed_examples_is_refused(assets, removal, capsys):
    ledger_before = removal["ledger"].read_bytes()
    out = removal["runs"] / "conflict"
    arguments = unlearn_arguments(
        assets, "--forget", f"{FORGET[0]},person-00001/biography", out=out, adapter=removal["out"]
    )
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "already removed" in error
    assert not out.exists()
    assert removal["ledger"].read_bytes() == ledger_before


def test_a_preparation_made_with_other_settings_is_refused(assets, removal, capsys):
    out = removal["runs"] / "mismatch"
    arguments = unlearn_arguments(
        assets, "--forget", "person-00002/biography", out=out, adapter=removal["out"]
    )
    arguments += ["--preparation", str(removal["preparation"]), "--sample-size", "16"]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "sample_size=8" in error
    assert not out.exists()


def test_a_response_edit_chains_on_the_removal(assets, removal, tmp_path, capsys):
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"id": "person-00001/fact/email", "response": " unknown."}) + "\n")
    out = removal["runs"] / "corrected"
    arguments = unlearn_arguments(
        assets, "--edit-responses", str(edits), out=out, adapter=removal["out"]
    )
    assert main([*arguments, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "response_edit"
    assert summary["num_examples"] == 1
    before, _ = load_lora(load(assets["model"]), removal["out"])
    after, metadata = load_lora(load(assets["model"]), out)
    assert_differs(lora_leaves(before), lora_leaves(after))
    requests = metadata["provenance"]["requests"]
    assert [step["kind"] for step in requests] == ["removal", "response_edit"]
    assert [intent["kind"] for intent in intents(removal["ledger"])] == [
        "removal",
        "response_edit",
    ]


def test_peft_adapter_in_and_out(assets, removal, tmp_path, capsys):
    out = tmp_path / "unlearned"
    arguments = unlearn_arguments(
        assets, "--forget", "person-00001/biography", out=out, peft=assets["peft"]
    )
    # The PEFT copy holds the same adapter, so the removal's preparation fits it.
    ledger = tmp_path / "ledger.jsonl"
    arguments += ["--preparation", str(removal["preparation"]), "--ledger", str(ledger)]
    assert main(arguments) == 0
    captured = capsys.readouterr()
    assert "LLMEraser" in captured.out
    assert str(out.absolute()) in captured.out
    # The input's format by default: a PEFT directory that loads back as PEFT, with the
    # provenance in a file PEFT ignores.
    assert sorted(path.name for path in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "jaxunlearn-provenance.json",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny/base"
    before = load_peft_adapter(load(assets["model"]), assets["peft"])
    after = load_peft_adapter(load(assets["model"]), out)
    assert_differs(lora_leaves(before), lora_leaves(after))
    (intent,) = intents(ledger)
    assert intent["adapter_format"] == "peft"


@pytest.mark.parametrize(
    ("request_arguments", "expected"),
    [
        (["--forget", "person-00000/biography,nobody/at-all"], "nobody/at-all"),
        (["--forget-file", "ALL_IDS"], "all 39 examples"),
        (["--edit-queries", "BAD_EDITS"], "line 1"),
        (["--forget", "person-00002/biography", "--damping", "1e30"], "changes the adapter"),
    ],
    ids=["unknown-ids", "whole-dataset", "malformed-edits", "no-effect"],
)
def test_bad_requests_exit_2_in_one_line_and_write_nothing(
    assets, tmp_path, capsys, request_arguments, expected
):
    all_ids = tmp_path / "all.txt"
    all_ids.write_text("\n".join(example.id for example in load_examples(assets["data"])) + "\n")
    bad_edits = tmp_path / "edits.jsonl"
    bad_edits.write_text(json.dumps({"id": FORGET[0], "prompt": "x", "response": "y"}) + "\n")
    files = {"ALL_IDS": str(all_ids), "BAD_EDITS": str(bad_edits)}
    request_arguments = [files.get(item, item) for item in request_arguments]
    out = tmp_path / "runs" / "out"
    ledger = tmp_path / "ledger.jsonl"
    arguments = unlearn_arguments(assets, *request_arguments, out=out, adapter=assets["adapter"])
    assert main([*arguments, "--ledger", str(ledger)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("jaxunlearn unlearn: error:")
    assert error.count("\n") == 1
    assert expected in error
    assert not (tmp_path / "runs").exists()
    assert intents(ledger) == []  # nothing recorded (the adapter's registration only)


def test_a_failed_solve_exits_2_and_writes_nothing(assets, tmp_path, capsys, monkeypatch):
    from jaxunlearn.unlearn import LLMEraser

    def diverging(*args, **kwargs):
        raise kernels.SolverError("solve failed with status DIVERGED after 3 steps:\nthe iterates")

    # A real preparation costs seconds; the CLI only needs to hold one when the solve fails.
    monkeypatch.setattr(LLMEraser, "prepare", lambda *a, **k: None)
    monkeypatch.setattr(LLMEraser, "warm_up", lambda *a, **k: None)
    monkeypatch.setattr(LLMEraser, "apply", diverging)
    out = tmp_path / "runs" / "out"
    ledger = tmp_path / "ledger.jsonl"
    arguments = unlearn_arguments(assets, "--forget", FORGET[0], out=out, adapter=assets["adapter"])
    arguments += ["--preparation", str(tmp_path / "runs" / "preparation"), "--ledger", str(ledger)]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "DIVERGED" in error
    # Not the adapter, not a ledger record, not even the preparation.
    assert not (tmp_path / "runs").exists()
    assert intents(ledger) == []


def test_the_cli_and_apply_request_write_the_same_adapter_and_ledger(assets, tmp_path):
    """One implementation: the CLI only parses and calls `apply_request`."""
    from jaxunlearn.unlearn import (
        CurvatureSettings,
        EraserSettings,
        Removal,
        Sources,
        apply_request,
    )

    results = {}
    for name in ("cli", "library"):
        folder = tmp_path / name
        ledger = folder / "ledger.jsonl"
        out = folder / "out"
        if name == "cli":
            arguments = unlearn_arguments(
                assets, "--forget", ",".join(FORGET), out=out, adapter=assets["adapter"]
            )
            assert main([*arguments, "--ledger", str(ledger)]) == 0
        else:
            settings = EraserSettings(
                solver="cg",
                max_steps=5,
                curvature=CurvatureSettings(
                    kind="gauss_newton", sample_size=8, spectrum_steps=4, batch_size=8
                ),
            )
            apply_request(
                Removal(FORGET),
                adapter=assets["adapter"],
                out=out,
                sources=Sources(base_model=assets["model"], data=assets["data"]),
                settings=settings,
                ledger=ledger,
            )
        records = [
            (record.type, {k: v for k, v in record.fields.items() if k not in _RUN_SPECIFIC})
            for record in Ledger(ledger).records()
        ]
        _, metadata = load_lora(load(assets["model"]), out)
        results[name] = (records, metadata, lora_leaves(load_lora(load(assets["model"]), out)[0]))
    (cli_records, cli_meta, cli_lora), (lib_records, lib_meta, lib_lora) = results.values()
    assert [kind for kind, _ in cli_records] == ["root", "intent", "commit"]
    # Paths and keyed digests differ between the two folders; everything else is the same.
    assert _without_paths(cli_records) == _without_paths(lib_records)
    assert all(np.array_equal(a, b) for a, b in zip(cli_lora, lib_lora, strict=True))
    assert cli_meta["provenance"]["example_ids"] == lib_meta["provenance"]["example_ids"]


# Fields that name where a run wrote or how long it took, or are keyed by each ledger's own
# secret: they differ between two runs of the same request in two folders.
_RUN_SPECIFIC = {"figures"}


def _without_paths(records):
    keyed = {"request_key", "fingerprint", "id_hashes", "adapter_digest", "parent"}
    paths = {"adapter", "parent_path", "staged", "staged_sha256", "preparation"}
    return [
        (kind, {k: v for k, v in fields.items() if k not in keyed | paths})
        for kind, fields in records
    ]


def test_unlearn_needs_exactly_one_adapter_and_one_request(assets, tmp_path, capsys):
    base = ["unlearn", "--model", str(assets["model"]), "--data", str(assets["data"])]
    base += ["--out", str(tmp_path / "out")]
    for arguments in (
        [*base, "--adapter", str(assets["adapter"])],  # no request
        [*base, "--adapter", "a", "--peft-adapter", "b", "--forget", FORGET[0]],  # two adapters
        [*base, "--adapter", "a", "--forget", FORGET[0], "--method", "sharded"],  # not a method
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(arguments)
        assert exit_info.value.code == 2
    assert "invalid choice: 'sharded'" in capsys.readouterr().err


# demo: the real run takes minutes, so `run_demo` is replaced by a fake with its signature.

FAKE_FIGURES = {
    "original": {"forget_ppl": 3.0, "retain_ppl": 4.0},
    "unlearned": {"forget_ppl": 5.0, "retain_ppl": 4.1},
    "retrained": {"forget_ppl": 6.0, "retain_ppl": 4.0},
    "cost": {"unlearn_over_retrain": 0.01, "spectrum_smallest": math.nan},
    "per_example": {"forget_ids": ["person-00000/biography"], "original": {"forget_losses": [1]}},
}


@pytest.fixture
def fake_demo(monkeypatch):
    import jaxunlearn.demo

    calls = []

    def run_demo(
        output_dir, /, *, settings, cache_dir=None, progress=True, log=print, placement=None
    ):
        calls.append(
            {"out": pathlib.Path(output_dir), "settings": settings, "cache": cache_dir}
            | {"progress": progress, "placement": placement}
        )
        log("Fine-tuning LoRA ...")
        return json.loads(json.dumps(FAKE_FIGURES))

    monkeypatch.setattr(jaxunlearn.demo, "run_demo", run_demo)
    return calls


def test_demo_prints_the_log_the_table_and_the_report_folder(fake_demo, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "report"), "--seed", "3", "--no-progress"]) == 0
    (call,) = fake_demo
    assert call["settings"].seed == 3
    assert call["progress"] is False
    assert call["out"] == tmp_path / "report"
    assert call["cache"] is None
    assert call["placement"].mesh is None  # one device unless --mesh asks
    out = capsys.readouterr().out
    assert out.index("Fine-tuning LoRA") < out.index("| model")
    assert "| unlearned" in out
    assert str(tmp_path / "report" / "report.md") in out


def test_demo_mesh_places_the_whole_demo_on_it(fake_demo, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "report"), "--mesh", "auto"]) == 0
    (call,) = fake_demo
    assert dict(call["placement"].mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_demo_json_is_the_figures_without_per_example_values(
    fake_demo, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    (call,) = fake_demo
    assert call["out"] == pathlib.Path("jaxunlearn-demo")  # the default, in the working dir
    assert call["cache"] == str(tmp_path / "cache")
    assert call["progress"] is True
    assert call["settings"].seed == 0
    captured = capsys.readouterr()
    figures = json.loads(captured.out)  # stdout holds the JSON alone: the log went to stderr
    assert "per_example" not in figures
    assert figures["unlearned"] == FAKE_FIGURES["unlearned"]
    assert figures["cost"]["spectrum_smallest"] is None  # NaN is not JSON
    assert "Fine-tuning LoRA" in captured.err


def _penalized_adapter(assets, path, *, l2_regularization):
    """The test adapter, saved as if fine-tuned with an L2 penalty."""
    model = load(assets["model"])
    load_lora(model, assets["adapter"])
    lora_settings, _ = read_lora_settings(assets["adapter"])
    ids = [example.id for example in load_examples(assets["data"])]
    description = {
        "example_ids": ids,
        "train_config": {"l2_regularization": l2_regularization},
    }
    save_lora(model, path, settings=lora_settings, description=description)
    return path


def test_the_penalty_is_read_from_the_adapter_and_a_flag_overrides_it(assets, tmp_path):
    """The fine-tune's L2 penalty is part of the objective: unlearn takes it from train_config."""
    penalized = _penalized_adapter(assets, tmp_path / "penalized", l2_regularization=0.25)
    recorded = {}
    flag_sets = (("read", ["--no-leave-out-request"]), ("flag", ["--l2-regularization", "0"]))
    for name, flags in flag_sets:
        ledger = tmp_path / f"{name}.jsonl"
        arguments = unlearn_arguments(
            assets, "--forget", ",".join(FORGET), out=tmp_path / name, adapter=penalized
        )
        assert main([*arguments, *flags, "--ledger", str(ledger)]) == 0
        (intent,) = intents(ledger)
        recorded[name] = intent["settings"]["curvature"]
    assert recorded["read"]["l2_regularization"] == 0.25
    assert recorded["read"]["leave_out_request"] is False
    assert recorded["read"]["damping"] == 0.0  # no damping beyond a known penalty
    assert recorded["flag"]["l2_regularization"] == 0.0
    assert recorded["flag"]["leave_out_request"] is True  # the default
