"""The audit's distinguisher (one forget-set score per model) and `jaxunlearn audit`: the scores
it prints are each adapter's own, the bound is the library's on them, and bad input is one line."""

import json

import jax
import numpy as np
import pytest
from eval_fixtures import random_dataset, tiny_lora_model
from flax import nnx
from tiny_assets import make_tiny_checkpoint

from jaxunlearn.cli import main
from jaxunlearn.data import load_examples, load_tokenizer, tokenize_examples
from jaxunlearn.errors import UserError
from jaxunlearn.eval import (
    attack_scores,
    epsilon_lower_bound,
    model_statistic,
    read_audit_scores,
    score_examples,
)
from jaxunlearn.models import add_lora, load, save_peft_adapter
from jaxunlearn.unlearn import open_adapter


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_the_statistic_is_the_mean_member_high_attack_score():
    model, data = tiny_lora_model(seed=3), random_dataset(12, seed=3)
    scores = attack_scores(score_examples(model, data))
    assert model_statistic(model, data) == pytest.approx(
        -np.mean(score_examples(model, data).losses), rel=1e-6
    )
    assert model_statistic(model, data, statistic="min_k") == pytest.approx(
        np.mean(scores["min_k"]), rel=1e-6
    )
    with pytest.raises(UserError, match="Unknown audit statistic"):
        model_statistic(model, data, statistic="zlib-ish")
    with pytest.raises(UserError, match="empty"):
        model_statistic(model, data.subset([]))


def test_scores_files_are_read_strictly(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"positives": [1, 2.5], "negatives": [0.5]}))
    positives, negatives = read_audit_scores(good)
    np.testing.assert_array_equal(positives, [1.0, 2.5])
    np.testing.assert_array_equal(negatives, [0.5])
    for name, text in {
        "not-json": "{",
        "list": "[1, 2]",
        "missing": json.dumps({"positives": [1.0]}),
        "empty": json.dumps({"positives": [], "negatives": [1.0]}),
        "text": json.dumps({"positives": ["1"], "negatives": [1.0]}),
        "bool": json.dumps({"positives": [True], "negatives": [1.0]}),
    }.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(UserError):
            read_audit_scores(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny checkpoint, its corpus, and PEFT adapters with random B: three a side."""
    root = tmp_path_factory.mktemp("audit")
    assert main(["make-data", "--people", "3", "--seed", "2", "--out", str(root / "corpus")]) == 0
    model_dir = make_tiny_checkpoint(root / "model")
    paths = {"positive": [], "negative": []}
    for index in range(6):
        model = add_lora(
            load(model_dir), rank=2, alpha=4.0, targets=("q_proj",), key=jax.random.key(index)
        )
        lora = nnx.state(model, nnx.LoRAParam)
        leaves, structure = jax.tree.flatten(lora)
        keys = jax.random.split(jax.random.key(100 + index), len(leaves))
        scale = 0.5 if index < 3 else 0.05  # the "unlearned" side moved further from the base
        leaves = [
            scale * jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ]
        nnx.update(model, jax.tree.unflatten(structure, leaves))
        side = "positive" if index < 3 else "negative"
        path = root / f"{side}-{index}"
        save_peft_adapter(model, path)
        paths[side].append(path)
    data = root / "corpus" / "train.jsonl"
    examples = load_examples(data)
    person = examples[0].metadata["person_id"]
    forget = [e.id for e in examples if e.metadata["person_id"] == person]
    return {"root": root, "model": model_dir, "data": data, "forget": forget, **paths}


def test_the_command_scores_each_adapter_and_bounds_them(adapters, tmp_path, capsys):
    out = tmp_path / "audit"
    arguments = [
        "audit", "--model", str(adapters["model"]), "--data", str(adapters["data"]),
        "--forget", ",".join(adapters["forget"]),
        "--positive", *map(str, adapters["positive"]),
        "--negative", *map(str, adapters["negative"]),
        "--out", str(out), "--name", "random-b", "--json",
    ]  # fmt: skip
    assert main(arguments) == 0
    summary = json.loads(capsys.readouterr().out)

    tokenizer = load_tokenizer(adapters["model"])
    examples = [e for e in load_examples(adapters["data"]) if e.id in set(adapters["forget"])]
    forget = tokenize_examples(examples, tokenizer, max_length=192)
    expected = {
        side: [
            model_statistic(open_adapter(path, adapters["model"]).model, forget)
            for path in adapters[side]
        ]
        for side in ("positive", "negative")
    }
    np.testing.assert_allclose(summary["positive_scores"], expected["positive"], rtol=1e-6)
    np.testing.assert_allclose(summary["negative_scores"], expected["negative"], rtol=1e-6)
    bound = epsilon_lower_bound(summary["positive_scores"], summary["negative_scores"])
    assert summary["epsilon"] == pytest.approx(bound.epsilon)
    assert summary["largest_attainable"] == pytest.approx(bound.largest_attainable)
    assert (summary["positives"], summary["negatives"], summary["statistic"]) == (3, 3, "loss")
    written = json.loads((out / "audit.json").read_text())
    assert written["audits"]["random-b"]["epsilon"] == pytest.approx(bound.epsilon)
    assert (out / "audit.md").read_text().count("random-b") >= 1
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_audits_given_scores_at_a_fixed_threshold(tmp_path, capsys):
    rng = np.random.default_rng(0)
    positives, negatives = rng.normal(3, 1, 40), rng.normal(0, 1, 40)
    scores = tmp_path / "scores.json"
    scores.write_text(
        json.dumps({"positives": positives.tolist(), "negatives": negatives.tolist()})
    )
    arguments = ["audit", "--scores", str(scores), "--threshold", "1.5", "--direction", "high"]
    assert main([*arguments, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    bound = epsilon_lower_bound(positives, negatives, threshold=1.5, direction="high")
    assert summary["epsilon"] == pytest.approx(bound.epsilon)
    assert summary["epsilon"] > 0.5  # three standard deviations apart: clearly distinguishable
    assert summary["method"] == "fixed-threshold"
    assert main(arguments) == 0  # the human form: the one-line summary
    assert capsys.readouterr().out.splitlines()[0] == bound.summary()


def test_bad_command_lines_are_one_line_errors(adapters, tmp_path, capsys):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"positives": [1.0, 2.0], "negatives": [0.0, 0.5]}))
    scored = ["--model", str(adapters["model"]), "--data", str(adapters["data"])]
    sides = ["--positive", str(adapters["positive"][0]), "--negative", str(adapters["negative"][0])]
    cases = {
        "scores and adapters": ["--scores", str(scores), *sides],
        "one side only": ["--positive", str(adapters["positive"][0]), "--forget", "x"],
        "no forget set": [*scored, *sides],
        "unknown ids": [*scored, *sides, "--forget", "nobody/biography"],
        "direction alone": ["--scores", str(scores), "--direction", "low"],
        "bad alpha": ["--scores", str(scores), "--alpha", "1.5"],
        "missing scores file": ["--scores", str(tmp_path / "absent.json")],
    }
    for case, arguments in cases.items():
        assert main(["audit", *arguments]) == 2, case
        error = capsys.readouterr().err
        assert error.startswith("jaxunlearn audit: error:"), case
        assert len(error.strip().splitlines()) == 1, case
