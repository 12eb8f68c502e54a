"""The `jaxunlearn` command.

    jaxunlearn make-data --people 200 --seed 0 --out corpus/
    jaxunlearn finetune --model base/ --data corpus/train.jsonl --out run/
    jaxunlearn defaults            # build (or show) the cached embedded default

Errors in the user's input (a missing file or column, a checkpoint that does not match, bad
settings) print one line naming the problem and exit with status 2, without a traceback.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

from jaxunlearn.data import DataError, TokenizerMismatchError
from jaxunlearn.models import LORA_TARGETS, CheckpointError, UnsupportedConfigError

USER_ERRORS = (
    DataError,
    TokenizerMismatchError,
    CheckpointError,
    UnsupportedConfigError,
    FileNotFoundError,
    FileExistsError,
    ValueError,
)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    options = parser.parse_args(argv)
    try:
        return options.run(options)
    except USER_ERRORS as error:
        print(f"jaxunlearn {options.command}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxunlearn",
        description="Machine unlearning for LoRA-adapted language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    make_data = commands.add_parser(
        "make-data",
        help="write a synthetic corpus of fictitious people with PII (JSONL files)",
        description="Write a seeded synthetic corpus of fictitious people: training, held-out "
        "and forget-split files, PII recall prompts, QA items for the truth ratio.",
    )
    make_data.add_argument("--people", type=int, required=True, help="people in the corpus")
    make_data.add_argument("--seed", type=int, required=True)
    make_data.add_argument("--out", required=True, help="output folder")
    make_data.add_argument("--held-out-fraction", type=float, default=0.1)
    make_data.add_argument("--public-people", type=int, default=0)
    make_data.add_argument("--canaries", type=int, default=0)
    make_data.add_argument("--canary-repeats", type=int, default=1)
    make_data.add_argument("--overwrite", action="store_true")
    make_data.set_defaults(run=_make_data)

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune LoRA adapters of a local checkpoint on a data file",
        description="Fine-tune LoRA adapters of a local Hugging Face checkpoint (config.json + "
        "safetensors) on prompt/response examples; writes the adapter, checkpoints and a "
        "training summary into --out.",
    )
    finetune.add_argument("--model", required=True, help="checkpoint folder")
    finetune.add_argument("--data", required=True, help="JSONL, CSV, Parquet or datasets dir")
    finetune.add_argument("--out", required=True, help="output folder")
    finetune.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    finetune.add_argument("--eval-data", help="examples for the periodic eval loss")
    finetune.add_argument("--prompt-column", default="prompt")
    finetune.add_argument("--response-column", default="response")
    finetune.add_argument("--id-column", default="id")
    finetune.add_argument("--max-length", type=int, help="default: the model's context")
    finetune.add_argument("--truncate", action="store_true", help="truncate long examples")
    finetune.add_argument("--rank", type=int, default=8)
    finetune.add_argument("--alpha", type=float, default=16.0)
    finetune.add_argument(
        "--targets",
        default="q_proj,v_proj",
        help=f"comma-separated projections among {','.join(LORA_TARGETS)}, or 'all'",
    )
    finetune.add_argument("--dropout", type=float, default=0.0)
    finetune.add_argument("--steps", type=int, default=100)
    finetune.add_argument("--batch-size", type=int, default=8)
    finetune.add_argument("--grad-accumulation", type=int, default=1)
    finetune.add_argument("--learning-rate", type=float, default=2e-4)
    finetune.add_argument("--warmup-steps", type=int, default=0)
    finetune.add_argument("--weight-decay", type=float, default=0.0)
    finetune.add_argument("--max-grad-norm", type=float, default=1.0)
    finetune.add_argument("--eval-every", type=int, default=50)
    finetune.add_argument("--checkpoint-every", type=int, default=50)
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--resume", action="store_true", help="continue from --out's checkpoints")
    finetune.add_argument("--no-progress", action="store_true")
    finetune.set_defaults(run=_finetune)

    defaults = commands.add_parser(
        "defaults",
        help="build (once) and show the embedded default tokenizer, model and corpus",
    )
    defaults.add_argument("--cache-dir", help="default: $JAXUNLEARN_CACHE or ~/.cache/jaxunlearn")
    defaults.set_defaults(run=_defaults)
    return parser


def _make_data(options) -> int:
    from jaxunlearn.data import make_data

    manifest = make_data(
        options.people,
        options.seed,
        options.out,
        held_out_fraction=options.held_out_fraction,
        num_public_people=options.public_people,
        canaries=options.canaries,
        canary_repeats=options.canary_repeats,
        overwrite=options.overwrite,
    )
    print(json.dumps({"out": os.fspath(options.out), **manifest.get("counts", {})}, indent=2))
    return 0


def _finetune(options) -> int:
    import jax

    from jaxunlearn.adapter import LoraSettings, attach_lora, save_lora
    from jaxunlearn.data import (
        check_tokenizer_fits,
        load_examples,
        load_tokenizer,
        tokenize_examples,
    )
    from jaxunlearn.models import load
    from jaxunlearn.train import TrainConfig, finetune

    out = pathlib.Path(options.out)
    adapter_dir = out / "adapter"
    if adapter_dir.exists() and not options.resume:
        raise FileExistsError(f"{adapter_dir} exists; choose another --out or pass --resume")
    targets = LORA_TARGETS if options.targets == "all" else tuple(options.targets.split(","))
    settings = LoraSettings(
        rank=options.rank, alpha=options.alpha, targets=targets, dropout=options.dropout
    )
    config = TrainConfig(
        learning_rate=options.learning_rate,
        warmup_steps=options.warmup_steps,
        num_steps=options.steps,
        batch_size=options.batch_size,
        grad_accumulation=options.grad_accumulation,
        max_grad_norm=options.max_grad_norm,
        weight_decay=options.weight_decay,
        eval_every=options.eval_every,
        checkpoint_every=options.checkpoint_every,
        seed=options.seed,
    )
    model = load(options.model)
    tokenizer = load_tokenizer(options.tokenizer or options.model)
    check_tokenizer_fits(tokenizer, model.config)
    max_length = options.max_length or model.config.max_position_embeddings
    columns = dict(
        prompt_column=options.prompt_column,
        response_column=options.response_column,
        id_column=options.id_column,
    )

    def tokenized(source):
        examples = load_examples(source, **columns)
        return tokenize_examples(
            examples, tokenizer, max_length=max_length, truncate=options.truncate
        )

    train_data = tokenized(options.data)
    eval_data = tokenized(options.eval_data) if options.eval_data else None
    attach_lora(model, settings, key=jax.random.key(options.seed))
    start = time.perf_counter()
    result = finetune(
        model,
        train_data,
        config=config,
        eval_data=eval_data,
        checkpoint_dir=out / "checkpoints",
        resume=options.resume,
        progress=not options.no_progress,
    )
    seconds = time.perf_counter() - start
    description = {
        "base_model": os.path.abspath(options.model),
        "data": os.path.abspath(options.data),
        "example_ids": list(train_data.ids),
        "train_config": dataclasses.asdict(config),
    }
    if adapter_dir.exists():  # a resumed run that had already finished
        print(f"{adapter_dir} already holds the adapter of this run", file=sys.stderr)
    else:
        save_lora(model, adapter_dir, settings=settings, description=description)
    history = result.history
    summary = {
        "adapter": os.fspath(adapter_dir),
        "examples": len(train_data),
        "steps": config.num_steps,
        "final_loss": history.losses[-1] if history.losses else None,
        "eval_losses": history.eval_losses,
        "seconds": seconds,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def _defaults(options) -> int:
    from jaxunlearn.defaults import ensure_defaults

    assets = ensure_defaults(options.cache_dir)
    print(
        json.dumps(
            {
                "root": os.fspath(assets.root),
                "tokenizer": os.fspath(assets.tokenizer_dir),
                "model": os.fspath(assets.model_dir),
                "corpus": os.fspath(assets.corpus_dir),
                "recipe": dataclasses.asdict(assets.recipe),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
