"""S3T on the embedded default: its quality against one fine-tune, and what a deletion costs.

Fine-tunes LoRA adapters once (the demo's recipe), trains an S3T ensemble of the same adapters
with the same recipe per stage (m shards of L slices, B slice orders per shard; the examples of
one person share a slice), and retrains the single adapter without the demo's forget people
(the reference). It then removes those people from the ensemble through `apply_request` twice,
as two branches of its lineage: by falling back (each model keeps the stages before the first
slice that held them; nothing is trained) and with `retrain=True` (the dropped stages are
trained again on what is left, so every shard keeps its whole prefix).

Reports, for the fine-tune, the retrain and the ensemble before and after each request: retain,
forget and held-out perplexity and the loss-based membership inference AUC (forget people
against held-out people; 0.5 is chance, where a model that never saw them sits); the request's
wall-clock against the retrain's; and the ensemble's training cost against one fine-tune's.
The ensemble serves the normalised geometric mean of its shard models' next-token
distributions (softmax of the mean of their log-probabilities).

    python experiments/s3t_vs_finetune.py                       # about 10 min on 2 CPU cores
    python experiments/s3t_vs_finetune.py --shards 4 --slices 4 --budget 2

Writes experiments/results/s3t_vs_finetune.{json,md}.
"""

import argparse
import json
import pathlib
import tempfile
import time

import jax
from flax import nnx

from jaxunlearn.adapter import attach_lora
from jaxunlearn.defaults import ensure_defaults
from jaxunlearn.demo import DemoSettings, demo_data
from jaxunlearn.eval import markdown_table, membership_inference, perplexity, score_examples
from jaxunlearn.train import finetune
from jaxunlearn.unlearn import (
    DEFAULT_LEDGER_NAME,
    EnsembleError,
    Removal,
    S3TSettings,
    Sources,
    StageRecipe,
    apply_request,
    open_ensemble,
    retrain,
    train_ensemble,
)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DEMO = DemoSettings()
EVALUATION_BATCH_SIZE = 32
COLUMNS = ("model", "retain_ppl", "forget_ppl", "held_out_ppl", "mia_auc_loss", "served_stages")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--budget", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=DEMO.epochs)
    parser.add_argument("--group-by", default="person_id")
    parser.add_argument("--no-progress", action="store_true")
    options = parser.parse_args()
    progress = not options.no_progress

    assets = ensure_defaults(options.cache_dir, progress=progress)
    splits = demo_data(assets, DEMO)
    examples, forget_people, forget_ids = splits.examples, splits.forget_people, splits.forget_ids
    data, retain, forget, held_out = splits.data, splits.retain, splits.forget, splits.held_out

    lora = DEMO.lora_settings()
    initial = attach_lora(assets.model(), lora, key=jax.random.key(DEMO.seed))
    config = DEMO.train_config(len(data))
    print(f"Fine-tuning once ({config.num_steps} steps)...", flush=True)
    single = finetune(nnx.clone(initial), data, config=config, progress=progress)
    print("Retraining without the forget people (the reference)...", flush=True)
    retrained = retrain(initial, retain, config=config, num_examples=len(data), progress=progress)

    models = {"finetune": single.model, "retrained": retrained.model}
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        print(
            f"Training S3T: {options.shards} shards x {options.slices} slices, budget "
            f"{options.budget}...",
            flush=True,
        )
        trained = train_ensemble(
            nnx.clone(initial),
            examples,
            data,
            method="s3t",
            shards=options.shards,
            slices=options.slices,
            budget=options.budget,
            group_by=options.group_by,
            out=scratch / "ensemble",
            provenance=assets.training_provenance(examples, data, config),
            ledger=scratch / DEFAULT_LEDGER_NAME,
            lora_settings=lora,
            recipe=StageRecipe(train_config=config, epochs=options.epochs),
            progress=progress,
        )

        def serve(name, path):
            opened = open_ensemble(path, assets.model_dir)
            stages = [
                0 if order is None else opened.ensemble.models[shard][order].trained_stages
                for shard, order in enumerate(opened.ensemble.served())
            ]
            rows[name] = {"served_stages": " ".join(map(str, stages))}
            try:
                models[name] = opened.serving_model()
            except EnsembleError as error:  # every shard lost its first stage
                print(error, flush=True)

        # Before any request: a request purges the checkpoints that saw the removed examples,
        # also from the run it branches from, so the untouched ensemble is opened now.
        serve("s3t_before", trained.path)
        sources = Sources(
            base_model=assets.model_dir, data=assets.train_file, tokenizer=assets.tokenizer_dir
        )
        outcomes = {}
        for name, retrain_stages in (("s3t_fallback", False), ("s3t_retrain", True)):
            print(f"Removing the forget people ({name})...", flush=True)
            outcomes[name] = apply_request(
                Removal(forget_ids),
                adapter=trained.path,
                out=scratch / name,
                sources=sources,
                method="s3t",
                settings=S3TSettings(retrain=retrain_stages),
                ledger=trained.ledger,
                branch=True,
                progress=progress,
                log=lambda message: print(message, flush=True),
            )
            print(outcomes[name].message, flush=True)

        for name, outcome in outcomes.items():
            serve(name, outcome.adapter)
        for name, model in models.items():
            print(f"Scoring {name}...", flush=True)
            scored = {
                split: score_examples(model, split_data, batch_size=EVALUATION_BATCH_SIZE)
                for split, split_data in (
                    ("retain", retain),
                    ("forget", forget),
                    ("held_out", held_out),
                )
            }
            attack = membership_inference(scored["forget"], scored["held_out"])["loss"]
            rows.setdefault(name, {}).update(
                {f"{split}_ppl": perplexity(s.losses) for split, s in scored.items()}
                | {"mia_auc_loss": attack.auc}
            )

    finetune_seconds = single.history.wall_seconds
    retrain_seconds = retrained.history.wall_seconds - retrained.history.compile_seconds
    report = {
        "settings": {
            "shards": options.shards,
            "slices": options.slices,
            "budget": options.budget,
            "epochs": options.epochs,
            "group_by": options.group_by,
            "layer_groups": [list(group) for group in trained.ensemble.groups],
        },
        "data": {
            "train_examples": len(data),
            "forget_examples": len(forget),
            "forget_people": len(forget_people),
            "held_out_examples": len(held_out),
        },
        "models": [{"model": name, **row} for name, row in rows.items()],
        "cost": {
            "finetune_seconds_compilation_included": finetune_seconds,
            "s3t_training_seconds_compilation_included": trained.seconds,
            "s3t_training_over_finetune": trained.seconds / finetune_seconds,
            "s3t_stages": trained.stages,
            "s3t_examples_seen_over_finetune": trained.examples_seen
            / (config.num_steps * config.batch_size),
            "retrain_seconds": retrain_seconds,
            "retrain_compile_seconds": retrained.history.compile_seconds,
        }
        | {
            f"{name}_{key}": outcome.figures[key]
            for name, outcome in outcomes.items()
            for key in ("seconds", "stages_retrained", "checkpoints_invalidated")
        }
        | {
            f"{name}_over_retrain": outcome.figures["seconds"] / retrain_seconds
            for name, outcome in outcomes.items()
        },
        "measured_at": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "s3t_vs_finetune.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    table = markdown_table(report["models"], COLUMNS)
    cost = "\n".join(f"- {key}: {value:.4g}" for key, value in report["cost"].items())
    (RESULTS / "s3t_vs_finetune.md").write_text(
        f"# S3T against one fine-tune\n\n{json.dumps(report['settings'])}\n\n{table}\n\n{cost}\n"
    )
    print(table)
    print(cost)


if __name__ == "__main__":
    main()
