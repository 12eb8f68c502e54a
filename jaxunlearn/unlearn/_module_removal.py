"""Gradient-traced module removal: reset the LoRA modules a request's examples dominate, then
restore utility by a short fine-tune on the data after the request.

A LoRA module is one adapted projection of one decoder layer: its pair (A, B). Module m is
scored by the request's gradient in its own parameters,

    I_m = ‖Σ_{z∈S} ∇_{Θ_m} [L(z) − L(z_δ)]‖        (L(z_δ) = 0 for a removal),

optionally divided by the retained examples' gradient norm in the same module (both per
example), so that modules every example pulls on hard are not mistaken for the request's. The
modules above a threshold (the top 10% by default; a fixed count or a score threshold instead)
are reset: B ← 0 and A drawn anew from the initializer's distribution, so that the module's
update B·A is exactly zero, as at initialization, and no trace of the trained module is left.
Restoration then fine-tunes only the reset modules (or, with `restore="all"`, fresh modules
everywhere) on the data after the request, for a budget of optimizer steps given directly or
as a fraction of the original fine-tune's, at the fine-tune's learning rate and batch size.

The method is approximate: the modules that were kept still carry whatever the request's
examples taught them; only a retrain (or `restore="all"` trained for the whole schedule)
removes that for sure. Its cost is a pass over the request's examples (plus, normalized, a
prepared pass over the whole training set) and the restoration's steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn import curvature, kernels
from jaxunlearn.data import tokenize_examples
from jaxunlearn.errors import SettingsError
from jaxunlearn.train import TrainConfig, finetune
from jaxunlearn.unlearn._llmeraser_preparation import length_sorted_batches
from jaxunlearn.unlearn._method import MethodOutcome, Prepared, UnlearningContext
from jaxunlearn.unlearn._requests import ResolvedRequest

__all__ = [
    "RESTORE_MODES",
    "ModuleRemoval",
    "ModuleRemovalSettings",
    "ModuleScores",
    "module_name",
    "module_scores",
    "reset_modules",
    "select_modules",
]

RESTORE_MODES = ("reset", "all")
_PREPARATION_FILE = "module_removal_preparation.json"
_GRADIENT_FILE = "full_gradient.npz"


@dataclasses.dataclass(frozen=True)
class ModuleRemovalSettings:
    """Gradient-traced module removal.

    Attributes:
        reset_share: Reset this share of the LoRA modules, the highest-scoring first (rounded
            up, at least one module), unless `reset_count` or `score_threshold` is given.
        reset_count: Reset exactly this many of the highest-scoring modules instead.
        score_threshold: Reset every module whose score exceeds this instead.
        normalize: Divide each module's score by the retained examples' gradient norm in that
            module (both per example); needs a prepared pass over the training set.
        restore: "reset" fine-tunes only the reset modules; "all" resets every module and
            fine-tunes fresh modules everywhere.
        restore_steps: Optimizer steps of the restoration (default: `restore_fraction` of the
            original fine-tune's steps).
        restore_fraction: The restoration's budget as a fraction of the original fine-tune's
            optimizer steps, when `restore_steps` is not given.
        restore_learning_rate: Peak learning rate of the restoration (default: the
            fine-tune's).
        batch_size: Rows per batch of the scoring gradients.
        seed: Seeds the redrawn A matrices and the restoration's data order.
        progress: Show the restoration's progress bar.
    """

    reset_share: float = 0.1
    reset_count: int | None = None
    score_threshold: float | None = None
    normalize: bool = False
    restore: Literal["reset", "all"] = "reset"
    restore_steps: int | None = None
    restore_fraction: float = 0.05
    restore_learning_rate: float | None = None
    batch_size: int = 8
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if not 0 < self.reset_share <= 1:
            raise SettingsError(f"reset_share must be in (0, 1], got {self.reset_share!r}.")
        if self.reset_count is not None and self.score_threshold is not None:
            raise SettingsError("Give reset_count or score_threshold, not both.")
        if self.reset_count is not None and self.reset_count < 1:
            raise SettingsError(f"reset_count must be at least 1, got {self.reset_count!r}.")
        if self.score_threshold is not None and not (
            math.isfinite(self.score_threshold) and self.score_threshold >= 0
        ):
            raise SettingsError(
                f"score_threshold must be a finite number >= 0, got {self.score_threshold!r}."
            )
        if self.restore not in RESTORE_MODES:
            raise SettingsError(f"restore must be one of {RESTORE_MODES}, got {self.restore!r}.")
        if self.restore_steps is not None and self.restore_steps < 1:
            raise SettingsError(f"restore_steps must be at least 1, got {self.restore_steps!r}.")
        if not 0 < self.restore_fraction <= 1:
            raise SettingsError(
                f"restore_fraction must be in (0, 1], got {self.restore_fraction!r}."
            )
        if self.restore_learning_rate is not None and not (
            math.isfinite(self.restore_learning_rate) and self.restore_learning_rate > 0
        ):
            raise SettingsError(
                "restore_learning_rate must be a positive finite number, got "
                f"{self.restore_learning_rate!r}."
            )
        if self.batch_size < 1:
            raise SettingsError(f"batch_size must be at least 1, got {self.batch_size!r}.")
        if self.seed < 0:
            raise SettingsError(f"seed must be >= 0, got {self.seed!r}.")


@dataclasses.dataclass(frozen=True)
class ModuleScores:
    """The request's score of every LoRA module.

    Attributes:
        names: Each module's name (`layers.3.attention.q_proj`), in the adapter's order.
        paths: Each module's NNX path (without the trailing `lora_a`/`lora_b`).
        forget_norms: ‖Σ_S ∇_{Θ_m}‖ per module, divided by |S| (per example).
        retain_norms: The retained examples' per-example gradient norm per module, or None
            when not normalized.
        scores: The scores the selection ranks: `forget_norms`, or their ratio to
            `retain_norms`.
    """

    names: tuple[str, ...]
    paths: tuple[tuple[Any, ...], ...]
    forget_norms: np.ndarray
    retain_norms: np.ndarray | None
    scores: np.ndarray

    def as_dict(self) -> dict[str, float]:
        """{module name: score}, in the adapter's order."""
        return {name: float(score) for name, score in zip(self.names, self.scores, strict=True)}


def module_name(path: Sequence[Any], /) -> str:
    """The dotted name of a module path (`layers.3.attention.q_proj`)."""
    return ".".join(str(part) for part in path)


def _module_paths(lora: nnx.State) -> tuple[tuple[Any, ...], ...]:
    """The LoRA modules' paths, each once, in the adapter's flat order."""
    seen: dict[tuple[Any, ...], None] = {}
    for path, _ in nnx.to_flat_state(lora):
        if path[-1] not in ("lora_a", "lora_b"):
            raise ValueError(f"Unexpected LoRA parameter {module_name(path)}.")
        seen.setdefault(tuple(path[:-1]), None)
    return tuple(seen)


def _per_module_norms(gradient: nnx.State, paths: Sequence[tuple[Any, ...]]) -> np.ndarray:
    squared = dict.fromkeys(paths, 0.0)
    for path, leaf in nnx.to_flat_state(gradient):
        value = jnp.asarray(leaf[...], jnp.float32)
        squared[tuple(path[:-1])] += float(jnp.sum(jnp.square(value)))
    return np.sqrt(np.array([squared[path] for path in paths], np.float64))


def module_scores(
    forget_gradient: nnx.State,
    /,
    *,
    num_forget: int,
    retain_gradient: nnx.State | None = None,
    num_retain: int | None = None,
) -> ModuleScores:
    """Scores every LoRA module by the request's summed gradient in its parameters.

    Args:
        forget_gradient: Σ_S ∇[L(z) − L(z_δ)] over the request's examples (an adapter tree).
        num_forget: |S|, to report per-example norms.
        retain_gradient: Σ over the retained examples of ∇L, to normalize by (or None).
        num_retain: The number of retained examples (with `retain_gradient`).

    Returns:
        The scores, per module.
    """
    if num_forget < 1:
        raise ValueError("Scoring needs at least one example of the request.")
    paths = _module_paths(forget_gradient)
    forget_norms = _per_module_norms(forget_gradient, paths) / num_forget
    retain_norms = None
    scores = forget_norms
    if retain_gradient is not None:
        if not num_retain:
            raise ValueError("Normalizing needs the number of retained examples.")
        retain_norms = _per_module_norms(retain_gradient, paths) / num_retain
        # A module no retained example moves (norm 0) ranks by its forget norm alone, above
        # every finite ratio only if the request moves it at all.
        tiny = np.finfo(np.float64).tiny
        scores = forget_norms / np.maximum(retain_norms, tiny)
    return ModuleScores(
        names=tuple(module_name(path) for path in paths),
        paths=paths,
        forget_norms=forget_norms,
        retain_norms=retain_norms,
        scores=scores,
    )


def select_modules(
    scores: np.ndarray,
    /,
    *,
    share: float = 0.1,
    count: int | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """The positions of the modules to reset, highest score first.

    Ties are broken by position (the earlier module first), so a selection depends only on
    the scores.

    Raises:
        SettingsError: If `count` exceeds the number of modules, or no module's score exceeds
            `threshold` (nothing would be reset).
    """
    scores = np.asarray(scores, np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))
    if threshold is not None:
        chosen = order[scores[order] > threshold]
        if not len(chosen):
            raise SettingsError(
                f"No module scores above the threshold {threshold:g} (the largest score is "
                f"{scores.max():.4g}): nothing would be reset."
            )
        return chosen
    if count is None:
        count = max(1, math.ceil(share * len(scores) - 1e-9))
    if count > len(scores):
        raise SettingsError(f"reset_count {count} exceeds the adapter's {len(scores)} modules.")
    return order[:count]


def reset_modules(
    lora: nnx.State, paths: Sequence[tuple[Any, ...]], /, *, key: jax.Array
) -> nnx.State:
    """The adapter with the given modules back at an initialization: B = 0 and A drawn from
    the Kaiming-uniform distribution LoRA starts from (bound 1/√in), one key per module."""
    chosen = {tuple(path): position for position, path in enumerate(paths)}
    flat = []
    for path, leaf in nnx.to_flat_state(lora):
        module = tuple(path[:-1])
        if module in chosen:
            value = leaf[...]
            if path[-1] == "lora_b":
                value = jnp.zeros_like(value)
            else:
                bound = 1.0 / math.sqrt(value.shape[0])
                module_key = jax.random.fold_in(key, chosen[module])
                value = jax.random.uniform(module_key, value.shape, value.dtype, -bound, bound)
                if hasattr(leaf[...], "sharding"):
                    value = jax.device_put(value, leaf[...].sharding)
            leaf = leaf.replace(value)
        flat.append((path, leaf))
    return nnx.from_flat_state(flat)


def _module_filter(paths: Sequence[tuple[Any, ...]]) -> nnx.filterlib.Filter:
    chosen = frozenset(tuple(path) for path in paths)

    def in_chosen(path, value) -> bool:
        return tuple(path[:-1]) in chosen

    return nnx.All(nnx.LoRAParam, in_chosen)


class ModuleRemoval:
    """Reset the LoRA modules a request's gradient dominates, then restore by fine-tuning."""

    name: ClassVar[str] = "module-removal"
    # The restoration fine-tunes the objective after the request: a worse objective means its
    # budget was short (a note for the user), not an update in a wrong direction.
    refuses_worse_objective: ClassVar[bool] = False
    settings_type: ClassVar[type] = ModuleRemovalSettings
    description: ClassVar[str] = (
        "reset the LoRA modules the request's gradient dominates, then fine-tune them briefly "
        "on the data after the request (approximate)"
    )

    def settle(
        self, settings: ModuleRemovalSettings, context: UnlearningContext, /
    ) -> tuple[ModuleRemovalSettings, list[str]]:
        """Checks that the restoration's budget and learning rate can be known.

        Raises:
            SettingsError: If the adapter's fine-tune settings are unknown and the restoration
                steps or learning rate were not given.
        """
        if context.train_config is None and (
            settings.restore_steps is None or settings.restore_learning_rate is None
        ):
            raise SettingsError(
                "The adapter's fine-tune settings are unknown (an adapter from elsewhere): give "
                "the restoration's budget and learning rate (--restore-steps, "
                "--restore-learning-rate)."
            )
        context.placement.check_batch_size(settings.batch_size, what="batch size (--batch-size)")
        return settings, []

    def preparation_key(self, settings: ModuleRemovalSettings, /) -> Mapping[str, Any] | None:
        """Normalized scores need the full-data gradient; unnormalized ones prepare nothing."""
        return {"normalize": True} if settings.normalize else None

    def prepare(self, context: UnlearningContext, settings: ModuleRemovalSettings, /):
        """Σ ∇L over the whole training set at the adapter (normalized scores only)."""
        if not settings.normalize:
            return None
        started = time.perf_counter()
        graphdef, lora, base = curvature.split_for_curvature(context.model)
        batches = length_sorted_batches(
            context.data,
            np.arange(len(context.data)),
            settings.batch_size,
            placement=context.placement,
        )
        full_gradient = curvature.objective_gradient(graphdef, lora, base, batches)
        jax.block_until_ready(full_gradient)
        return Prepared(
            method=self.name,
            adapter_digest=context.adapter_digest,
            data_digest=context.data_digest,
            settings_key=self.preparation_key(settings),
            value=full_gradient,
            seconds=time.perf_counter() - started,
        )

    def warm_up(self, context, resolved, settings, prepared, /) -> None:
        """Compiles the scoring gradients. The restoration compiles its own training step as
        it starts, and that compilation is counted in its time, as a retrain's is."""
        graphdef, lora, base = curvature.split_for_curvature(context.model)
        curvature.warm_up_gradient(
            graphdef, lora, base, _request_batches(context, resolved, settings)
        )

    def apply(
        self,
        context: UnlearningContext,
        resolved: ResolvedRequest,
        settings: ModuleRemovalSettings,
        prepared: Prepared | None,
        /,
    ) -> MethodOutcome:
        """The adapter with the dominated modules reset and restored; `context.model` is
        left unchanged.

        Raises:
            PreparationMismatchError: If `prepared` was made for another adapter or data.
            SettingsError: If the threshold selects no module, or the count exceeds them.
            TrainingDivergedError: If the restoration diverged.
        """
        graphdef, lora, base = curvature.split_for_curvature(context.model)
        started = time.perf_counter()
        forget_batches = length_sorted_batches(
            context.data, resolved.indices, settings.batch_size, placement=context.placement
        )
        forget_gradient = curvature.objective_gradient(graphdef, lora, base, forget_batches)
        edited = _edited_batches(context, resolved, settings)
        if edited:
            forget_gradient = kernels.tree_sub(
                forget_gradient, curvature.objective_gradient(graphdef, lora, base, edited)
            )
        retain_gradient = num_retain = None
        if settings.normalize:
            if prepared is None:
                raise ValueError("Normalized scores need the preparation: call prepare().")
            prepared.check(self.name, context, self.preparation_key(settings))
            retain_gradient = kernels.tree_sub(prepared.value, forget_gradient)
            num_retain = len(context.examples) - len(resolved.indices)
        scores = module_scores(
            forget_gradient,
            num_forget=len(resolved.indices),
            retain_gradient=retain_gradient,
            num_retain=num_retain,
        )
        scoring_seconds = time.perf_counter() - started

        if settings.restore == "all":
            chosen = np.arange(len(scores.paths))
        else:
            chosen = select_modules(
                scores.scores,
                share=settings.reset_share,
                count=settings.reset_count,
                threshold=settings.score_threshold,
            )
        reset_paths = [scores.paths[i] for i in chosen]
        key = jax.random.key(settings.seed)
        reset = reset_modules(lora, reset_paths, key=key)

        config = restoration_config(
            context.train_config, settings, num_examples=len(context.examples)
        )
        model = nnx.clone(context.model)
        nnx.update(model, reset)
        started = time.perf_counter()
        result = finetune(
            model,
            _data_after(context, resolved),
            config=config,
            trainable=_module_filter(reset_paths),
            progress=settings.progress,
            mesh=context.placement.mesh,
            rules=context.placement.rules,
        )
        restore_seconds = time.perf_counter() - started
        _, new_lora, _ = curvature.split_for_curvature(result.model)
        new_lora = jax.tree.map(lambda new, old: new.astype(old.dtype), new_lora, lora)
        jax.block_until_ready(new_lora)

        original_steps = _original_steps(context.train_config)
        retrain_steps = (
            None
            if original_steps is None
            else max(
                1,
                math.ceil(original_steps * len(resolved.examples_after) / len(context.examples)),
            )
        )
        reset_names = [scores.names[i] for i in chosen]
        figures = {
            "modules": len(scores.names),
            "reset_modules": len(reset_names),
            "reset_share": len(reset_names) / len(scores.names),
            "reset": reset_names,
            "module_scores": scores.as_dict(),
            "normalized": settings.normalize,
            "restore": settings.restore,
            "restore_steps": config.num_steps,
            "restore_examples_per_step": config.examples_per_step,
            "restore_learning_rate": config.learning_rate,
            "original_steps": original_steps,
            "restore_steps_to_retrain": (
                None if retrain_steps is None else config.num_steps / retrain_steps
            ),
            "restore_final_loss": _finite_or_none(
                result.history.losses[-1] if result.history.losses else None
            ),
            "restore_compile_seconds": result.history.compile_seconds,
            "scoring_seconds": scoring_seconds,
            "restore_seconds": restore_seconds,
            "request_examples": len(resolved.affected),
        }
        top = ", ".join(reset_names[:3]) + (" …" if len(reset_names) > 3 else "")
        message = (
            f"Module removal reset {len(reset_names)} of {len(scores.names)} LoRA modules "
            f"({top}) for a {resolved.kind} of {len(resolved.affected)} examples and restored "
            f"{'them' if settings.restore == 'reset' else 'every module'} in "
            f"{config.num_steps} steps on the data after the request."
        )
        return MethodOutcome(
            lora=new_lora,
            approximate=True,
            converged=None,
            residual=None,
            figures=figures,
            message=message,
        )

    def save_preparation(self, prepared: Prepared, path: str | os.PathLike, /) -> None:
        """Writes the full-data gradient (npz) and what it was made at (JSON) to a new folder.

        Raises:
            FileExistsError: If `path` exists.
        """
        path = pathlib.Path(path)
        path.mkdir(parents=True)
        flat = nnx.to_flat_state(prepared.value)
        np.savez(
            path / _GRADIENT_FILE,
            **{f"leaf{i}": np.asarray(leaf[...]) for i, (_, leaf) in enumerate(flat)},
        )
        meta = {
            "method": prepared.method,
            "adapter_digest": prepared.adapter_digest,
            "data_digest": prepared.data_digest,
            "settings_key": dict(prepared.settings_key),
            "seconds": prepared.seconds,
            "leaves": [module_name(p) for p, _ in flat],
        }
        (path / _PREPARATION_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False))

    def load_preparation(self, path: str | os.PathLike, context: UnlearningContext, /) -> Prepared:
        """Reads a preparation written by `save_preparation` onto the context's adapter
        structure (not yet checked against it: `Prepared.check` does that).

        Raises:
            ValueError: If the folder's arrays do not match the adapter's parameters.
        """
        path = pathlib.Path(path)
        meta = json.loads((path / _PREPARATION_FILE).read_text())
        _, lora, _ = curvature.split_for_curvature(context.model)
        flat = nnx.to_flat_state(lora)
        names = [module_name(p) for p, _ in flat]
        if meta.get("leaves") != names:
            raise ValueError(
                f"The preparation in {path} holds gradients of other adapter parameters."
            )
        with np.load(path / _GRADIENT_FILE) as arrays:
            leaves = [
                (p, leaf.replace(jnp.asarray(arrays[f"leaf{i}"])))
                for i, (p, leaf) in enumerate(flat)
            ]
        return Prepared(
            method=meta["method"],
            adapter_digest=meta["adapter_digest"],
            data_digest=meta["data_digest"],
            settings_key=meta["settings_key"],
            value=nnx.from_flat_state(leaves),
            seconds=float(meta["seconds"]),
        )


def restoration_config(
    train_config: Mapping[str, Any] | None,
    settings: ModuleRemovalSettings,
    /,
    *,
    num_examples: int,
) -> TrainConfig:
    """The restoration's fine-tune settings: the original's (batch size, clipping, penalty,
    schedule shape) with the budget and learning rate of `settings`, the warmup scaled with
    the budget, and the seed of `settings`."""
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in (train_config or {}).items() if k in fields})
    steps = settings.restore_steps
    if steps is None:
        steps = max(1, math.ceil(settings.restore_fraction * base.num_steps))
    ratio = steps / base.num_steps
    warmup = min(round(base.warmup_steps * ratio), steps - 1)
    learning_rate = settings.restore_learning_rate or base.learning_rate
    return dataclasses.replace(
        base,
        num_steps=steps,
        warmup_steps=warmup,
        learning_rate=learning_rate,
        seed=settings.seed,
        eval_every=steps,
        checkpoint_every=steps,
    )


def _original_steps(train_config: Mapping[str, Any] | None) -> int | None:
    if train_config is None or "num_steps" not in train_config:
        return None
    return int(train_config["num_steps"])


def _request_batches(context, resolved, settings):
    return length_sorted_batches(
        context.data, resolved.indices, settings.batch_size, placement=context.placement
    ) + _edited_batches(context, resolved, settings)


def _edited_batches(context, resolved, settings):
    if not resolved.replacements:
        return []
    if context.tokenizer is None:
        raise ValueError("An edit request needs the tokenizer, to tokenize the edited examples.")
    edited = _tokenized(context, resolved.replacements)
    return length_sorted_batches(
        edited, np.arange(len(edited)), settings.batch_size, placement=context.placement
    )


def _data_after(context, resolved):
    """The data after the request, tokenized as the adapter's training data."""
    if not resolved.replacements:
        kept = np.setdiff1d(np.arange(len(context.data)), resolved.indices)
        return context.data.subset(kept)
    return _tokenized(context, resolved.examples_after)


def _tokenized(context, examples):
    return tokenize_examples(
        list(examples),
        context.tokenizer,
        max_length=context.data.max_length,
        buckets=context.data.buckets,
    )


def _finite_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
