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

import kernels
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
        "ledger": runs / "unlearn-ledger.jsonl",
        "preparation": runs / "preparation",
    }


def test_removal_writes_a_changed_adapter_and_one_text_free_ledger_entry(assets, removal):
    assert removal["status"] == 0
    summary = json.loads(removal["stdout"])  # --json: stdout is the JSON object alone
    out = removal["out"]
    assert summary["applied"] is True
    assert summary["adapter"] == str(out.absolute())
    assert summary["adapter_format"] == "jaxunlearn"
    assert summary["num_examples"] == 2
    assert summary["figures"]["solver_steps"] == 5
    assert summary["figures"]["prepare_seconds"] > 0  # prepared in this run, and saved
    assert (removal["preparation"]).is_dir()

    before, _ = load_lora(load(assets["model"]), assets["adapter"])
    after, metadata = load_lora(load(assets["model"]), out)
    assert_differs(lora_leaves(before), lora_leaves(after))
    # The new adapter stands for the data less the removed examples, and does not name them.
    assert not set(FORGET) & set(metadata["example_ids"])
    assert len(metadata["example_ids"]) == len(load_examples(assets["data"])) - 2
    assert metadata["unlearning"][0]["fingerprint"] == summary["fingerprint"]

    (entry,) = Ledger(removal["ledger"]).entries()
    assert entry.fingerprint == summary["fingerprint"]
    assert entry.kind == "removal"
    assert entry.num_examples == 2
    assert entry.adapter == str(out.absolute())
    assert entry.adapter_sha256 == file_sha256(out)
    assert entry.settings["solver"] == "cg"
    assert entry.settings["sample_size"] == 8
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
    assert json.loads(captured.out)["applied"] is False
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


def test_a_response_edit_reuses_the_saved_preparation(assets, removal, tmp_path, capsys):
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"id": "person-00001/fact/email", "response": " unknown."}) + "\n")
    out = removal["runs"] / "corrected"
    arguments = unlearn_arguments(
        assets, "--edit-responses", str(edits), out=out, adapter=removal["out"]
    )
    assert main([*arguments, "--preparation", str(removal["preparation"]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "response_edit"
    assert summary["num_examples"] == 1
    assert summary["figures"]["prepare_seconds"] == 0  # loaded, not prepared again
    before, _ = load_lora(load(assets["model"]), removal["out"])
    after, metadata = load_lora(load(assets["model"]), out)
    assert_differs(lora_leaves(before), lora_leaves(after))
    assert [step["kind"] for step in metadata["unlearning"]] == ["removal", "response_edit"]
    assert [entry.kind for entry in Ledger(removal["ledger"]).entries()] == [
        "removal",
        "response_edit",
    ]


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


def test_peft_adapter_in_and_out(assets, removal, tmp_path, capsys):
    out = tmp_path / "unlearned"
    arguments = unlearn_arguments(
        assets, "--forget", "person-00001/biography", out=out, peft=assets["peft"]
    )
    # The PEFT copy holds the same adapter, so the removal's preparation fits it.
    assert main([*arguments, "--preparation", str(removal["preparation"])]) == 0
    captured = capsys.readouterr()
    assert "LLMEraser" in captured.out
    assert str(out.absolute()) in captured.out
    # The input's format by default: a PEFT directory that loads back as PEFT.
    assert sorted(path.name for path in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny/base"
    before = load_peft_adapter(load(assets["model"]), assets["peft"])
    after = load_peft_adapter(load(assets["model"]), out)
    assert_differs(lora_leaves(before), lora_leaves(after))
    (entry,) = Ledger(tmp_path / "unlearn-ledger.jsonl").entries()
    assert entry.adapter_sha256 == file_sha256(out)


@pytest.mark.parametrize(
    ("request_arguments", "expected"),
    [
        (["--forget", "person-00000/biography,nobody/at-all"], "nobody/at-all"),
        (["--forget-file", "ALL_IDS"], "all 39 examples"),
        (["--edit-queries", "BAD_EDITS"], "line 1"),
    ],
    ids=["unknown-ids", "whole-dataset", "malformed-edits"],
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
    arguments = unlearn_arguments(assets, *request_arguments, out=out, adapter=assets["adapter"])
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("jaxunlearn unlearn: error:")
    assert error.count("\n") == 1
    assert expected in error
    assert not (tmp_path / "runs").exists()  # neither the adapter nor the ledger


def test_a_failed_solve_exits_2_and_writes_nothing(assets, tmp_path, capsys, monkeypatch):
    import jaxunlearn.unlearn

    def diverging(*args, **kwargs):
        raise kernels.SolverError("solve failed with status DIVERGED after 3 steps:\nthe iterates")

    # A real preparation costs seconds; the CLI only needs to hold one when the solve fails.
    monkeypatch.setattr(jaxunlearn.unlearn, "prepare_llmeraser", lambda *a, **k: object())
    monkeypatch.setattr(jaxunlearn.unlearn, "llmeraser", diverging)
    out = tmp_path / "runs" / "out"
    arguments = unlearn_arguments(assets, "--forget", FORGET[0], out=out, adapter=assets["adapter"])
    assert main([*arguments, "--preparation", str(tmp_path / "runs" / "preparation")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "DIVERGED" in error
    # Not the adapter, not the ledger, not even the (valid) preparation.
    assert not (tmp_path / "runs").exists()


def test_unlearn_needs_exactly_one_adapter_and_one_request(assets, tmp_path, capsys):
    base = ["unlearn", "--model", str(assets["model"]), "--data", str(assets["data"])]
    base += ["--out", str(tmp_path / "out")]
    for arguments in (
        [*base, "--adapter", str(assets["adapter"])],  # no request
        [*base, "--adapter", "a", "--peft-adapter", "b", "--forget", FORGET[0]],  # two adapters
        [*base, "--adapter", "a", "--forget", FORGET[0], "--method", "sisa"],  # not (yet) a method
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(arguments)
        assert exit_info.value.code == 2
    assert "invalid choice: 'sisa'" in capsys.readouterr().err


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

    def run_demo(output_dir, /, *, settings, cache_dir=None, progress=True, log=print):
        calls.append(
            {"out": pathlib.Path(output_dir), "settings": settings, "cache": cache_dir}
            | {"progress": progress}
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
    out = capsys.readouterr().out
    assert out.index("Fine-tuning LoRA") < out.index("| model")
    assert "| unlearned" in out
    assert str(tmp_path / "report" / "report.md") in out


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
    for name, flags in (("read", ["--leave-out-request"]), ("flag", ["--l2-regularization", "0"])):
        ledger = tmp_path / f"{name}.jsonl"
        arguments = unlearn_arguments(
            assets, "--forget", ",".join(FORGET), out=tmp_path / name, adapter=penalized
        )
        assert main([*arguments, *flags, "--ledger", str(ledger)]) == 0
        (entry,) = Ledger(ledger).entries()
        recorded[name] = entry.settings
    assert recorded["read"]["l2_regularization"] == 0.25
    assert recorded["read"]["leave_out_request"] is True
    assert recorded["flag"]["l2_regularization"] == 0.0
    assert recorded["flag"]["leave_out_request"] is False


def test_a_zero_damping_is_accepted_when_the_adapter_was_penalized(assets, tmp_path):
    """--damping 0 needs a penalty, which may come from the adapter rather than a flag."""
    penalized = _penalized_adapter(assets, tmp_path / "penalized", l2_regularization=0.25)
    ledger = tmp_path / "ledger.jsonl"
    arguments = unlearn_arguments(
        assets, "--forget", ",".join(FORGET), out=tmp_path / "out", adapter=penalized
    )
    assert main([*arguments, "--damping", "0", "--ledger", str(ledger)]) == 0
    (entry,) = Ledger(ledger).entries()
    assert entry.settings["damping"] == 0.0
    assert entry.settings["l2_regularization"] == 0.25
