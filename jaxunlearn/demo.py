"""The main job on the embedded default: fine-tune, unlearn with LLMEraser, retrain, compare.

`run_demo` fine-tunes LoRA adapters of the embedded default model on its synthetic corpus of
fictitious people, removes about 5% of the people with one LLMEraser request, retrains the
adapter without them from the same initialization as the reference, and evaluates the three
adapters (original, unlearned, retrained) on the forget set, the retain set and held-out people
never trained on: perplexities, membership inference AUCs (forget vs held-out), PII extraction
recall, the distance and KL to the retrain, and the cost of unlearning against retraining. It
writes a report folder (JSON with every figure and per-example values, Markdown, PNG plots).

Scored tokens: every figure scores the response tokens of an example, end-of-sequence token
included; prompt tokens are never scored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxunlearn import curvature, parallel
from jaxunlearn._strict_json import strict_dumps
from jaxunlearn.adapter import LoraSettings, attach_lora
from jaxunlearn.data import Example, TokenizedDataset, tokenize_examples
from jaxunlearn.defaults import DefaultAssets, ensure_defaults
from jaxunlearn.eval import (
    compiled_flops,
    distance_to_retrain,
    extraction_recall,
    forget_gap_closed,
    markdown_table,
    membership_inference,
    next_token_kl,
    perplexity,
    pii_extraction,
    plot_forget_losses,
    plot_score_histograms,
    score_examples,
)
from jaxunlearn.models import LORA_TARGETS
from jaxunlearn.train import TrainConfig, default_warmup_steps, finetune, steps_for_epochs
from jaxunlearn.unlearn import (
    DEFAULT_LEDGER_NAME,
    EraserSettings,
    LLMEraser,
    Removal,
    Sources,
    UnlearningContext,
    apply_request,
    open_adapter,
    retrain,
    save_root_adapter,
)

__all__ = ["MODELS", "DemoData", "DemoSettings", "demo_data", "run_demo"]

MODELS = ("original", "unlearned", "retrained")
# Rows per forward pass when scoring, and prompts decoded at once when extracting PII.
EVALUATION_BATCH_SIZE = 32
GENERATION_BATCH_SIZE = 64
SCORED_TOKENS = "response tokens, end-of-sequence token included; prompt tokens never scored"


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The demo's recipe (defaults fit in a few minutes on two CPU cores).

    Attributes:
        forget_fraction: The fraction of the trained people whose examples are removed.
        epochs: Passes over the training data of the fine-tune (and of the retrain). At 24 the
            penalized fine-tune is nearer its minimum than at 12; at 30 the update leaves
            retain perplexity 9% above the retrain's.
        rank, alpha: LoRA rank and alpha, on every projection.
        learning_rate: Peak AdamW learning rate.
        l2_regularization: μ of the fine-tune's L2 penalty (μ/2)‖Θ‖², so that the adapter
            minimizes the objective that influence functions differentiate; LLMEraser is
            given the same μ.
        batch_size: Examples per step.
        eraser: LLMEraser's settings (its `l2_regularization` is replaced by the recipe's).
        seed: Seeds the adapter initialization and the data order.
    """

    forget_fraction: float = 0.05
    epochs: float = 24.0
    rank: int = 32
    alpha: float = 32.0
    learning_rate: float = 1e-2
    l2_regularization: float = 1e-2
    batch_size: int = 32
    # LLMEraser's defaults are this demo's recipe: a Newton step on the objective after the
    # request, with that objective's own curvature (the sample less the removed examples) and
    # no damping beyond the penalty's μ, by CG truncated at 7 steps. On this demo 6 steps fall
    # short of halfway on forget perplexity and 8 cost 5.7% of the retrain; 64 examples instead
    # of 96 leave retain perplexity 5-7% above the retrain's. Batches of 8 pad less than batches
    # of 32 (1.5x faster products).
    eraser: EraserSettings = dataclasses.field(default_factory=EraserSettings)
    seed: int = 0

    def lora_settings(self) -> LoraSettings:
        """Adapters of rank `rank` on every projection of the Llama."""
        return LoraSettings(rank=self.rank, alpha=self.alpha, targets=LORA_TARGETS)

    def train_config(self, num_examples: int, /) -> TrainConfig:
        """`epochs` passes over `num_examples` examples, 10% warmup, length-grouped batches."""
        steps = steps_for_epochs(self.epochs, num_examples, self.batch_size)
        return TrainConfig(
            learning_rate=self.learning_rate,
            warmup_steps=default_warmup_steps(steps),
            num_steps=steps,
            batch_size=self.batch_size,
            seed=self.seed,
            group_by_length=True,
            l2_regularization=self.l2_regularization,
        )

    def eraser_settings(self) -> EraserSettings:
        """`eraser`, told the fine-tune's penalty."""
        curvature_settings = dataclasses.replace(
            self.eraser.curvature, l2_regularization=self.l2_regularization
        )
        return dataclasses.replace(self.eraser, curvature=curvature_settings)


@dataclasses.dataclass(frozen=True)
class DemoData:
    """The demo's examples and splits, tokenized as its adapters are trained.

    Attributes:
        examples: Every training example, in training order.
        forget_people: The ids of the people a request removes, sorted.
        forget_ids: Their examples' ids, in training order.
        data: `examples`, tokenized.
        forget: The forget people's examples (a subset of `data`).
        retain: Everyone else's examples, tokenized alone (the retrain's data).
        held_out: Examples of people never trained on.
    """

    examples: list[Example]
    forget_people: list[str]
    forget_ids: list[str]
    data: TokenizedDataset
    forget: TokenizedDataset
    retain: TokenizedDataset
    held_out: TokenizedDataset


def demo_data(assets: DefaultAssets, settings: DemoSettings = DemoSettings(), /) -> DemoData:
    """The demo's splits of the embedded default's corpus (`ensure_defaults()`), for
    experiments that measure other methods on the demo's request."""
    corpus, tokenizer, recipe = assets.corpus(), assets.tokenizer(), assets.recipe

    def tokenized(items):
        return tokenize_examples(
            items, tokenizer, max_length=recipe.max_length, buckets=recipe.buckets
        )

    examples = corpus.train_examples()
    forget_people = sorted(corpus.forget_split(settings.forget_fraction))
    forgotten = set(forget_people)
    forget_ids = [e.id for e in examples if e.metadata["person_id"] in forgotten]
    data = tokenized(examples)
    return DemoData(
        examples=examples,
        forget_people=forget_people,
        forget_ids=forget_ids,
        data=data,
        forget=data.subset(data.indices_of(forget_ids)),
        retain=tokenized([e for e in examples if e.metadata["person_id"] not in forgotten]),
        held_out=tokenized(corpus.held_out_examples()),
    )


def run_demo(
    output_dir: str | os.PathLike,
    /,
    *,
    settings: DemoSettings = DemoSettings(),
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    placement: parallel.Placement = parallel.ONE_DEVICE,
) -> dict[str, Any]:
    """Runs the demo and writes its report to `output_dir` (created; may exist).

    Args:
        output_dir: The report folder.
        settings: The recipe.
        cache_dir: Where the embedded default is built and cached (the default cache if None).
        progress: Show progress bars.
        log: Called with each progress message.
        placement: Where every model of the demo lives: on a mesh, the fine-tune, the request,
            the retrain and every evaluation run there, with each batch's rows split over its
            batch axes (which must divide every batch size of the recipe).

    Returns:
        Every figure of the report (what `report.json` holds).

    Raises:
        SettingsError: If the placement's batch axes do not divide a batch size of the recipe.
    """
    _check_batch_sizes(settings, placement)
    started = time.perf_counter()
    output = pathlib.Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    assets = ensure_defaults(cache_dir, progress=progress)
    corpus, tokenizer = assets.corpus(), assets.tokenizer()
    splits = demo_data(assets, settings)
    examples, forget_people, forget_ids = splits.examples, splits.forget_people, splits.forget_ids
    data, forget_data, retain_data = splits.data, splits.forget, splits.retain
    held_out_data = splits.held_out
    log(
        f"Embedded default: {len(examples)} training examples of {len(corpus.people)} people; "
        f"forgetting {len(forget_people)} people ({len(forget_ids)} examples); "
        f"{len(held_out_data)} held-out examples of {len(corpus.held_out)} people."
    )

    lora = settings.lora_settings()
    initial = attach_lora(assets.model(), lora, key=jax.random.key(settings.seed))
    config = settings.train_config(len(data))
    log(
        f"Fine-tuning LoRA r={lora.rank} on {len(lora.targets)} projections, "
        f"{config.num_steps} steps..."
    )
    original = finetune(
        nnx.clone(initial),
        data,
        config=config,
        progress=progress,
        mesh=placement.mesh,
        rules=placement.rules,
    )
    finetune_seconds = original.history.wall_seconds - original.history.compile_seconds
    original_model = original.model

    log("Unlearning the forget set with LLMEraser (through apply_request)...")
    lineage = output / "lineage"
    shutil.rmtree(lineage, ignore_errors=True)
    train_file = assets.train_file
    provenance = assets.training_provenance(examples, data, config)
    ledger = save_root_adapter(
        original_model,
        lineage / "original",
        provenance=provenance,
        ledger=lineage / DEFAULT_LEDGER_NAME,
        lora_settings=lora,
    )
    eraser = settings.eraser_settings()
    erased = apply_request(
        Removal(forget_ids),
        adapter=lineage / "original",
        out=lineage / "unlearned",
        sources=Sources(
            base_model=assets.model_dir, data=train_file, tokenizer=assets.tokenizer_dir
        ),
        method=LLMEraser.name,
        settings=eraser,
        ledger=ledger.path,
        preparation=lineage / "preparation",
        log=log,
        placement=placement,
    )
    log(erased.message)
    unlearned_model = open_adapter(erased.adapter, assets.model_dir, placement=placement).model
    preparation = LLMEraser().load_preparation(
        lineage / "preparation",
        UnlearningContext(original_model, examples, data, tokenizer, "", "", placement=placement),
    )

    log("Retraining without the forgotten people (the reference)...")
    retrained = retrain(
        initial,
        retain_data,
        config=config,
        num_examples=len(data),
        progress=progress,
        placement=placement,
    )
    # After compilation, as the request's own time (metrics.md, "Cost").
    retrain_compile_seconds = retrained.history.compile_seconds
    retrain_seconds = retrained.history.wall_seconds - retrain_compile_seconds

    log("Evaluating original, unlearned and retrained adapters...")
    models = {
        "original": original_model,
        "unlearned": unlearned_model,
        "retrained": retrained.model,
    }
    figures: dict[str, Any] = {
        "scored_tokens": SCORED_TOKENS,
        "settings": _jsonable(dataclasses.asdict(settings)),
        "data": {
            "train_examples": len(data),
            "forget_examples": len(forget_data),
            "retain_examples": len(retain_data),
            "held_out_examples": len(held_out_data),
            "forget_people": len(forget_people),
            "trained_people": len(corpus.people),
            "held_out_people": len(corpus.held_out),
        },
    }
    per_example: dict[str, Any] = {"forget_ids": list(forget_data.ids)}
    scores = {}
    recall_prompts = corpus.recall_prompts(forget_people)
    evaluation = {"batch_size": EVALUATION_BATCH_SIZE, "placement": placement}
    for name, model in models.items():
        forget_scores = score_examples(model, forget_data, **evaluation)
        retain_scores = score_examples(model, retain_data, **evaluation)
        held_out_scores = score_examples(model, held_out_data, **evaluation)
        attacks = membership_inference(forget_scores, held_out_scores)
        attempts = pii_extraction(
            model, tokenizer, recall_prompts, batch_size=GENERATION_BATCH_SIZE, placement=placement
        )
        scores[name] = (forget_scores, held_out_scores, attacks)
        figures[name] = {
            "forget_ppl": perplexity(forget_scores.losses),
            "retain_ppl": perplexity(retain_scores.losses),
            "held_out_ppl": perplexity(held_out_scores.losses),
            "forget_loss": float(np.mean(forget_scores.losses)),
            "retain_loss": float(np.mean(retain_scores.losses)),
            "mia_auc_loss": attacks["loss"].auc,
            "mia_auc_mink": attacks["min_k"].auc,
            "mia_auc_mink_plus_plus": attacks["min_k_plus_plus"].auc,
            "mia_tpr_at_1pct_fpr_loss": attacks["loss"].tpr_at_1pct_fpr,
            "pii_recall": extraction_recall(attempts),
            "pii_attempts": len(attempts),
        }
        per_example[name] = {
            "forget_losses": forget_scores.losses.tolist(),
            "forget_min_k": forget_scores.min_k.tolist(),
            "held_out_losses": held_out_scores.losses.tolist(),
        }

    lora_trees = {name: curvature.split_for_curvature(m)[1] for name, m in models.items()}
    reference = figures["retrained"]
    for name in ("original", "unlearned"):
        figures[name]["forget_gap_closed"] = forget_gap_closed(
            figures[name]["forget_loss"],
            figures["original"]["forget_loss"],
            reference["forget_loss"],
        )
        figures[name]["distance_to_retrain"] = distance_to_retrain(
            lora_trees[name], lora_trees["original"], lora_trees["retrained"]
        )
        for split, split_data in (("forget", forget_data), ("retain", retain_data)):
            divergences = next_token_kl(models["retrained"], models[name], split_data, **evaluation)
            figures[name][f"kl_to_retrain_{split}"] = float(np.mean(divergences))
    figures["cost"] = _cost(
        erased,
        preparation.value,
        data.indices_of(forget_ids),
        retrain_seconds,
        retrain_compile_seconds,
        finetune_seconds,
        data,
        forget_data,
        retain_data,
        lora_trees["original"],
        original_model,
        config,
        settings,
    )
    figures["checks"] = _checks(figures)
    figures["total_seconds"] = time.perf_counter() - started
    figures["per_example"] = per_example

    _write_report(output, figures, scores)
    return figures


def _cost(
    erased,
    preparation,
    forget_indices,
    retrain_seconds,
    retrain_compile_seconds,
    finetune_seconds,
    data,
    forget_data,
    retain_data,
    lora,
    model,
    config,
    settings,
) -> dict[str, Any]:
    """Wall-clock and compiled FLOPs of the unlearning against the retrain.

    FLOPs come from XLA's cost analysis of the computations each one runs: for LLMEraser the
    request's gradients plus, for an iterative solver, one curvature product over the
    curvature sample per step taken (counted without reusing the saved linearization, so an
    upper bound; a low-rank solve costs a negligible 4·k·|Θ|); for the retrain one gradient per
    step of each batch shape (the optimizer update excluded).
    """
    graphdef, lora, base = curvature.split_for_curvature(model)
    eraser = settings.eraser_settings()
    gradient = jax.grad(curvature.objective(graphdef))
    product = curvature.batch_product(graphdef, eraser.curvature.kind)
    batch_size = eraser.curvature.batch_size
    # One cost analysis (a compilation) per function and batch shape, shared by every count.
    flops_by_shape: dict[tuple[Any, tuple[int, ...]], float] = {}

    def total_flops(function, dataset, indices, batch_rows):
        indices = np.asarray(indices)
        order = indices[np.argsort(dataset.lengths[indices], kind="stable")]
        total = 0.0
        for start in range(0, len(order), batch_rows):
            batch = dataset.batch(order[start : start + batch_rows], batch_size=batch_rows)
            key = (function, np.shape(batch.input_ids))
            if key not in flops_by_shape:
                flops_by_shape[key] = compiled_flops(function, lora, base, batch) or math.nan
            total += flops_by_shape[key]
        return total

    def gradient_flops(dataset, batch_rows):
        return total_flops(gradient, dataset, np.arange(len(dataset)), batch_rows)

    unlearn_flops = gradient_flops(forget_data, batch_size)
    if eraser.solver != "lowrank":
        sample = preparation.sample_indices
        if eraser.curvature.leave_out_request:
            sample = np.setdiff1d(sample, forget_indices)
        per_product = total_flops(
            lambda lora, base, batch: product(lora, base, batch, lora), data, sample, batch_size
        )
        unlearn_flops += int(erased.figures["solver_steps"]) * per_product
    epochs = settings.epochs
    retrain_flops = epochs * gradient_flops(retain_data, config.batch_size)
    prepare_products = preparation.spectrum.num_steps
    unlearn_seconds = erased.figures["seconds"]
    unlearn_compile_seconds = erased.figures["compile_seconds"]
    prepare_seconds = erased.figures["prepare_seconds"]
    return {
        "finetune_seconds": finetune_seconds,
        "retrain_seconds": retrain_seconds,
        "retrain_compile_seconds": retrain_compile_seconds,
        "prepare_seconds": prepare_seconds,
        "unlearn_seconds": unlearn_seconds,
        "unlearn_compile_seconds": unlearn_compile_seconds,
        "unlearn_over_retrain": unlearn_seconds / retrain_seconds,
        "unlearn_over_retrain_compilation_included": (unlearn_seconds + unlearn_compile_seconds)
        / (retrain_seconds + retrain_compile_seconds),
        "unlearn_and_prepare_over_retrain": (unlearn_seconds + prepare_seconds) / retrain_seconds,
        "unlearn_gradient_flops": unlearn_flops,
        "retrain_gradient_flops": retrain_flops,
        "unlearn_flops_over_retrain": unlearn_flops / retrain_flops,
        "prepare_curvature_products": prepare_products,
        "prepare_examples": len(preparation.sample_indices),
        "damping": preparation.damping,
        "spectrum_largest": preparation.spectrum.largest,
        "spectrum_smallest": preparation.spectrum.smallest,
    }


def _check_batch_sizes(settings: DemoSettings, placement: parallel.Placement) -> None:
    """Refuses, before anything runs, a mesh whose batch axes do not divide a batch size of the
    recipe (the fine-tune's, the curvature sample's, evaluation's and generation's)."""
    placement.check_batch_size(settings.batch_size, what="fine-tune batch size")
    placement.check_batch_size(settings.eraser.curvature.batch_size, what="curvature batch size")
    placement.check_batch_size(EVALUATION_BATCH_SIZE, what="evaluation batch size")
    placement.check_batch_size(GENERATION_BATCH_SIZE, what="generation batch size")


def _checks(figures) -> dict[str, Any]:
    """The acceptance criteria of the demo, each with the numbers it compares."""
    original, unlearned, retrained = (figures[name] for name in MODELS)

    def moved(metric):
        gap = retrained[metric] - original[metric]
        return (unlearned[metric] - original[metric]) / gap if gap else math.nan

    retain_ratio = unlearned["retain_ppl"] / retrained["retain_ppl"]
    cost = figures["cost"]
    return {
        "forget_loss_moved": moved("forget_loss"),
        "forget_ppl_moved": moved("forget_ppl"),
        "mia_auc_loss_moved": moved("mia_auc_loss"),
        "mia_auc_mink_moved": moved("mia_auc_mink"),
        "retain_ppl_over_retrained": retain_ratio,
        "halfway_forget": moved("forget_loss") >= 0.5,
        "halfway_mia": moved("mia_auc_loss") >= 0.5 and moved("mia_auc_mink") >= 0.5,
        "retain_within_5pct": abs(retain_ratio - 1) <= 0.05,
        "unlearn_within_5pct_of_retrain": cost["unlearn_over_retrain"] <= 0.05,
    }


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def summary_table(figures: dict[str, Any]) -> str:
    """The demo's headline figures as a Markdown table."""
    columns = [
        "model",
        "forget_ppl",
        "retain_ppl",
        "held_out_ppl",
        "mia_auc_loss",
        "mia_auc_mink",
        "pii_recall",
        "forget_gap_closed",
        "kl_to_retrain_forget",
    ]
    rows = [{"model": name, **figures[name]} for name in MODELS]
    for row in rows:
        for column in columns:
            row.setdefault(column, "")
    return markdown_table(rows, columns)


def _write_report(output: pathlib.Path, figures, scores) -> None:
    (output / "report.json").write_text(strict_dumps(figures, indent=2))
    plot_forget_losses(
        output / "forget_losses.png",
        {name: np.asarray(figures["per_example"][name]["forget_losses"]) for name in MODELS},
        title="Per-example forget losses (mean response-token NLL)",
    )
    member = {name: -scores[name][0].losses for name in MODELS}
    nonmember = {name: -scores[name][1].losses for name in MODELS}
    plot_score_histograms(
        output / "mia_loss_scores.png", member, nonmember, score_name="LOSS score (−ℓ)"
    )
    cost, checks = figures["cost"], figures["checks"]
    lines = [
        "# jaxunlearn demo: LLMEraser against retraining",
        "",
        f"Data: {figures['data']['train_examples']} training examples; forget set "
        f"{figures['data']['forget_examples']} examples of {figures['data']['forget_people']} "
        f"people; held-out {figures['data']['held_out_examples']} examples. Scored: "
        f"{SCORED_TOKENS}.",
        "",
        summary_table(figures),
        "",
        "## Cost",
        "",
        f"- Retrain: {cost['retrain_seconds']:.1f} s after compilation "
        f"({cost['retrain_compile_seconds']:.1f} s). Unlearning request: "
        f"{cost['unlearn_seconds']:.2f} s after compilation "
        f"({cost['unlearn_compile_seconds']:.1f} s), {100 * cost['unlearn_over_retrain']:.1f}% "
        f"of the retrain ({100 * cost['unlearn_over_retrain_compilation_included']:.1f}% with "
        "compilation on both sides), after a one-off preparation of "
        f"{cost['prepare_seconds']:.1f} s ({100 * cost['unlearn_and_prepare_over_retrain']:.1f}% "
        "with it).",
        f"- FLOPs: unlearning {cost['unlearn_gradient_flops']:.3g} (gradients and curvature "
        f"products), retrain {cost['retrain_gradient_flops']:.3g} (gradients) "
        f"({100 * cost['unlearn_flops_over_retrain']:.2f}%).",
        f"- Damping λ = {cost['damping']:.3g} (largest curvature eigenvalue estimate "
        f"{cost['spectrum_largest']:.3g}).",
        "",
        "## Checks",
        "",
        *[f"- {name}: {value}" for name, value in checks.items()],
        "",
        "![forget losses](forget_losses.png)",
        "![MIA scores](mia_loss_scores.png)",
        "",
    ]
    (output / "report.md").write_text("\n".join(lines))
