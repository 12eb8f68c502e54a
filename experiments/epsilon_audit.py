"""An empirical ε audit of LLMEraser and module removal on the embedded default.

Unlearning is ε-indistinguishable from retraining when Pr[unlearned ∈ S] ≤ e^ε Pr[retrained ∈ S]
for every set S of adapters, the probability taken over the training's randomness. This script
samples that randomness: for each seed k it fine-tunes the demo's adapter (LoRA initialization
and batch order from k), removes the demo's forget people from it with LLMEraser and with module
removal (the mechanism's own randomness from k too), retrains without them from the same seed
(the negatives) and once more from another seed (the control: retrain against retrain, the same
distribution). One number per adapter is the distinguisher: the mean membership score of the
forget set (the LOSS attack's −ℓ, or Min-K%).

The bound is a Clopper-Pearson lower bound on ε at confidence 1 − α, two ways:
  - held out: the threshold and its direction are chosen on the first `--calibration` seeds and
    the rest are audited at that one threshold (no correction for a search);
  - searched: every threshold over all seeds, with the confidence split over all of them
    (Bonferroni), valid but weaker at few seeds.
With K trials a side the bound can never exceed `largest_attainable` (perfect separation): a
small K limits what any audit can show, and the table says so. The original adapter against the
retrain is the positive control: the audit's power on a model that did not unlearn.

    python experiments/epsilon_audit.py --seeds 12        # about 4 min a seed on 2 CPU cores
    python experiments/epsilon_audit.py --report-only     # the bounds again from the saved runs

Seeds already in experiments/results/epsilon_audit_runs.json are kept, so a killed run resumes.
Writes experiments/results/epsilon_audit/{audit.json,audit.md,audit.png,statistics.md}.
"""

import argparse
import dataclasses
import json
import pathlib
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from jaxunlearn.adapter import attach_lora
from jaxunlearn.defaults import ensure_defaults
from jaxunlearn.demo import DemoSettings, demo_data
from jaxunlearn.eval import (
    choose_threshold,
    epsilon_lower_bound,
    markdown_table,
    model_statistic,
    write_audit_report,
)
from jaxunlearn.train import finetune
from jaxunlearn.unlearn import (
    DEFAULT_LEDGER_NAME,
    LLMEraser,
    ModuleRemoval,
    ModuleRemovalSettings,
    Removal,
    open_context,
    resolve_request,
    retrain,
    save_root_adapter,
)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "epsilon_audit_runs.json"
STATISTICS = ("loss", "min_k")
CONTROL_SEED_OFFSET = 1000
# Positives against negatives, per audit: each name is a model kind in a run.
AUDITS = {
    "llmeraser": ("llmeraser", "retrained"),
    "module-removal": ("module_removal", "retrained"),
    "retrain-vs-retrain (control)": ("control", "retrained"),
    "original (no unlearning)": ("original", "retrained"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=12, help="Trials a side (K).")
    parser.add_argument("--calibration", type=int, default=2, help="Seeds that pick the threshold.")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    options = parser.parse_args()
    runs = json.loads(RUNS.read_text()) if RUNS.exists() else {}
    if not options.report_only:
        for seed in range(options.seeds):
            if str(seed) in runs:
                continue
            started = time.perf_counter()
            runs[str(seed)] = run_seed(seed, options.cache_dir, progress=not options.no_progress)
            print(
                f"seed {seed}: {time.perf_counter() - started:.0f} s {runs[str(seed)]}", flush=True
            )
            RESULTS.mkdir(exist_ok=True)
            RUNS.write_text(json.dumps(runs, indent=2, allow_nan=False))
    report(runs, calibration=options.calibration, alpha=options.alpha)


def run_seed(seed: int, cache_dir, *, progress: bool) -> dict:
    """Every model of one seed, as {kind: {statistic: value}} plus the request's figures."""
    demo = DemoSettings(seed=seed)
    assets = ensure_defaults(cache_dir, progress=progress)
    tokenizer, splits = assets.tokenizer(), demo_data(assets, demo)
    examples, forget_ids = splits.examples, splits.forget_ids
    data, retain, forget = splits.data, splits.retain, splits.forget

    def statistics(model):
        return {name: model_statistic(model, forget, statistic=name) for name in STATISTICS}

    def initial(key_seed):
        return attach_lora(assets.model(), demo.lora_settings(), key=jax.random.key(key_seed))

    config = demo.train_config(len(data))
    original = finetune(initial(seed), data, config=config, progress=progress).model
    models = {"original": statistics(original)}
    retrained = retrain(
        initial(seed), retain, config=config, num_examples=len(data), progress=progress
    )
    models["retrained"] = statistics(retrained.model)
    control_seed = CONTROL_SEED_OFFSET + seed
    control = retrain(
        initial(control_seed),
        retain,
        config=dataclasses.replace(config, seed=control_seed),
        num_examples=len(data),
        progress=progress,
    )
    models["control"] = statistics(control.model)

    with tempfile.TemporaryDirectory(prefix="epsilon_audit-") as work:
        work = pathlib.Path(work)
        save_root_adapter(
            original,
            work / "original",
            provenance=assets.training_provenance(examples, data, config),
            ledger=work / DEFAULT_LEDGER_NAME,
            lora_settings=demo.lora_settings(),
        )
        context = open_context(
            work / "original", assets.model_dir, examples=examples, data=data, tokenizer=tokenizer
        )
        resolved = resolve_request(Removal(forget_ids), examples)
        eraser_settings = dataclasses.replace(demo.eraser_settings(), seed=seed)
        removal_settings = ModuleRemovalSettings(seed=seed, progress=progress)
        for kind, method, settings in (
            ("llmeraser", LLMEraser(), eraser_settings),
            ("module_removal", ModuleRemoval(), removal_settings),
        ):
            settings = method.settle(settings, context)[0]
            prepared = method.prepare(context, settings)
            outcome = method.apply(context, resolved, settings, prepared)
            unlearned = nnx.clone(context.model)
            nnx.update(unlearned, outcome.lora)
            models[kind] = statistics(unlearned)
    return models


def report(runs: dict, *, calibration: int, alpha: float) -> None:
    seeds = sorted(runs, key=int)
    if len(seeds) <= calibration:
        raise SystemExit(
            f"{len(seeds)} seeds: the audit needs more than the {calibration} held out."
        )
    calibrating, audited = seeds[:calibration], seeds[calibration:]
    audits, scores, summary = {}, {}, []
    for statistic in STATISTICS:
        for name, (positive, negative) in AUDITS.items():

            def values(kind, chosen, statistic=statistic):
                return np.array([runs[s][kind][statistic] for s in chosen], np.float64)

            threshold, direction = choose_threshold(
                values(positive, calibrating), values(negative, calibrating)
            )
            held_out = epsilon_lower_bound(
                values(positive, audited),
                values(negative, audited),
                alpha=alpha,
                threshold=threshold,
                direction=direction,
            )
            searched = epsilon_lower_bound(
                values(positive, seeds), values(negative, seeds), alpha=alpha
            )
            for protocol, audit, chosen in (
                ("held-out", held_out, audited),
                ("searched", searched, seeds),
            ):
                key = f"{name} [{statistic}, {protocol}]"
                audits[key] = audit
                scores[key] = (values(positive, chosen), values(negative, chosen))
                summary.append(f"{key}: {audit.summary()}")
    written = write_audit_report(
        audits,
        RESULTS / "epsilon_audit",
        scores=scores,
        title=(
            f"Empirical ε audit on the embedded default ({len(seeds)} seeds, "
            f"{calibration} of them held out to pick the threshold)"
        ),
    )
    # What the bounds summarize: each kind's statistic over the seeds, and how often an
    # unlearned adapter scores above a retrained one (0.5: no separation; 1: perfect).
    rows = []
    for statistic in STATISTICS:
        for kind in ("original", "llmeraser", "module_removal", "control", "retrained"):
            values = np.array([runs[s][kind][statistic] for s in seeds])
            reference = np.array([runs[s]["retrained"][statistic] for s in seeds])
            above = (values[:, None] > reference[None, :]).mean()
            ties = (values[:, None] == reference[None, :]).mean()
            rows.append(
                {
                    "statistic": statistic,
                    "model": kind,
                    "mean": values.mean(),
                    "std": values.std(ddof=1),
                    "min": values.min(),
                    "max": values.max(),
                    "above_retrained": above + ties / 2,
                }
            )
    table = markdown_table(
        rows, ("statistic", "model", "mean", "std", "min", "max", "above_retrained")
    )
    (RESULTS / "epsilon_audit" / "statistics.md").write_text(
        f"# The audit's statistic per model kind over {len(seeds)} seeds\n\n"
        "`above_retrained`: the share of (model, retrained model) pairs over the seeds in which "
        "the model's forget-set score is the higher (ties count half).\n\n" + table + "\n"
    )
    print(table)
    print("\n".join(summary))
    print(f"Wrote {', '.join(str(path) for path in written.values())}")


if __name__ == "__main__":
    main()
