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
    jaxunlearn plan --model Llama-2-13B --mesh fsdp=8 --batch 8   # memory, before a pod
    jaxunlearn simulate-deletions --shards 5 --slices 6 --budget 1 --budget 6 --sisa --out rate/
    jaxunlearn audit --model base/ --data corpus/train.jsonl --forget-file forget.txt \\
        --positive unlearned-*/ --negative retrained-*/ --out audit/   # a lower bound on ε
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
import os
import pathlib
import sys
import time

from jaxunlearn import kernels
from jaxunlearn._settings_flags import add_settings_flags, settings_from_flags
from jaxunlearn._strict_json import finite, strict_dumps
from jaxunlearn.errors import SettingsError, UserError
from jaxunlearn.models import LORA_TARGETS, shipped_config_names

# What `plan` compiles, for its --help: `jaxunlearn.plan.PROGRAMS`, which the tests keep equal
# (importing that module, with training and orbax, would add 0.3 s to every start).
PLAN_PROGRAMS = ("train_step", "gradient", "hessian_product", "gauss_newton_product", "cg_step")

# A user's mistake prints one line and exits 2; anything else is a bug and keeps its traceback.
# OS errors about the files a user named (missing, existing, not a folder, no permission) are
# the user's to fix too.
USER_ERRORS = (
    UserError,
    kernels.SolverError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

# The demo's recipe, with which LLMEraser's default Newton step closes most of the forget gap.
# Influence updates assume the adapter minimizes the penalized objective, so the default
# fine-tune trains long enough to get near that minimum. Measured on the embedded default
# (experiments/cli_defaults_vs_retrain.py): adapters of rank 8 on q_proj and v_proj only (PEFT's
# default), trained the same way, let the same request close 0.53 of the forget gap instead of
# 0.65.
DEFAULT_L2_REGULARIZATION = 1e-2
DEFAULT_EPOCHS = 24.0
DEFAULT_LEARNING_RATE = 1e-2
DEFAULT_BATCH_SIZE = 32
DEFAULT_RANK = 32
DEFAULT_ALPHA = 32.0
DEFAULT_METHOD = "llmeraser"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(_method_asked(argv))
    options = parser.parse_args(argv)
    try:
        return options.run(options)
    except USER_ERRORS as error:
        # One line, whatever the message holds, so that scripts can log it as one record.
        message = " ".join(str(error).split())
        print(f"jaxunlearn {options.command}: error: {message}", file=sys.stderr)
        return 2


def _method_asked(argv: list[str]) -> str:
    """The `--method` of an `unlearn` command line (its flags depend on it)."""
    if not argv or argv[0] != "unlearn":
        return DEFAULT_METHOD
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=DEFAULT_METHOD)
    known, _ = pre.parse_known_args(argv[1:])
    return known.method


def _parser(method: str = DEFAULT_METHOD) -> argparse.ArgumentParser:
    from jaxunlearn.eval import AUDIT_DIRECTIONS, AUDIT_STATISTICS
    from jaxunlearn.unlearn import ADAPTER_FORMATS, get_method, method_names

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
    finetune.add_argument(
        "--rank", type=int, help=f"LoRA rank of fresh adapters (default: {DEFAULT_RANK})"
    )
    finetune.add_argument("--alpha", type=float, help=f"LoRA alpha (default: {DEFAULT_ALPHA:g})")
    finetune.add_argument(
        "--targets",
        help="comma-separated projections of the model's family, or 'all' (default: all). "
        f"Llama: {','.join(LORA_TARGETS)}; GPT-2: c_attn,c_proj,c_fc; OPT: "
        "q_proj,k_proj,v_proj,out_proj,fc1,fc2",
    )
    finetune.add_argument("--dropout", type=float, help="adapter input dropout (default: 0)")
    finetune.add_argument(
        "--save-format",
        choices=ADAPTER_FORMATS,
        default="jaxunlearn",
        help="write --out/adapter as a jaxunlearn adapter (orbax, with its training "
        "description) or as a PEFT adapter that PeftModel.from_pretrained loads",
    )
    length = finetune.add_mutually_exclusive_group()
    length.add_argument(
        "--epochs",
        type=float,
        default=DEFAULT_EPOCHS,
        help="passes over the data (default: %(default)s, near the minimum that unlearning "
        "assumes; lower it, or pass --steps, for large data)",
    )
    length.add_argument("--steps", type=int, help="optimizer steps, instead of --epochs")
    finetune.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="default: %(default)s"
    )
    finetune.add_argument("--grad-accumulation", type=int, default=1)
    finetune.add_argument(
        "--learning-rate",
        type=float,
        default=DEFAULT_LEARNING_RATE,
        help="peak AdamW learning rate (default: %(default)s, measured on the embedded default; "
        "large models usually want 1e-4 to 3e-4)",
    )
    finetune.add_argument("--warmup-steps", type=int, help="default: 10%% of the steps")
    finetune.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batch examples of similar length together, for less padding (default: on)",
    )
    finetune.add_argument("--weight-decay", type=float, default=0.0)
    finetune.add_argument(
        "--l2-regularization",
        type=float,
        default=DEFAULT_L2_REGULARIZATION,
        help="μ of an L2 penalty (μ/2)‖Θ‖² in the objective, so that the adapter is the "
        "minimizer influence updates assume; unlearn reads it back (default: %(default)s; "
        "0 trains without it, at the cost of much weaker unlearning)",
    )
    finetune.add_argument("--max-grad-norm", type=float, default=1.0)
    finetune.add_argument("--eval-every", type=int, default=50)
    finetune.add_argument("--checkpoint-every", type=int, default=50)
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--resume", action="store_true", help="continue from --out's checkpoints")
    finetune.add_argument(
        "--ledger",
        metavar="FILE",
        help="the ledger that records the adapter's lineage (default: --out/unlearn-ledger.jsonl)",
    )
    sharded = finetune.add_argument_group(
        "exact unlearning by construction",
        "--method s3t trains, per shard, B models whose stages each train one layer group "
        "(top-down) on one more slice; --method sisa trains one model per shard, all adapters, "
        "slice by slice. --out/ensemble then holds every stage's checkpoint, and `jaxunlearn "
        "unlearn --method s3t|sisa --adapter OUT/ensemble` serves requests from them.",
    )
    sharded.add_argument(
        "--method",
        choices=("single", "s3t", "sisa"),
        default="single",
        help="one adapter (default), or an S3T or SISA ensemble",
    )
    sharded.add_argument("--shards", type=int, help="shards m (s3t, sisa)")
    sharded.add_argument("--slices", type=int, help="slices per shard L; S3T: also layer groups")
    sharded.add_argument(
        "--budget", type=int, help="S3T: slice orders trained per shard B (default: 1)"
    )
    sharded.add_argument(
        "--group-by",
        metavar="FIELD",
        help="keep the examples sharing this metadata field (such as person_id) in one slice, "
        "so erasing one person touches one slice",
    )
    _add_mesh_argument(finetune)
    finetune.add_argument("--no-progress", action="store_true")
    finetune.set_defaults(run=_finetune)

    unlearn = commands.add_parser(
        "unlearn",
        help="apply one unlearning request (remove or edit examples) to a LoRA adapter",
        description="Change a LoRA adapter as if some of its training examples had been removed "
        "or edited, write the new adapter to --out and record the request (keyed hashes, never "
        "text) in the lineage's ledger. The base model, tokenizer and data are checked against "
        "the adapter's provenance first; a request already applied on the adapter's lineage is "
        "a no-op; an update that changes nothing or makes the objective after the request "
        "worse is refused and nothing is written.",
    )
    unlearn.add_argument(
        "--method",
        choices=method_names(),
        default=DEFAULT_METHOD,
        help="unlearning method (its settings below; `--method NAME --help` shows another's)",
    )
    unlearn.add_argument("--model", required=True, help="base checkpoint folder")
    adapter = unlearn.add_mutually_exclusive_group(required=True)
    adapter.add_argument(
        "--adapter",
        metavar="DIR",
        help="a jaxunlearn adapter (finetune's), or an S3T/SISA ensemble (--method s3t|sisa)",
    )
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
        "--ledger",
        metavar="FILE",
        help="the lineage's ledger (default: the one the adapter's provenance names, else "
        "unlearn-ledger.jsonl beside the adapter); its key is FILE.key",
    )
    unlearn.add_argument(
        "--preparation",
        metavar="DIR",
        help="the method's request-independent work: loaded (and checked against this "
        "adapter) if DIR exists, else computed and saved there",
    )
    unlearn.add_argument(
        "--branch",
        action="store_true",
        help="apply to the adapter given even when requests were already applied to it "
        "(default: to the newest adapter of its lineage, so no deletion is undone)",
    )
    unlearn.add_argument(
        "--allow-edited-removal",
        action="store_true",
        help="allow removing examples that an earlier request edited",
    )
    unlearn.add_argument(
        "--skip-check",
        action="append",
        choices=("base_model", "tokenizer", "data"),
        default=[],
        help="do not check this artifact against the adapter's provenance (repeatable)",
    )
    unlearn.add_argument(
        "--purge",
        action="store_true",
        help="delete what still holds the removed data: earlier adapters of the lineage, the "
        "fine-tune's checkpoints, earlier preparations (without it they are listed)",
    )
    # An unknown --method gets the default's flags here; argparse then names the bad choice.
    chosen = get_method(method if method in method_names() else DEFAULT_METHOD)
    flags = unlearn.add_argument_group(
        f"{chosen.name} settings",
        f"{chosen.description} (jaxunlearn.unlearn.{chosen.settings_type.__name__})",
    )
    add_settings_flags(flags, chosen.settings_type)
    _add_mesh_argument(unlearn, batch="the curvature --batch-size")
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
    _add_mesh_argument(demo, batch="every batch size of the recipe (8, 32, 64)", distributed=False)
    demo.set_defaults(run=_demo)

    plan = commands.add_parser(
        "plan",
        help="compile a configuration's programs ahead of time and say whether they fit",
        description="Builds the model, its LoRA adapters and a batch as abstract arrays (no "
        "weights are read or allocated), compiles the training step, the gradient, the Hessian "
        "and Gauss-Newton products and one CG step for the mesh, and prints per device the "
        "memory (arguments, outputs, temporaries), the FLOPs and the collectives of each, with "
        "a verdict against one device's memory. Without enough accelerators it compiles for "
        "fake CPU devices, whose figures for bfloat16 models are upper bounds. Exit status 0 "
        "when everything fits, 1 when something does not.",
    )
    plan.add_argument(
        "--model",
        required=True,
        help="a checkpoint folder or config.json, or a shipped architecture: "
        + ", ".join(shipped_config_names()),
    )
    plan.add_argument(
        "--mesh",
        default="fsdp=1",
        metavar="SPEC",
        help="AXIS=SIZE items over data, fsdp and tensor (e.g. 'fsdp=4,tensor=2'), or 'auto' "
        "for every visible device on fsdp (default: one device)",
    )
    plan.add_argument("--batch", type=int, default=4, help="rows per batch (4)")
    plan.add_argument("--length", type=int, default=2048, help="tokens per row (2048)")
    plan.add_argument("--rank", type=int, default=64, help="LoRA rank (64)")
    plan.add_argument(
        "--targets", default="q_proj,k_proj,v_proj,o_proj", help="LoRA targets, comma-separated"
    )
    plan.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    plan.add_argument(
        "--no-remat", action="store_true", help="keep every layer's activations (no remat)"
    )
    plan.add_argument(
        "--vocab-chunk",
        type=int,
        metavar="N",
        help="width of the loss's vocabulary chunks (default: the models' 8192; 0: whole logits)",
    )
    plan.add_argument(
        "--device-memory",
        type=float,
        metavar="GIB",
        help="one device's memory in GiB (default: what the device reports, else 80)",
    )
    plan.add_argument(
        "--programs", help="comma-separated subset of " + ", ".join(PLAN_PROGRAMS) + " (all)"
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON to stdout")
    plan.set_defaults(run=_plan)

    simulate = commands.add_parser(
        "simulate-deletions",
        help="simulate how many deletions S3T (and SISA) absorb before no shard has a model",
        description="Monte Carlo of S3T's deletion rate: m shards of L slices, B slice orders "
        "per shard; a deletion takes every model of its shard back to the stage before the "
        "slice it hits, and a trial counts deletions until no shard has a model left. Prints "
        "each budget's mean ± standard error beside the exact expectation; with --out, writes "
        "deletion-rate.json and deletion-rate.png there.",
    )
    simulate.add_argument("--shards", type=int, default=5, help="shards m (5)")
    simulate.add_argument("--slices", type=int, default=6, help="slices per shard L (6)")
    simulate.add_argument(
        "--budget",
        type=int,
        action="append",
        metavar="B",
        help="orders per shard, repeatable (default: every budget 1..L)",
    )
    simulate.add_argument("--sisa", action="store_true", help="add SISA (one model per shard)")
    simulate.add_argument(
        "--prior",
        metavar="PROBS",
        help="per-slice deletion weights: comma-separated (one per slice of a shard) or a JSON "
        "file (a list of L numbers, or m lists of L); relative, divided by their sum "
        "(default: uniform)",
    )
    simulate.add_argument(
        "--selection",
        choices=("cyclic", "prior-aware"),
        default="cyclic",
        help="how the orders are chosen: the first B right-rotations, or bipartite matching "
        "on the prior (cyclic)",
    )
    simulate.add_argument("--trials", type=int, default=10_000, help="trials per row (10000)")
    simulate.add_argument("--seed", type=int, default=0, help="seeds every row (0)")
    simulate.add_argument("--out", help="folder for deletion-rate.json and deletion-rate.png")
    simulate.add_argument(
        "--json", action="store_true", help="print the figures as JSON alone on stdout"
    )
    simulate.set_defaults(run=_simulate_deletions)

    audit = commands.add_parser(
        "audit",
        help="a lower bound on ε: how well unlearned adapters can be told from retrained ones",
        description="An empirical ε audit: one distinguisher score per adapter (the mean "
        "membership score of the forget set under it), unlearned adapters (--positive, one per "
        "seed) against retrained ones (--negative), and the Clopper-Pearson lower bound on ε "
        "with Pr[unlearned in S] <= e^ε Pr[retrained in S] + δ, valid at confidence 1 - α. "
        "Every threshold is searched (the confidence split over them) unless --threshold fixes "
        "one chosen beforehand. Writes audit.json, audit.md and audit.png into --out.",
    )
    audit.add_argument(
        "--positive",
        nargs="+",
        metavar="DIR",
        help="unlearned adapters, one per seed (jaxunlearn or PEFT adapters, S3T/SISA ensembles)",
    )
    audit.add_argument("--negative", nargs="+", metavar="DIR", help="retrained adapters")
    audit.add_argument(
        "--scores",
        metavar="FILE",
        help='audit scores computed elsewhere instead: JSON {"positives": [...], '
        '"negatives": [...]}, one number per model, higher meaning more member-like',
    )
    audit.add_argument("--model", help="base checkpoint folder (with --positive/--negative)")
    _add_data_arguments(audit, data_required=False)
    forget = audit.add_mutually_exclusive_group()
    forget.add_argument("--forget", metavar="IDS", help="comma-separated ids of the forget set")
    forget.add_argument("--forget-file", metavar="FILE", help="ids of the forget set, one a line")
    audit.add_argument(
        "--statistic",
        choices=AUDIT_STATISTICS,
        default="loss",
        help="the per-adapter score: the mean of this attack's per-example score (loss)",
    )
    audit.add_argument("--batch-size", type=int, default=32, help="rows per scoring batch (32)")
    audit.add_argument("--alpha", type=float, default=0.05, help="1 - confidence (0.05)")
    audit.add_argument("--delta", type=float, default=0.0, help="the δ of (ε, δ) (0)")
    audit.add_argument(
        "--threshold",
        type=float,
        help="one threshold fixed before seeing these scores (e.g. on held-out seeds)",
    )
    audit.add_argument(
        "--direction",
        choices=AUDIT_DIRECTIONS,
        help="with --threshold: unlearned predicted when the score is >= it (high) or <= it "
        "(low) (default: both, the confidence split over the two)",
    )
    audit.add_argument("--name", default="audit", help="the audit's name in the report")
    audit.add_argument("--out", help="folder for audit.json, audit.md and audit.png")
    audit.add_argument(
        "--json", action="store_true", help="print the audit as JSON alone on stdout"
    )
    audit.set_defaults(run=_audit)

    defaults = commands.add_parser(
        "defaults",
        help="build (once) and show the embedded default tokenizer, model and corpus",
    )
    defaults.add_argument("--cache-dir", help="default: $JAXUNLEARN_CACHE or ~/.cache/jaxunlearn")
    defaults.set_defaults(run=_defaults)
    return parser


def _plan(options) -> int:
    import math

    from jaxunlearn import plan as planning
    from jaxunlearn.models import architecture_config
    from jaxunlearn.parallel import make_mesh, mesh_from_spec, mesh_sizes

    if options.device_memory is not None and not options.device_memory > 0:
        raise SettingsError(f"--device-memory must be > 0 GiB, got {options.device_memory}.")
    sizes = None if options.mesh.strip() == "auto" else mesh_sizes(options.mesh)
    if sizes is not None:
        # Fake CPU devices stand in for missing accelerators; JAX reads these flags when it
        # starts its backends, which nothing in this process has done yet.
        count = math.prod(sizes.values())
        os.environ["XLA_FLAGS"] = planning.cpu_planning_flags(
            count, os.environ.get("XLA_FLAGS", "")
        )
    config = architecture_config(options.model)
    settings = planning.PlanSettings(
        batch_size=options.batch,
        length=options.length,
        rank=options.rank,
        targets=tuple(t.strip() for t in options.targets.split(",") if t.strip()),
        dtype=options.dtype,
        remat=not options.no_remat,
        **({} if options.vocab_chunk is None else {"vocab_chunk": options.vocab_chunk or None}),
    )
    if sizes is None:
        mesh = mesh_from_spec("auto")
    else:
        mesh = make_mesh(**sizes, devices=planning.planning_devices(count))
    programs = PLAN_PROGRAMS
    if options.programs:
        programs = tuple(p.strip() for p in options.programs.split(",") if p.strip())
    result = planning.plan(
        config,
        mesh,
        settings=settings,
        name=options.model,
        device_memory_bytes=None
        if options.device_memory is None
        else int(options.device_memory * planning.GiB),
        programs=programs,
        progress=lambda name: print(f"compiling {name} ...", file=sys.stderr, flush=True),
    )
    if options.json:
        print(json.dumps(finite(result.to_json()), indent=2))
    else:
        print(result.table())
    return 0 if result.fits else 1


def _simulate_deletions(options) -> int:
    from jaxunlearn.unlearn import deletion_rate_study, read_prior, write_deletion_rate_report

    budgets = range(1, options.slices + 1) if options.budget is None else options.budget
    study = deletion_rate_study(
        num_shards=options.shards,
        num_slices=options.slices,
        budgets=budgets,
        sisa=options.sisa,
        prior=None if options.prior is None else read_prior(options.prior),
        selection=options.selection,
        trials=options.trials,
        seed=options.seed,
    )
    written = () if options.out is None else write_deletion_rate_report(study, options.out)
    if options.json:
        print(strict_dumps(study.to_json(), indent=2))
    else:
        print(study.table())
        for path in written:
            print(f"Wrote {path}")
    return 0


def _audit(options) -> int:
    from jaxunlearn.eval import (
        adapter_statistics,
        epsilon_lower_bound,
        read_audit_scores,
        write_audit_report,
    )

    # Refused before any adapter is scored (minutes on a large model), not after.
    if options.direction is not None and options.threshold is None:
        raise SettingsError("--direction goes with --threshold (a search tries both)")
    adapters = {"--positive": options.positive, "--negative": options.negative}
    if options.scores is not None:
        given = [flag for flag, value in adapters.items() if value]
        if given:
            raise SettingsError(f"--scores audits given scores; {' and '.join(given)} too")
        positives, negatives = read_audit_scores(options.scores)
    else:
        missing = [flag for flag, value in adapters.items() if not value]
        if missing:
            raise SettingsError(f"{' and '.join(missing)} needed (adapters), or --scores FILE")
        forget = _forget_set(options)
        batch = dict(base_model=options.model, statistic=options.statistic)
        batch["batch_size"] = options.batch_size
        positives = adapter_statistics(options.positive, forget, **batch)
        negatives = adapter_statistics(options.negative, forget, **batch)
    result = epsilon_lower_bound(
        positives,
        negatives,
        alpha=options.alpha,
        delta=options.delta,
        threshold=options.threshold,
        direction=options.direction,
    )
    written = {}
    if options.out is not None:
        written = write_audit_report(
            {options.name: result}, options.out, scores={options.name: (positives, negatives)}
        )
    if options.json:
        summary = {
            "name": options.name,
            "statistic": None if options.scores else options.statistic,
            **result.to_json(),
            "positive_scores": [float(value) for value in positives],
            "negative_scores": [float(value) for value in negatives],
            "written": {kind: os.fspath(path) for kind, path in written.items()},
        }
        print(strict_dumps(summary, indent=2))
    else:
        print(result.summary())
        for path in written.values():
            print(f"Wrote {path}")
    return 0


def _forget_set(options):
    """The forget set `--forget`/`--forget-file` names, tokenized as `finetune` trains."""
    from jaxunlearn.data import check_tokenizer_fits, load_examples, load_tokenizer
    from jaxunlearn.models import load_config
    from jaxunlearn.unlearn import Removal, read_removal, resolve_request

    needed = {"--model": options.model, "--data": options.data}
    needed["--forget or --forget-file"] = options.forget or options.forget_file
    missing = [flag for flag, value in needed.items() if not value]
    if missing:
        raise SettingsError(f"scoring adapters needs {', '.join(missing)}")
    if options.forget is not None:
        request = Removal([item.strip() for item in options.forget.split(",") if item.strip()])
    else:
        request = read_removal(options.forget_file)
    examples = load_examples(options.data, **_columns(options))
    affected = resolve_request(request, examples).affected
    config = load_config(options.model)
    tokenizer = load_tokenizer(options.tokenizer or options.model)
    check_tokenizer_fits(tokenizer, config)
    max_length = options.max_length or config.max_position_embeddings
    return _tokenized(affected, tokenizer, max_length=max_length, truncate=options.truncate)


def _add_data_arguments(
    parser: argparse.ArgumentParser,
    *,
    max_length_default: str = "the model's context",
    data_required: bool = True,
) -> None:
    """The training data and how it is tokenized: shared so finetune and unlearn agree."""
    parser.add_argument(
        "--data", required=data_required, help="JSONL, CSV, Parquet or datasets dir"
    )
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


def _add_mesh_argument(
    parser: argparse.ArgumentParser, *, batch: str = "the batch size", distributed: bool = True
) -> None:
    parser.add_argument(
        "--mesh",
        metavar="SPEC",
        help="run on a device mesh: AXIS=SIZE items over data, fsdp and tensor (e.g. "
        "'data=2,fsdp=4'; axes left out are 1), or 'auto' for every device on fsdp; "
        f"{batch} must be a multiple of data × fsdp (default: one device)",
    )
    if not distributed:
        parser.set_defaults(distributed=False)
        return
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="one of several processes (hosts) running this same command: join them "
        "(jax.distributed, from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID "
        "or the cluster's environment) and run on one mesh over all their devices (--mesh "
        "defaults to 'auto'); process 0 writes the files and the output",
    )


def _mesh(options, *, batch_size: int | None = None):
    """The mesh `--mesh` asks for, or None; a `batch_size` it cannot split is refused here,
    before anything loads. With `--distributed`, this process first joins the others."""
    if options.distributed:
        from jaxunlearn import processes

        processes.initialize()
    spec = options.mesh or ("auto" if options.distributed else None)
    if spec is None:
        return None
    from jaxunlearn.parallel import batch_shardings, mesh_from_spec

    mesh = mesh_from_spec(spec)
    if batch_size is not None:
        batch_shardings(batch_size, mesh)
    return mesh


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

    from jaxunlearn.adapter import LoraSettings, attach_lora, lora_settings_of
    from jaxunlearn.data import check_tokenizer_fits, load_examples, load_tokenizer
    from jaxunlearn.models import load, load_peft_adapter, lora_targets
    from jaxunlearn.train import TrainConfig, default_warmup_steps, finetune, steps_for_epochs
    from jaxunlearn.unlearn import (
        DEFAULT_LEDGER_NAME,
        register_adapter,
        save_root_adapter,
    )

    out = pathlib.Path(options.out)
    _check_sharded_flags(options)
    adapter_dir = out / ("adapter" if options.method == "single" else "ensemble")
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
            raise SettingsError(
                f"{', '.join(given)} describe fresh adapters; --peft-adapter brings its own "
                "rank, alpha, targets and dropout"
            )
    # A mesh that cannot be made, or cannot split the batch, fails before anything loads.
    mesh = _mesh(options, batch_size=options.batch_size)
    model = load(options.model, mesh=mesh)
    key = jax.random.key(options.seed)
    if options.peft_adapter:
        load_peft_adapter(model, options.peft_adapter, key=key)
        # Checked before training: a jaxunlearn adapter describes all adapters by one setting.
        settings = lora_settings_of(model) if options.save_format == "jaxunlearn" else None
    else:
        if options.targets in (None, "all"):
            targets = lora_targets(model)
        else:
            targets = tuple(t.strip() for t in options.targets.split(","))
        settings = LoraSettings(
            rank=DEFAULT_RANK if options.rank is None else options.rank,
            alpha=DEFAULT_ALPHA if options.alpha is None else options.alpha,
            targets=targets,
            dropout=0.0 if options.dropout is None else options.dropout,
        )
        # Before tokenizing: a target of another family should fail at once.
        attach_lora(model, settings, key=key)
    tokenizer = load_tokenizer(options.tokenizer or options.model)
    check_tokenizer_fits(tokenizer, model.config)
    max_length = options.max_length or model.config.max_position_embeddings

    def tokenized(examples):
        return _tokenized(examples, tokenizer, max_length=max_length, truncate=options.truncate)

    train_examples = load_examples(options.data, **_columns(options))
    train_data = tokenized(train_examples)
    steps = options.steps
    if steps is None:
        examples_per_step = options.batch_size * options.grad_accumulation
        steps = steps_for_epochs(options.epochs, len(train_data), examples_per_step)
    warmup = options.warmup_steps
    config = TrainConfig(
        learning_rate=options.learning_rate,
        warmup_steps=default_warmup_steps(steps) if warmup is None else warmup,
        num_steps=steps,
        batch_size=options.batch_size,
        grad_accumulation=options.grad_accumulation,
        max_grad_norm=options.max_grad_norm,
        weight_decay=options.weight_decay,
        l2_regularization=options.l2_regularization,
        eval_every=options.eval_every,
        checkpoint_every=options.checkpoint_every,
        seed=options.seed,
        group_by_length=options.group_by_length,
    )
    eval_data = (
        tokenized(load_examples(options.eval_data, **_columns(options)))
        if options.eval_data
        else None
    )
    if options.method != "single":
        return _finetune_ensemble(options, model, settings, train_examples, train_data, config)
    start = time.perf_counter()
    result = finetune(
        model,
        train_data,
        config=config,
        eval_data=eval_data,
        checkpoint_dir=out / "checkpoints",
        resume=options.resume,
        progress=not options.no_progress,
        mesh=mesh,
    )
    seconds = time.perf_counter() - start
    ledger = options.ledger or out / DEFAULT_LEDGER_NAME
    if adapter_dir.exists():  # a resumed run that had already finished
        if _writes_output():
            print(f"{adapter_dir} already holds the adapter of this run", file=sys.stderr)
        # Every process: the adapter is read back together, and the writer records it.
        register_adapter(adapter_dir, base_model=options.model, ledger=ledger)
    else:
        provenance = _training_provenance(
            options, train_examples, train_data, config, checkpoints=out / "checkpoints"
        )
        description = {}
        if options.peft_adapter:
            description["initial_peft_adapter"] = os.path.abspath(options.peft_adapter)
        # Registered in the lineage's ledger: requests are applied to adapters it recorded.
        save_root_adapter(
            model,
            adapter_dir,
            provenance=provenance,
            ledger=ledger,
            save_format=options.save_format,
            lora_settings=settings,
            description=description,
            peft_base_model=os.path.abspath(options.model),
        )
    history = result.history
    summary = {
        "adapter": os.fspath(adapter_dir),
        "adapter_format": options.save_format,
        "ledger": os.path.abspath(ledger),
        "examples": len(train_data),
        "steps": config.num_steps,
        "final_loss": history.losses[-1] if history.losses else None,
        "eval_losses": history.eval_losses,
        "seconds": seconds,
        "mesh": None if mesh is None else dict(mesh.shape),
    }
    if _writes_output():
        text = json.dumps(finite(summary), indent=2, allow_nan=False)
        (out / "training.json").write_text(text)
        print(text)
    return 0


def _training_provenance(options, train_examples, train_data, config, **extra):
    """What `finetune` records of its inputs, and what `unlearn` needs to tokenize the data as
    it was trained on."""
    from jaxunlearn.unlearn import Provenance

    return Provenance.of_training(
        base_model=options.model,
        tokenizer=options.tokenizer or options.model,
        data=options.data,
        examples=train_examples,
        train_config=dataclasses.asdict(config),
        tokenization={
            "max_length": train_data.max_length,
            "truncate": options.truncate,
            "buckets": list(train_data.buckets),
        },
        **extra,
    )


def _check_sharded_flags(options) -> None:
    """The flags of --method s3t|sisa, checked before anything loads."""
    given = [
        flag
        for flag, value in (
            ("--shards", options.shards),
            ("--slices", options.slices),
            ("--budget", options.budget),
            ("--group-by", options.group_by),
        )
        if value is not None
    ]
    if options.method == "single":
        if given:
            raise SettingsError(f"{', '.join(given)} need --method s3t or --method sisa")
        return
    if options.shards is None or options.slices is None:
        raise SettingsError(f"--method {options.method} needs --shards and --slices")
    if options.method == "sisa" and options.budget not in (None, 1):
        raise SettingsError("--budget is S3T's: SISA trains one model per shard")
    refused = {
        "--resume": options.resume,
        "--steps": options.steps is not None,
        "--peft-adapter": options.peft_adapter is not None,
        "--eval-data": options.eval_data is not None,
        "--mesh": options.mesh is not None,
        "--distributed": options.distributed,
        "--save-format peft": options.save_format == "peft",
    }
    bad = [flag for flag, set_ in refused.items() if set_]
    if bad:
        raise SettingsError(
            f"--method {options.method} does not take {', '.join(bad)}: every stage trains "
            "--epochs passes over its slices, from fresh adapters, on one device"
        )


def _finetune_ensemble(options, model, settings, train_examples, train_data, config) -> int:
    from jaxunlearn.unlearn import DEFAULT_LEDGER_NAME, StageRecipe, train_ensemble

    out = pathlib.Path(options.out)
    provenance = _training_provenance(options, train_examples, train_data, config)
    trained = train_ensemble(
        model,
        train_examples,
        train_data,
        method=options.method,
        shards=options.shards,
        slices=options.slices,
        budget=options.budget or 1,
        group_by=options.group_by,
        out=out / "ensemble",
        provenance=provenance,
        ledger=options.ledger or out / DEFAULT_LEDGER_NAME,
        lora_settings=settings,
        recipe=StageRecipe(train_config=config, epochs=options.epochs),
        progress=not options.no_progress,
    )
    ensemble = trained.ensemble
    summary = {
        "ensemble": trained.path,
        "method": ensemble.method,
        "shards": ensemble.shards,
        "slices": ensemble.slices,
        "budget": ensemble.budget,
        "layer_groups": [list(group) for group in ensemble.groups]
        if ensemble.method == "s3t"
        else None,
        "ledger": trained.ledger,
        "examples": len(train_data),
        "stages": trained.stages,
        "examples_seen": trained.examples_seen,
        "epochs_of_one_finetune": trained.examples_seen / len(train_data),
        "seconds": trained.seconds,
    }
    text = json.dumps(finite(summary), indent=2, allow_nan=False)
    (out / "training.json").write_text(text)
    print(text)
    return 0


def _writes_output() -> bool:
    """Whether this process prints and writes reports: the only one, or the writer of
    several (`--distributed`)."""
    from jaxunlearn import processes

    return processes.is_writer()


def _unlearn(options) -> int:
    from jaxunlearn.parallel import Placement
    from jaxunlearn.unlearn import Sources, apply_request, get_method

    method = get_method(options.method)
    placement = Placement(_mesh(options))
    outcome = apply_request(
        _request(options),
        adapter=options.adapter or options.peft_adapter,
        out=options.out,
        sources=Sources(
            base_model=options.model,
            data=options.data,
            tokenizer=options.tokenizer,
            max_length=options.max_length,
            truncate=options.truncate or None,
            **_columns(options),
        ),
        method=method.name,
        settings=settings_from_flags(method.settings_type, options),
        ledger=options.ledger,
        preparation=options.preparation,
        save_format=options.save_format,
        branch=options.branch,
        allow_edited_removal=options.allow_edited_removal,
        skip_checks=options.skip_check,
        purge_stale=options.purge,
        placement=placement,
    )
    if not _writes_output():
        return 0
    report = sys.stderr if options.json else sys.stdout
    for note in outcome.notes:
        print(f"note: {note}", file=report)
    print(outcome.message, file=report)
    if outcome.applied:
        print(
            f"Wrote {outcome.adapter}; recorded as record {outcome.record} of {outcome.ledger}"
            + (" (approximate: the solver stopped on its budget)." if outcome.approximate else "."),
            file=report,
        )
    for copy in outcome.stale:
        print(f"still holds removed data: {copy.path} ({copy.kind}: {copy.reason})", file=report)
    if outcome.stale:
        print("Run again with --purge to delete them (never your data file).", file=report)
    for path in outcome.purged:
        print(f"purged {path}", file=report)
    if options.json:
        print(json.dumps(outcome.summary(), indent=2, allow_nan=False))
    return 0


def _request(options):
    """The request the flags describe, read from its file where it has one."""
    from jaxunlearn.unlearn import Removal, read_edits, read_removal

    if options.forget is not None:
        return Removal([item.strip() for item in options.forget.split(",") if item.strip()])
    if options.forget_file is not None:
        return read_removal(options.forget_file)
    if options.edit_queries is not None:
        return read_edits(options.edit_queries, field="prompt")
    return read_edits(options.edit_responses, field="response")


def _demo(options) -> int:
    from jaxunlearn.demo import DemoSettings, run_demo, summary_table
    from jaxunlearn.parallel import Placement

    settings = DemoSettings() if options.seed is None else DemoSettings(seed=options.seed)
    placement = Placement(_mesh(options))
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
        placement=placement,
    )
    if options.json:
        headline = {key: value for key, value in figures.items() if key != "per_example"}
        print(json.dumps(finite(headline), indent=2, allow_nan=False))
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
