"""Report plots (PNG files) and Markdown tables."""

import numpy as np
import pytest

from jaxunlearn.eval import (
    markdown_table,
    plot_forget_losses,
    plot_module_scores,
    plot_score_histograms,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000  # axes, markers and text, not an empty canvas


def test_forget_loss_plot(tmp_path):
    rng = np.random.default_rng(0)
    original = rng.uniform(0.5, 1.5, 20)
    losses = {"original": original, "unlearned": original + 1.0, "retrained": original + 1.2}
    path = tmp_path / "forget_losses.png"
    assert plot_forget_losses(path, losses, title="Forget set") == path
    _assert_png(path)
    with pytest.raises(ValueError, match="same, non-zero number"):
        plot_forget_losses(tmp_path / "bad.png", {"original": original, "other": original[:3]})
    with pytest.raises(ValueError, match="sort_by"):
        plot_forget_losses(tmp_path / "bad.png", losses, sort_by="missing")


def test_score_histogram_plot(tmp_path):
    rng = np.random.default_rng(1)
    member = {"original": rng.normal(1.0, 1.0, 50), "unlearned": rng.normal(0.0, 1.0, 50)}
    nonmember = {"original": rng.normal(0.0, 1.0, 60), "unlearned": rng.normal(0.0, 1.0, 60)}
    path = tmp_path / "mia.png"
    assert plot_score_histograms(path, member, nonmember, score_name="−ℓ") == path
    _assert_png(path)
    with pytest.raises(ValueError, match="different models"):
        plot_score_histograms(tmp_path / "bad.png", member, {"original": nonmember["original"]})


def test_module_score_grid_plot(tmp_path):
    scores = {
        f"model.layers.{layer}.self_attn.{projection}": float(layer + index)
        for layer in range(4)
        for index, projection in enumerate(("q_proj", "v_proj"))
    }
    path = tmp_path / "scores.png"
    reset = ["model.layers.3.self_attn.v_proj"]
    assert plot_module_scores(path, scores, reset=reset) == path
    _assert_png(path)
    with pytest.raises(ValueError, match="names no decoder layer"):
        plot_module_scores(tmp_path / "bad.png", {"lm_head": 1.0})
    with pytest.raises(ValueError, match="not finite"):
        plot_module_scores(tmp_path / "bad.png", {"model.layers.0.q_proj": float("nan")})
    with pytest.raises(ValueError, match="No module score"):
        plot_module_scores(tmp_path / "bad.png", {})


def test_markdown_table():
    rows = [
        {"method": "retrain", "auc": 0.512345, "steps": 100, "ok": True},
        {"method": "gradient|ascent", "auc": np.float32(0.25), "steps": np.int64(3)},
    ]
    table = markdown_table(rows, ["method", "auc", "steps", "ok"], float_format="{:.3f}")
    assert table.splitlines() == [
        "| method | auc | steps | ok |",
        "| --- | --- | --- | --- |",
        "| retrain | 0.512 | 100 | True |",
        "| gradient\\|ascent | 0.250 | 3 |  |",
    ]
    assert markdown_table(rows[:1], ["auc"]).splitlines()[2] == "| 0.5123 |"
    with pytest.raises(ValueError, match="column"):
        markdown_table(rows, [])
