"""The demo's acceptance checks and table, and (slow) the demo end to end."""

import json
import os

import pytest
from jax.sharding import AbstractMesh
from multi_device import run_report

from jaxunlearn import parallel
from jaxunlearn.demo import MODELS, _checks, run_demo, summary_table
from jaxunlearn.errors import SettingsError

SHARDED_DEMO = os.path.join(os.path.dirname(__file__), "sharded_demo.py")


def _figures(unlearned_forget_loss, unlearned_retain_ppl, unlearn_seconds):
    def model(forget_loss, retain_ppl, auc):
        return {
            "forget_loss": forget_loss,
            "forget_ppl": 2.718281828459045**forget_loss,
            "retain_ppl": retain_ppl,
            "mia_auc_loss": auc,
            "mia_auc_mink": auc,
        }

    return {
        "original": model(0.5, 1.80, 0.95),
        "unlearned": model(unlearned_forget_loss, unlearned_retain_ppl, 0.70),
        "retrained": model(2.5, 1.75, 0.45),
        "cost": {"unlearn_over_retrain": unlearn_seconds / 50.0},
    }


def test_checks_measure_progress_from_the_original_toward_the_retrain():
    checks = _checks(_figures(1.5, 1.80, 1.0))
    assert checks["forget_loss_moved"] == pytest.approx(0.5)
    assert checks["mia_auc_loss_moved"] == pytest.approx(0.5)
    assert checks["halfway_forget"]
    assert checks["halfway_mia"]
    assert checks["retain_ppl_over_retrained"] == pytest.approx(1.80 / 1.75)
    assert checks["retain_within_5pct"]
    assert checks["unlearn_within_5pct_of_retrain"]


def test_checks_fail_when_the_criteria_are_missed():
    checks = _checks(_figures(1.0, 1.90, 3.0))
    assert checks["forget_loss_moved"] == pytest.approx(0.25)
    assert not checks["halfway_forget"]
    assert not checks["retain_within_5pct"]  # 1.90 / 1.75 = 1.086
    assert not checks["unlearn_within_5pct_of_retrain"]  # 3 s of 50 s = 6%


def test_summary_table_has_a_row_per_model():
    figures = _figures(1.5, 1.8, 1.0)
    for name in MODELS:
        figures[name].update(held_out_ppl=10.0, mia_auc_mink=0.5, pii_recall=0.0)
    table = summary_table(figures).splitlines()
    assert table[0].startswith("| model | forget_ppl")
    assert [line.split("|")[1].strip() for line in table[2:]] == list(MODELS)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The whole demo on the embedded default (builds it if needed: several minutes)."""
    figures = run_demo(tmp_path / "report", progress=False, log=lambda line: None)
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(MODELS) <= set(written)
    for name in MODELS:
        for key in ("forget_ppl", "retain_ppl", "mia_auc_loss", "mia_auc_mink", "pii_recall"):
            assert written[name][key] == figures[name][key]
    for key in ("prepare_seconds", "unlearn_seconds", "retrain_seconds"):
        assert written["cost"][key] > 0
    # Removal must raise the forget loss, and the retrain must forget more than the original.
    assert figures["retrained"]["forget_loss"] > figures["original"]["forget_loss"]
    assert figures["unlearned"]["forget_loss"] > figures["original"]["forget_loss"]
    # The fidelity criteria of the recipe (the cost criterion depends on the machine's load).
    for check in ("halfway_forget", "halfway_mia", "retain_within_5pct"):
        assert figures["checks"][check], (check, figures["checks"])
    for plot in ("forget_losses.png", "mia_loss_scores.png"):
        assert (tmp_path / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("batch_devices", "what"),
    [(3, "fine-tune batch size 32"), (16, "curvature batch size 8")],
)
def test_a_mesh_that_cannot_split_a_recipe_batch_is_refused_before_anything_runs(
    tmp_path, batch_devices, what
):
    placement = parallel.Placement(AbstractMesh((1, batch_devices, 1), parallel.MESH_AXES))
    with pytest.raises(SettingsError, match=what):
        run_demo(tmp_path / "report", cache_dir=tmp_path / "cache", placement=placement)
    assert not (tmp_path / "report").exists()
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.multi_device
def test_the_demo_on_a_mesh_gives_the_one_device_figures(tmp_path):
    """The demo with every model on fsdp=2 × tensor=2 fake devices, against one device."""
    sharded = run_report(SHARDED_DEMO, "fsdp=2,tensor=2", devices=4, timeout=3000)
    single = run_demo(tmp_path / "report", progress=False, log=lambda line: None)
    # An AUC counts (forget, held-out) pairs, so it moves in steps of one pair.
    pairs = single["data"]["forget_examples"] * single["data"]["held_out_examples"]
    # The fine-tune and the retrain differ by float32 summation order alone: when measured,
    # their losses agreed to 1.2e-5 and 6.1e-5 (relative), their AUCs to 0 and 1 pair of
    # 3,380. The request's Newton step (truncated CG, damped by μ = 0.01 only) amplifies the
    # difference in its starting adapter: the unlearned forget loss agreed to 5.7e-4, its loss
    # AUC to 3 pairs and the forget gap closed to 9e-4. The bounds are about ten times that.
    bounds = {"original": (5e-4, 10), "retrained": (5e-4, 10), "unlearned": (5e-3, 30)}
    for name in MODELS:
        print(name, {key: (single[name][key], sharded[name][key]) for key in single[name]})
        loss_bound, pair_bound = bounds[name]
        for key in ("forget_loss", "retain_loss"):
            assert sharded[name][key] == pytest.approx(single[name][key], rel=loss_bound), (
                name,
                key,
            )
        for key in ("mia_auc_loss", "mia_auc_mink"):
            assert abs(sharded[name][key] - single[name][key]) <= pair_bound / pairs, (name, key)
        assert sharded[name]["pii_recall"] == single[name]["pii_recall"]
    assert sharded["unlearned"]["forget_gap_closed"] == pytest.approx(
        single["unlearned"]["forget_gap_closed"], abs=1e-2
    )
