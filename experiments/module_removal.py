"""Module removal against retraining on the embedded default, beside LLMEraser.

Fine-tunes the demo's adapter, retrains it without the demo's forget people (the reference),
then removes those people with gradient-traced module removal over a grid of the share of
LoRA modules reset and the restoration's budget (a fraction of the fine-tune's steps), plus
fresh modules everywhere, and with LLMEraser as the demo runs it. Each method is applied to
the same original adapter.

Reports, per row: the forget-gap closed (mean forget loss, 1 = the retrain's effect), the
loss-based MIA AUC (forget people against held-out people) and the share of the way from the
original's AUC to the retrain's it moved, the retain perplexity against the retrain's, and the
request's wall-clock against the retrain's, both with compilation (as a user sees it: the
restoration compiles its training step as the retrain does) and after it.

    python experiments/module_removal.py                 # about 10 min on 2 CPU cores
    python experiments/module_removal.py --shares 0.1 0.5 --fractions 0.05 0.2

Writes experiments/results/module_removal.{json,md} and module_removal_scores.png.
"""

import argparse
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
    forget_gap_closed,
    markdown_table,
    membership_inference,
    perplexity,
    plot_module_scores,
    score_examples,
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
DEMO = DemoSettings()
EVALUATION_BATCH_SIZE = 32
COLUMNS = (
    "method",
    "reset",
    "restore_steps",
    "forget_gap_closed",
    "mia_auc",
    "mia_moved",
    "retain_ppl_ratio",
    "seconds_over_retrain",
    "after_compile_over_retrain",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25])
    parser.add_argument("--no-progress", action="store_true")
    options = parser.parse_args()
    progress = not options.no_progress

    assets = ensure_defaults(options.cache_dir, progress=progress)
    tokenizer, splits = assets.tokenizer(), demo_data(assets, DEMO)
    examples, forget_people, forget_ids = splits.examples, splits.forget_people, splits.forget_ids
    data, retain, forget, held_out = splits.data, splits.retain, splits.forget, splits.held_out

    initial = attach_lora(assets.model(), DEMO.lora_settings(), key=jax.random.key(DEMO.seed))
    config = DEMO.train_config(len(data))
    print(f"Fine-tuning ({config.num_steps} steps)...", flush=True)
    original = finetune(nnx.clone(initial), data, config=config, progress=progress)
    print("Retraining without the forget people (the reference)...", flush=True)
    retrained = retrain(initial, retain, config=config, num_examples=len(data), progress=progress)
    retrain_seconds = retrained.history.wall_seconds
    retrain_after_compile = retrain_seconds - retrained.history.compile_seconds

    def evaluate(model):
        scored = {
            split: score_examples(model, split_data, batch_size=EVALUATION_BATCH_SIZE)
            for split, split_data in (("retain", retain), ("forget", forget), ("held", held_out))
        }
        auc = membership_inference(scored["forget"], scored["held"])["loss"].auc
        return {
            "forget_loss": float(np.mean(scored["forget"].losses)),
            "retain_ppl": perplexity(scored["retain"].losses),
            "mia_auc": auc,
        }

    reference = {"original": evaluate(original.model), "retrained": evaluate(retrained.model)}

    def row(name, figures, measured, seconds, after_compile):
        gap = forget_gap_closed(
            measured["forget_loss"],
            reference["original"]["forget_loss"],
            reference["retrained"]["forget_loss"],
        )
        auc_original, auc_retrained = (reference[k]["mia_auc"] for k in ("original", "retrained"))
        return {
            "method": name,
            **figures,
            "forget_gap_closed": gap,
            "mia_auc": measured["mia_auc"],
            "mia_moved": (measured["mia_auc"] - auc_original) / (auc_retrained - auc_original),
            "retain_ppl_ratio": measured["retain_ppl"] / reference["retrained"]["retain_ppl"],
            "seconds": seconds,
            "seconds_over_retrain": seconds / retrain_seconds,
            "after_compile_over_retrain": after_compile / retrain_after_compile,
        }

    rows = []
    with tempfile.TemporaryDirectory(prefix="module_removal-") as work:
        work = pathlib.Path(work)
        save_root_adapter(
            original.model,
            work / "original",
            provenance=assets.training_provenance(examples, data, config),
            ledger=work / DEFAULT_LEDGER_NAME,
            lora_settings=DEMO.lora_settings(),
        )
        context = open_context(
            work / "original", assets.model_dir, examples=examples, data=data, tokenizer=tokenizer
        )
        resolved = resolve_request(Removal(forget_ids), examples)

        # LLMEraser as the demo runs it: preparation, compilation, then the request.
        eraser, eraser_settings = LLMEraser(), DEMO.eraser_settings()
        eraser_settings = eraser.settle(eraser_settings, context)[0]
        started = time.perf_counter()
        prepared = eraser.prepare(context, eraser_settings)
        eraser.warm_up(context, resolved, eraser_settings, prepared)
        compiled = time.perf_counter()
        outcome = eraser.apply(context, resolved, eraser_settings, prepared)
        jax.block_until_ready(outcome.lora)
        finished = time.perf_counter()
        print(outcome.message, flush=True)
        rows.append(
            row(
                "llmeraser",
                {"reset": "", "restore_steps": ""},
                evaluate(_with(context.model, outcome.lora)),
                finished - started,
                finished - compiled,
            )
        )

        method = ModuleRemoval()
        grid = [
            ("reset", share, fraction) for share in options.shares for fraction in options.fractions
        ]
        grid += [("all", 1.0, fraction) for fraction in options.fractions]
        for restore, share, fraction in grid:
            settings = ModuleRemovalSettings(
                reset_share=share, restore=restore, restore_fraction=fraction, progress=progress
            )
            started = time.perf_counter()
            method.warm_up(context, resolved, settings, None)
            scoring_compiled = time.perf_counter()
            outcome = method.apply(context, resolved, settings, None)
            finished = time.perf_counter()
            figures = outcome.figures
            print(outcome.message, flush=True)
            name = "module removal" if restore == "reset" else "fresh modules everywhere"
            rows.append(
                row(
                    name,
                    {
                        "reset": f"{figures['reset_modules']}/{figures['modules']}",
                        "restore_steps": figures["restore_steps"],
                        "restore_fraction": fraction,
                    },
                    evaluate(_with(context.model, outcome.lora)),
                    finished - started,
                    finished - scoring_compiled - figures["restore_compile_seconds"],
                )
            )
            if (
                restore == "reset"
                and share == options.shares[0]
                and fraction == options.fractions[0]
            ):
                RESULTS.mkdir(exist_ok=True)
                plot_module_scores(
                    RESULTS / "module_removal_scores.png",
                    figures["module_scores"],
                    reset=figures["reset"],
                )

    report = {
        "data": {
            "train_examples": len(data),
            "forget_examples": len(forget),
            "forget_people": len(forget_people),
            "held_out_examples": len(held_out),
        },
        "reference": reference,
        "fine_tune_steps": config.num_steps,
        "retrain_seconds": retrain_seconds,
        "retrain_compile_seconds": retrained.history.compile_seconds,
        "rows": rows,
        "measured_at": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "module_removal.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    table = markdown_table(rows, COLUMNS)
    reference_table = markdown_table(
        [{"model": name, **figures} for name, figures in reference.items()],
        ("model", "forget_loss", "retain_ppl", "mia_auc"),
    )
    (RESULTS / "module_removal.md").write_text(
        "# Module removal against retraining on the embedded default\n\n"
        f"Forget set: {len(forget_people)} people ({len(forget)} of {len(data)} examples). "
        f"Retrain: {retrain_seconds:.1f} s with compilation, {retrain_after_compile:.1f} s "
        "after it. `seconds_over_retrain` counts compilation on both sides (LLMEraser's "
        "preparation included); `after_compile_over_retrain` neither.\n\n"
        f"{reference_table}\n\n{table}\n"
    )
    print(reference_table)
    print(table)


def _with(model, lora):
    updated = nnx.clone(model)
    nnx.update(updated, lora)
    return updated


if __name__ == "__main__":
    main()
