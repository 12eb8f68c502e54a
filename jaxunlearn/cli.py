"""The `jaxunlearn` command.

    jaxunlearn make-data --people 200 --seed 0 --out corpus/
    jaxunlearn finetune --model base/ --data corpus/train.jsonl --out run/
    jaxunlearn finetune --model base/ --data corpus/train.jsonl --out run/ \\
        --peft-adapter from-peft/ --save-format peft      # continue a PEFT adapter, write PEFT
    jaxunlearn unlearn --method llmeraser --model base/ --adapter run/adapter \\
        --data corpus/train.jsonl --forget person-00007/biography,person-00007/fact/email \\
        --out unlearned/                                  # records it in unlearn-ledger.jsonl
    jaxunlearn unlearn --method llmeraser --model base/ --peft-adapter from-peft/ \\
        --data corpus/train.jsonl --edit-responses corrections.jsonl --out corrected/ --json
    jaxunlearn demo                # fine-tune, unlearn, retrain and compare on the default
    jaxunlearn defaults            # build (or show) the cached embedded default

Errors in the user's input (a missing file or column, a checkpoint that does not match, bad
settings, unknown example ids, a request that conflicts with the ledger, a solve that diverged)
print one line naming the problem and exit with status 2, without a traceback; `unlearn` then
writes nothing: no adapter, no ledger entry, no preparation.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time

import kernels
from jaxunlearn.curvature import CURVATURE_KINDS
from jaxunlearn.data import DataError, TokenizerMismatchError
from jaxunlearn.models import (
    LORA_TARGETS,
    CheckpointError,
    PeftFormatError,
    UnsupportedConfigError,
)
from jaxunlearn.unlearn import MODES, SOLVERS, LedgerError, PreparationMismatchError, RequestError

USER_ERRORS = (
    DataError,
    TokenizerMismatchError,
    CheckpointError,
    UnsupportedConfigError,
    PeftFormatError,
    RequestError,
    LedgerError,
    PreparationMismatchError,
    kernels.SolverError,
    FileNotFoundError,
    FileExistsError,
    ValueError,
)

ADAPTER_FORMATS = ("jaxunlearn", "peft")
# What `unlearn --method` offers; each method is one branch of `_unlearn`.
METHODS = ("llmeraser",)
LEDGER_NAME = "unlearn-ledger.jsonl"

# PEFT's default LoRA targets per model type (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES
# mapping): GPT-2 has no q_proj/v_proj, its attention input projection is the fused c_attn.
_DEFAULT_TARGETS = {"gpt2": ("c_attn",)}
_FALLBACK_TARGETS = ("q_proj", "v_proj")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    options = parser.parse_args(argv)
    try:
        return options.run(options)
    except USER_ERRORS as error:
        # One line, whatever the message holds, so that scripts can log it as one record.
        message = " ".join(str(error).split())
        print(f"jaxunlearn {options.command}: error: {message}", file=sys.stderr)
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
    _add_data_arguments(finetune)
    finetune.add_argument("--out", required=True, help="output folder")
    finetune.add_argument("--eval-data", help="examples for the periodic eval loss")
    finetune.add_argument(
        "--peft-adapter",
        metavar="DIR",
        help="start from this PEFT LoRA adapter (adapter_config.json + "
        "adapter_model.safetensors) instead of fresh adapters; it brings its own rank, alpha, "
        "targets and dropout",
    )
    finetune.add_argument("--rank", type=int, help="LoRA rank of fresh adapters (default: 8)")
    finetune.add_argument("--alpha", type=float, help="LoRA alpha (default: 16)")
    finetune.add_argument(
        "--targets",
        help="comma-separated projections of the model's family, or 'all' (default: PEFT's "
        f"choice, q_proj,v_proj; c_attn for GPT-2). Llama: {','.join(LORA_TARGETS)}; GPT-2: "
        "c_attn,c_proj,c_fc; OPT: q_proj,k_proj,v_proj,out_proj,fc1,fc2",
    )
    finetune.add_argument("--dropout", type=float, help="adapter input dropout (default: 0)")
    finetune.add_argument(
        "--save-format",
        choices=ADAPTER_FORMATS,
        default="jaxunlearn",
        help="write --out/adapter as a jaxunlearn adapter (orbax, with its training "
        "description) or as a PEFT adapter that PeftModel.from_pretrained loads",
    )
    finetune.add_argument("--steps", type=int, default=100)
    finetune.add_argument("--batch-size", type=int, default=8)
    finetune.add_argument("--grad-accumulation", type=int, default=1)
    finetune.add_argument("--learning-rate", type=float, default=2e-4)
    finetune.add_argument("--warmup-steps", type=int, default=0)
    finetune.add_argument("--weight-decay", type=float, default=0.0)
    finetune.add_argument(
        "--l2-regularization",
        type=float,
        default=0.0,
        help="μ of an L2 penalty (μ/2)‖Θ‖² in the objective (unlearn reads it back)",
    )
    finetune.add_argument("--max-grad-norm", type=float, default=1.0)
    finetune.add_argument("--eval-every", type=int, default=50)
    finetune.add_argument("--checkpoint-every", type=int, default=50)
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--resume", action="store_true", help="continue from --out's checkpoints")
    finetune.add_argument("--no-progress", action="store_true")
    finetune.set_defaults(run=_finetune)

    unlearn = commands.add_parser(
        "unlearn",
        help="apply one unlearning request (remove or edit examples) to a LoRA adapter",
        description="Change a LoRA adapter as if some of its training examples had been removed "
        "or edited, write the new adapter to --out and record the request (by hashes, never "
        "text) in a ledger. A request the ledger already holds is a no-op; one that touches "
        "examples an earlier request removed is an error.",
    )
    unlearn.add_argument("--method", choices=METHODS, default="llmeraser", help="unlearning method")
    unlearn.add_argument("--model", required=True, help="base checkpoint folder")
    adapter = unlearn.add_mutually_exclusive_group(required=True)
    adapter.add_argument("--adapter", metavar="DIR", help="a jaxunlearn adapter (finetune's)")
    adapter.add_argument("--peft-adapter", metavar="DIR", help="a PEFT LoRA adapter")
    _add_data_arguments(
        unlearn, max_length_default="the adapter's recorded length, else the model's context"
    )
    request = unlearn.add_mutually_exclusive_group(required=True)
    request.add_argument("--forget", metavar="IDS", help="comma-separated example ids to remove")
    request.add_argument("--forget-file", metavar="FILE", help="example ids to remove, one a line")
    request.add_argument(
        "--edit-queries",
        metavar="FILE",
        help='JSONL of {"id": ..., "prompt": ...}: new prompts for these examples',
    )
    request.add_argument(
        "--edit-responses",
        metavar="FILE",
        help='JSONL of {"id": ..., "response": ...}: corrected responses for these examples',
    )
    unlearn.add_argument("--out", required=True, help="new adapter folder (must not exist)")
    unlearn.add_argument(
        "--save-format",
        choices=ADAPTER_FORMATS,
        help="format of --out (default: the input adapter's)",
    )
    unlearn.add_argument(
        "--ledger", metavar="FILE", help=f"request ledger (default: {LEDGER_NAME} beside --out)"
    )
    unlearn.add_argument(
        "--preparation",
        metavar="DIR",
        help="the request-independent curvature work: loaded if DIR exists, else computed and "
        "saved there for later requests on this adapter",
    )
    eraser = unlearn.add_argument_group(
        "LLMEraser settings", "defaults: jaxunlearn.unlearn.EraserSettings"
    )
    eraser.add_argument("--solver", choices=SOLVERS)
    eraser.add_argument("--mode", choices=MODES)
    eraser.add_argument("--curvature", choices=CURVATURE_KINDS)
    eraser.add_argument("--damping", type=float, help="λ (default: chosen from the spectrum)")
    eraser.add_argument(
        "--relative-damping", type=float, help="λ as a fraction of the largest eigenvalue"
    )
    eraser.add_argument("--sample-size", type=int, help="examples in the curvature sample")
    eraser.add_argument("--batch-size", type=int, help="rows per gradient/product batch")
    eraser.add_argument("--rank", type=int, help="eigenpairs of the lowrank solver")
    eraser.add_argument("--spectrum-steps", type=int, help="Lanczos steps of the damping choice")
    eraser.add_argument("--max-steps", type=int, help="iterations of cg, lissa and sgd")
    eraser.add_argument(
        "--l2-regularization",
        type=float,
        help="μ of the fine-tune's L2 penalty (default: the adapter's train_config, else 0)",
    )
    eraser.add_argument(
        "--leave-out-request",
        action="store_true",
        default=None,
        help="take the curvature without the request's examples (cg, lissa, sgd)",
    )
    eraser.add_argument("--seed", type=int)
    unlearn.add_argument(
        "--json", action="store_true", help="print a JSON summary to stdout (messages to stderr)"
    )
    unlearn.set_defaults(run=_unlearn)

    demo = commands.add_parser(
        "demo",
        help="run the whole job on the embedded default (a few minutes on a CPU)",
        description="Fine-tune the embedded default model on its synthetic corpus, remove a few "
        "people with LLMEraser, retrain without them as the reference, and compare the three "
        "adapters; writes report.json, report.md and plots into --out.",
    )
    demo.add_argument("--out", default="jaxunlearn-demo", help="report folder (./jaxunlearn-demo)")
    demo.add_argument("--cache-dir", help="default: $JAXUNLEARN_CACHE or ~/.cache/jaxunlearn")
    demo.add_argument("--seed", type=int, help="seeds the adapters and the data order (0)")
    demo.add_argument(
        "--json",
        action="store_true",
        help="print only the figures as JSON to stdout (per-example values stay in report.json)",
    )
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_demo)

    defaults = commands.add_parser(
        "defaults",
        help="build (once) and show the embedded default tokenizer, model and corpus",
    )
    defaults.add_argument("--cache-dir", help="default: $JAXUNLEARN_CACHE or ~/.cache/jaxunlearn")
    defaults.set_defaults(run=_defaults)
    return parser


def _add_data_arguments(
    parser: argparse.ArgumentParser, *, max_length_default: str = "the model's context"
) -> None:
    """The training data and how it is tokenized: shared so finetune and unlearn agree."""
    parser.add_argument("--data", required=True, help="JSONL, CSV, Parquet or datasets dir")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--response-column", default="response")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--max-length", type=int, help=f"default: {max_length_default}")
    parser.add_argument("--truncate", action="store_true", help="truncate long examples")


def _columns(options) -> dict[str, str]:
    return dict(
        prompt_column=options.prompt_column,
        response_column=options.response_column,
        id_column=options.id_column,
    )


def _tokenized(examples, tokenizer, *, max_length: int, truncate: bool):
    """Tokenizes examples as `finetune` trains on them.

    `unlearn` goes through here too: its gradients and curvature must see the very token ids
    (and padded lengths) the adapter was trained on.
    """
    from jaxunlearn.data import DEFAULT_BUCKETS, tokenize_examples

    return tokenize_examples(
        examples, tokenizer, max_length=max_length, buckets=DEFAULT_BUCKETS, truncate=truncate
    )


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

    from jaxunlearn.adapter import LoraSettings, attach_lora, lora_settings_of, save_lora
    from jaxunlearn.data import check_tokenizer_fits, load_examples, load_tokenizer
    from jaxunlearn.models import load, load_peft_adapter, lora_targets
    from jaxunlearn.train import TrainConfig, finetune

    out = pathlib.Path(options.out)
    adapter_dir = out / "adapter"
    if adapter_dir.exists() and not options.resume:
        raise FileExistsError(f"{adapter_dir} exists; choose another --out or pass --resume")
    fresh_settings = {
        "--rank": options.rank,
        "--alpha": options.alpha,
        "--targets": options.targets,
        "--dropout": options.dropout,
    }
    if options.peft_adapter:
        given = [flag for flag, value in fresh_settings.items() if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} describe fresh adapters; --peft-adapter brings its own "
                "rank, alpha, targets and dropout"
            )
    config = TrainConfig(
        learning_rate=options.learning_rate,
        warmup_steps=options.warmup_steps,
        num_steps=options.steps,
        batch_size=options.batch_size,
        grad_accumulation=options.grad_accumulation,
        max_grad_norm=options.max_grad_norm,
        weight_decay=options.weight_decay,
        l2_regularization=options.l2_regularization,
        eval_every=options.eval_every,
        checkpoint_every=options.checkpoint_every,
        seed=options.seed,
    )
    model = load(options.model)
    key = jax.random.key(options.seed)
    if options.peft_adapter:
        load_peft_adapter(model, options.peft_adapter, key=key)
        # Checked before training: a jaxunlearn adapter describes all adapters by one setting.
        settings = lora_settings_of(model) if options.save_format == "jaxunlearn" else None
    else:
        if options.targets == "all":
            targets = lora_targets(model)
        elif options.targets is None:
            targets = _DEFAULT_TARGETS.get(model.config.model_type, _FALLBACK_TARGETS)
        else:
            targets = tuple(t.strip() for t in options.targets.split(","))
        settings = LoraSettings(
            rank=8 if options.rank is None else options.rank,
            alpha=16.0 if options.alpha is None else options.alpha,
            targets=targets,
            dropout=0.0 if options.dropout is None else options.dropout,
        )
        # Before tokenizing: a target of another family should fail at once.
        attach_lora(model, settings, key=key)
    tokenizer = load_tokenizer(options.tokenizer or options.model)
    check_tokenizer_fits(tokenizer, model.config)
    max_length = options.max_length or model.config.max_position_embeddings

    def tokenized(source):
        examples = load_examples(source, **_columns(options))
        return _tokenized(examples, tokenizer, max_length=max_length, truncate=options.truncate)

    train_data = tokenized(options.data)
    eval_data = tokenized(options.eval_data) if options.eval_data else None
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
    if adapter_dir.exists():  # a resumed run that had already finished
        print(f"{adapter_dir} already holds the adapter of this run", file=sys.stderr)
    elif options.save_format == "peft":
        _save_peft(model, adapter_dir, base_model=os.path.abspath(options.model))
    else:
        description = {
            "base_model": os.path.abspath(options.model),
            "data": os.path.abspath(options.data),
            "example_ids": list(train_data.ids),
            # What `unlearn` needs to tokenize the data as it was trained on.
            "tokenization": {"max_length": train_data.max_length, "truncate": options.truncate},
            "train_config": dataclasses.asdict(config),
        }
        if options.peft_adapter:
            description["initial_peft_adapter"] = os.path.abspath(options.peft_adapter)
        save_lora(model, adapter_dir, settings=settings, description=description)
    history = result.history
    summary = {
        "adapter": os.fspath(adapter_dir),
        "adapter_format": options.save_format,
        "examples": len(train_data),
        "steps": config.num_steps,
        "final_loss": history.losses[-1] if history.losses else None,
        "eval_losses": history.eval_losses,
        "seconds": seconds,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def _save_peft(model, path: pathlib.Path, *, base_model: str | None) -> None:
    """Writes a PEFT adapter to a new directory, whole or not at all.

    `save_peft_adapter` replaces each file atomically; staging the directory beside its final
    name and renaming it makes the directory appear complete, like `save_lora`'s.
    """
    from jaxunlearn.models import save_peft_adapter

    if path.exists():
        raise FileExistsError(f"{path} already exists; save the adapter to a new path")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        save_peft_adapter(model, staging, base_model_name_or_path=base_model)
        os.rename(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unlearn(options) -> int:
    from jaxunlearn.adapter import load_lora, lora_settings_of, read_lora_settings, save_lora
    from jaxunlearn.data import check_tokenizer_fits, load_examples, load_tokenizer
    from jaxunlearn.models import load, load_peft_adapter
    from jaxunlearn.unlearn import Ledger, file_sha256, llmeraser, resolve_request

    out = pathlib.Path(options.out)
    ledger = Ledger(options.ledger or out.absolute().parent / LEDGER_NAME)
    request = _request(options)

    # The cheap checks first, so that a repeated or bad request costs no model loading.
    examples = load_examples(options.data, **_columns(options))
    previous = ledger.check(resolve_request(request, examples))
    if previous is not None:
        return _already_applied(options, previous, ledger)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out for the unlearned adapter")

    model = load(options.model)
    tokenizer = load_tokenizer(options.tokenizer or options.model)
    check_tokenizer_fits(tokenizer, model.config)
    if options.adapter:
        input_format = "jaxunlearn"
        lora_settings, _ = read_lora_settings(options.adapter)
        _, metadata = load_lora(model, options.adapter)
    else:
        input_format = "peft"
        load_peft_adapter(model, options.peft_adapter)
        lora_settings, metadata = None, {}
    save_format = options.save_format or input_format
    if save_format == "jaxunlearn" and lora_settings is None:
        lora_settings = lora_settings_of(model)

    _check_trained_on(examples, metadata, options)
    # The penalty the adapter was trained with is part of the objective LLMEraser inverts.
    trained_with = metadata.get("train_config", {}).get("l2_regularization", 0.0)
    settings = _eraser_settings(options, trained_l2_regularization=float(trained_with))
    tokenization = metadata.get("tokenization", {})
    max_length = (
        options.max_length or tokenization.get("max_length") or model.config.max_position_embeddings
    )
    truncate = options.truncate or bool(tokenization.get("truncate", False))
    data = _tokenized(examples, tokenizer, max_length=max_length, truncate=truncate)
    preparation, prepared_here = _preparation(options.preparation, model, data, settings)

    result = llmeraser(
        model,
        request,
        examples=examples,
        data=data,
        tokenizer=tokenizer,
        settings=settings,
        preparation=preparation,
        ledger=ledger,
    )
    if not result.applied:  # recorded by another process since the check above
        return _already_applied(options, result.previous, ledger)

    if save_format == "peft":
        _save_peft(model, out, base_model=_peft_base_model(options))
    else:
        description = {
            key: value for key, value in metadata.items() if key not in ("format", "lora")
        }
        description.setdefault("base_model", os.path.abspath(options.model))
        description.setdefault("data", os.path.abspath(options.data))
        # Removed ids are left out: an id can itself identify a person.
        description["example_ids"] = [example.id for example in result.resolved.examples_after]
        description["tokenization"] = {"max_length": data.max_length, "truncate": truncate}
        description["unlearning"] = [
            *metadata.get("unlearning", []),
            {
                "method": options.method,
                "kind": result.resolved.kind,
                "fingerprint": result.resolved.fingerprint,
                "num_examples": len(result.resolved.affected),
                "ledger": os.path.abspath(ledger.path),
            },
        ]
        save_lora(model, out, settings=lora_settings, description=description)
    figures = _finite(result.figures())
    if prepared_here:  # llmeraser was handed the preparation, so it counted no time for it
        figures["prepare_seconds"] = preparation.seconds
    adapter_path = os.path.abspath(out)
    entry = ledger.record(
        result.resolved,
        method=options.method,
        settings=dataclasses.asdict(settings),
        adapter=adapter_path,
        adapter_sha256=file_sha256(out),
        figures=figures,
    )
    if prepared_here:
        _save_preparation(preparation, options.preparation)
    if options.json:
        print(result.message, file=sys.stderr)
        summary = {
            "applied": True,
            "method": options.method,
            "kind": entry.kind,
            "fingerprint": entry.fingerprint,
            "num_examples": entry.num_examples,
            "adapter": adapter_path,
            "adapter_format": save_format,
            "adapter_sha256": entry.adapter_sha256,
            "ledger": os.path.abspath(ledger.path),
            "ledger_sequence": entry.sequence,
            "figures": figures,
        }
        print(json.dumps(summary, indent=2, allow_nan=False))
    else:
        print(result.message)
        print(
            f"Wrote {adapter_path} ({save_format}); recorded as entry {entry.sequence} of "
            f"{ledger.path}."
        )
    return 0


def _eraser_settings(options, *, trained_l2_regularization: float = 0.0):
    """`EraserSettings` from the flags given; the penalty defaults to the adapter's, the rest
    to the library's defaults."""
    from jaxunlearn.unlearn import EraserSettings

    names = (
        "solver",
        "mode",
        "curvature",
        "damping",
        "relative_damping",
        "sample_size",
        "batch_size",
        "rank",
        "spectrum_steps",
        "max_steps",
        "l2_regularization",
        "leave_out_request",
        "seed",
    )
    given = {name: getattr(options, name) for name in names if getattr(options, name) is not None}
    given.setdefault("l2_regularization", trained_l2_regularization)
    return EraserSettings(**given)


def _request(options):
    """The request the flags describe, read from its file where it has one."""
    from jaxunlearn.unlearn import QueryEdit, Removal, ResponseEdit

    if options.forget is not None:
        return Removal([item.strip() for item in options.forget.split(",") if item.strip()])
    if options.forget_file is not None:
        with open(options.forget_file, encoding="utf-8") as file:
            return Removal([line.strip() for line in file if line.strip()])
    if options.edit_queries is not None:
        return QueryEdit(_read_edits(options.edit_queries, "prompt"))
    return ResponseEdit(_read_edits(options.edit_responses, "response"))


def _read_edits(path: str, field: str) -> dict[str, str]:
    """Reads a JSONL file of `{"id": ..., field: ...}` objects into {id: new text}."""
    edits: dict[str, str] = {}
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not JSON ({error.msg})") from None
            if not isinstance(row, dict) or set(row) != {"id", field}:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(
                    f"{where}: expected an object with keys 'id' and {field!r}, got {keys}"
                )
            example_id, text = row["id"], row[field]
            # As load_examples reads an integer id column.
            if isinstance(example_id, int) and not isinstance(example_id, bool):
                example_id = str(example_id)
            if not isinstance(example_id, str) or not isinstance(text, str):
                raise DataError(f"{where}: 'id' and {field!r} must be strings")
            if example_id in edits:
                raise DataError(f"{where}: example {example_id!r} is edited twice")
            edits[example_id] = text
    if not edits:
        raise DataError(f"{path} holds no edits")
    return edits


def _check_trained_on(examples, metadata, options) -> None:
    """Refuses data that lacks examples a jaxunlearn adapter lists as trained on.

    The list is finetune's, less the examples removed by earlier requests; the data file is
    the original training set, which still holds those (LLMEraser reuses one preparation over
    a stream of requests on the same data). PEFT adapters list nothing to check against.
    """
    adapter_ids = metadata.get("example_ids")
    if adapter_ids is None:
        return
    present = {example.id for example in examples}
    missing = [example_id for example_id in adapter_ids if example_id not in present]
    if missing:
        raise DataError(
            f"{options.data} lacks {len(missing)} of the {len(adapter_ids)} examples the adapter "
            f"was trained on (e.g. {missing[0]!r}); pass the adapter's training data and its "
            "column options"
        )


def _preparation(path, model, data, settings):
    """The preparation at `path` when it exists, else a new one (None without `path`).

    Returns:
        `(preparation, prepared_here)`: `prepared_here` says it is new and should be saved to
        `path` once the request succeeded.
    """
    from jaxunlearn.unlearn import (
        PreparationMismatchError,
        load_preparation,
        prepare_llmeraser,
    )

    if path is None:
        return None, False
    if not os.path.exists(path):
        return prepare_llmeraser(model, data, settings=settings), True
    preparation = load_preparation(path, model)
    # llmeraser would silently use the preparation's values of these; refuse instead, so that a
    # flag the user gave is never ignored.
    prepared, wanted = preparation.settings.preparation_key(), settings.preparation_key()
    if settings.solver != "lowrank" or preparation.eigenpairs is None:
        # The rank matters only to the low-rank solve (which fails itself without eigenpairs).
        del prepared["rank"], wanted["rank"]
    differing = sorted(name for name in wanted if prepared[name] != wanted[name])
    if differing:
        shown = ", ".join(
            f"{name}={prepared[name]!r} (asked {wanted[name]!r})" for name in differing
        )
        raise PreparationMismatchError(
            f"{path} was prepared with {shown}; pass the same settings or another --preparation"
        )
    return preparation, False


def _save_preparation(preparation, path) -> None:
    """Saves a new preparation; failing to is a warning, as the request is already recorded."""
    from jaxunlearn.unlearn import save_preparation

    try:
        save_preparation(preparation, path)
    except (OSError, ValueError) as error:
        message = " ".join(str(error).split())
        print(
            f"jaxunlearn unlearn: warning: preparation not saved to {path}: {message}",
            file=sys.stderr,
        )


def _already_applied(options, previous, ledger) -> int:
    message = (
        f"This request was already applied (ledger {ledger.path}, entry {previous.sequence}, "
        f"{previous.method}, {previous.created}, adapter {previous.adapter}); nothing to do."
    )
    if options.json:
        print(message, file=sys.stderr)
        summary = {
            "applied": False,
            "fingerprint": previous.fingerprint,
            "adapter": previous.adapter,
            "ledger": os.path.abspath(ledger.path),
            "ledger_sequence": previous.sequence,
        }
        print(json.dumps(summary, indent=2))
    else:
        print(message)
    return 0


def _peft_base_model(options) -> str:
    """The base model a PEFT output names: the input adapter's own, else the --model folder."""
    if options.peft_adapter:
        config_file = pathlib.Path(options.peft_adapter) / "adapter_config.json"
        named = json.loads(config_file.read_text()).get("base_model_name_or_path")
        if named:
            return named
    return os.path.abspath(options.model)


def _finite(value):
    """`value` with NaN and infinities as None: strict JSON, and what the ledger accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _demo(options) -> int:
    from jaxunlearn.demo import DemoSettings, run_demo, summary_table

    settings = DemoSettings() if options.seed is None else DemoSettings(seed=options.seed)
    out = pathlib.Path(options.out)
    if options.json:
        # stdout carries the JSON alone; progress bars already go to stderr.
        def log(line: str) -> None:
            print(line, file=sys.stderr)
    else:
        log = print
    figures = run_demo(
        out,
        settings=settings,
        cache_dir=options.cache_dir,
        progress=not options.no_progress,
        log=log,
    )
    if options.json:
        headline = {key: value for key, value in figures.items() if key != "per_example"}
        print(json.dumps(_finite(headline), indent=2, allow_nan=False))
    else:
        print(summary_table(figures))
        print(f"Report: {out / 'report.md'} (every figure in {out / 'report.json'})")
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
