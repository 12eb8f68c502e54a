"""LLMEraser: influence-function unlearning of a LoRA adapter (arXiv 2412.00383).

The update that estimates retraining without (or with corrected) examples S is

    ΔΘ = (1/n) (C + λI)⁻¹ Σ_{z∈S} [G(z) − G(z_δ)],        Θ_new = Θ̂ + ΔΘ,

with G the gradient of the per-example loss at the fine-tuned adapter Θ̂, C the curvature of the
mean training objective (Hessian or Gauss-Newton), λ an explicit damping, and G(z_δ) = 0 for a
removal. `mode="newton"` instead takes one Newton step on the objective after the request,
Θ_new = Θ̂ − (C + λI)⁻¹ ∇R_after(Θ̂), which also corrects for the fine-tune not being exactly at
a minimum; ∇R_after comes from the full-data gradient (prepared once) minus the request's own
gradients, so a request still costs only its own examples.

When the fine-tune minimized a penalized objective, mean loss + (μ/2)‖Θ‖²
(`TrainConfig.l2_regularization`), the penalty is part of the objective: its curvature μI joins
C and its gradient μΘ joins the Newton step's.

`leave_out_request=True` takes C over the examples the request leaves untouched instead of the
whole training set: the curvature of the objective after the request, at which the influence of
a removed group is better estimated (the group-influence correction of Koh et al. 2019 and Basu
et al. 2020). Otherwise the removed examples' own curvature holds the update back.

`LLMEraser` implements the `Method` protocol: `apply_request` settles its settings against the
adapter, prepares (or loads) the request-independent work, warms up, and times `apply`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from jaxunlearn import curvature, kernels
from jaxunlearn.data import tokenize_examples
from jaxunlearn.errors import SettingsError
from jaxunlearn.unlearn import _llmeraser_preparation as preparations
from jaxunlearn.unlearn._llmeraser_preparation import EraserPreparation, length_sorted_batches
from jaxunlearn.unlearn._llmeraser_settings import EraserSettings
from jaxunlearn.unlearn._llmeraser_solvers import SolveInputs
from jaxunlearn.unlearn._method import MethodOutcome, Prepared, UnlearningContext
from jaxunlearn.unlearn._requests import ResolvedRequest

__all__ = ["LLMEraser"]

# The fraction of the forget gap the update closed on the embedded default (5% of the people
# removed, Newton step by truncated cg), with and without the fine-tune's penalty: 0.64 is the
# penalized row of experiments/results/llmeraser_vs_retrain.md, 0.1 an earlier unpenalized run.
_GAP_CLOSED_WITHOUT_PENALTY, _GAP_CLOSED_WITH_PENALTY = 0.1, 0.64


class LLMEraser:
    """Influence-function unlearning (LLMEraser), or a Newton step on the objective after the
    request, computed in the LoRA parameters alone."""

    name: ClassVar[str] = "llmeraser"
    settings_type: ClassVar[type] = EraserSettings
    description: ClassVar[str] = (
        "influence-function update of the adapter (LLMEraser), by default a Newton step on "
        "the objective after the request"
    )

    def settle(
        self, settings: EraserSettings, context: UnlearningContext, /
    ) -> tuple[EraserSettings, list[str]]:
        """Fills μ from the adapter's train_config (else 0) and λ = 0 when μ > 0.

        Returns:
            The settled settings, and notes on the penalty for the user.

        Raises:
            SettingsError: If the damping is 0 and the adapter was trained without a penalty.
        """
        curv = settings.curvature
        trained = _trained_penalty(context.train_config)
        notes = []
        l2 = curv.l2_regularization
        if l2 is None:
            l2 = 0.0 if trained is None else trained
        elif trained is not None and l2 != trained:
            notes.append(
                f"l2_regularization {l2:g} differs from the μ = {trained:g} the adapter was "
                "trained with; the update treats the adapter as the minimizer of the objective "
                f"with μ = {l2:g}."
            )
        damping = curv.damping
        if damping is None and l2 > 0:
            damping = 0.0
        if l2 == 0:
            if damping == 0:
                raise SettingsError(
                    "damping 0 needs an L2 penalty, and this adapter was trained without one "
                    "(μ = 0): nothing would keep the solve well-posed. Leave the damping unset "
                    "or give a positive one."
                )
            if curv.l2_regularization is None:
                notes.append(_penalty_note(known=trained is not None))
        context.placement.check_batch_size(
            curv.batch_size, what="curvature batch size (--batch-size)"
        )
        settled = dataclasses.replace(
            curv, l2_regularization=float(l2), damping=None if damping is None else float(damping)
        )
        return dataclasses.replace(settings, curvature=settled), notes

    def preparation_key(self, settings: EraserSettings, /) -> Mapping[str, Any]:
        """The settings the preparation depends on (of settled settings)."""
        return preparations.preparation_key(settings)

    def prepare(self, context: UnlearningContext, settings: EraserSettings, /) -> Prepared:
        """The curvature sample, spectrum, damping, eigenbasis and full-data gradient at the
        context's adapter (settings are settled here as `settle` would)."""
        settings = self._settled(settings, context)
        _check_context(context)
        started = time.perf_counter()
        graphdef, lora, base = curvature.split_for_curvature(context.model)
        value = preparations.prepare(
            graphdef, lora, base, context.data, settings, placement=context.placement
        )
        return Prepared(
            method=self.name,
            adapter_digest=context.adapter_digest,
            data_digest=context.data_digest,
            settings_key=self.preparation_key(settings),
            value=value,
            seconds=time.perf_counter() - started,
        )

    def warm_up(
        self,
        context: UnlearningContext,
        resolved: ResolvedRequest,
        settings: EraserSettings,
        prepared: Prepared | None,
        /,
    ) -> None:
        """Compiles the request's gradients (run on padding), its solve (one whole solve on a
        probe for cg) and its right-hand side and update, so that `apply` runs compiled code.

        The curvature operator is built here and again in `apply`: its linearization is part of
        the request's cost.
        """
        settings = self._settled(settings, context)
        preparation = self._checked(prepared, context, settings)
        request = _Request(context, resolved, settings, preparation)
        curvature.warm_up_gradient(request.graphdef, request.lora, request.base, request.batches)
        settings.strategy.warm_up(request.solve_inputs())
        zeros = kernels.tree_zeros_like(request.lora)
        jax.block_until_ready(
            (
                _right_hand_side(
                    zeros, preparation.full_gradient, request.lora, 1.0, 1.0, 0.0, settings.mode
                ),
                _apply_update(request.lora, zeros, 1.0),
            )
        )

    def apply(
        self,
        context: UnlearningContext,
        resolved: ResolvedRequest,
        settings: EraserSettings,
        prepared: Prepared | None,
        /,
    ) -> MethodOutcome:
        """The adapter after the request, Θ̂ + ΔΘ; `context.model` is left unchanged.

        Raises:
            PreparationMismatchError: If `prepared` was made for another adapter, data or
                settings.
            kernels.SolverError: If the solve failed (broke down, met negative curvature,
                produced NaN) or the curvature is indefinite for a solver that cannot cope.
            SettingsError: If the request leaves nothing of the curvature sample.
        """
        settings = self._settled(settings, context)
        preparation = self._checked(prepared, context, settings)
        strategy = settings.strategy
        curv = settings.curvature
        request = _Request(context, resolved, settings, preparation)
        inputs = request.solve_inputs()
        lora = request.lora
        change = curvature.objective_gradient(
            request.graphdef, lora, request.base, request.affected
        )
        if request.edited:
            change = kernels.tree_sub(
                change,
                curvature.objective_gradient(request.graphdef, lora, request.base, request.edited),
            )
        rhs = _right_hand_side(
            change,
            preparation.full_gradient,
            lora,
            float(len(context.examples)),
            float(len(resolved.examples_after)),
            curv.l2_regularization,
            settings.mode,
        )
        solution = strategy.solve(inputs, rhs).check()
        sign = 1.0 if settings.mode == "influence" else -1.0
        _, new_lora, update_norm = _apply_update(lora, solution.x, sign)
        update_norm = float(update_norm)
        if not math.isfinite(update_norm):
            raise kernels.SolverError("The update is not finite; nothing was changed.")
        jax.block_until_ready(new_lora)
        status = kernels.Status(int(solution.status))
        steps = int(solution.steps)
        residual = _finite_or_none(float(solution.residual))
        spectrum = preparation.spectrum
        figures = {
            "solver": settings.solver,
            "mode": settings.mode,
            "curvature": curv.kind,
            "damping": preparation.damping,
            "l2_regularization": preparation.l2_regularization,
            "update_norm": update_norm,
            "solver_steps": steps,
            "solver_residual": residual,
            "solver_status": status.name,
            "max_steps": settings.max_steps,
            "num_examples": preparation.num_examples,
            "request_examples": len(resolved.affected),
            "curvature_sample_size": len(preparation.sample_indices),
            "left_out_examples": len(request.left_out),
            "spectrum_largest": _finite_or_none(spectrum.largest),
            "spectrum_smallest": _finite_or_none(spectrum.smallest),
        }
        penalty = (
            f", μ={preparation.l2_regularization:.3g}" if preparation.l2_regularization else ""
        )
        message = (
            f"LLMEraser ({settings.mode}, {settings.solver}, {curv.kind}, "
            f"λ={preparation.damping:.3g}{penalty}) computed a {resolved.kind} of "
            f"{len(resolved.affected)} examples: ‖ΔΘ‖ = {update_norm:.4g}, solver "
            f"{status.name.lower()} after {steps} steps."
        )
        return MethodOutcome(
            lora=new_lora,
            approximate=strategy.approximate(solution),
            converged=strategy.converged(solution),
            residual=residual,
            figures=figures,
            message=message,
        )

    def save_preparation(self, prepared: Prepared, path: str | os.PathLike, /) -> None:
        """Writes a preparation to a new directory (orbax arrays and JSON)."""
        preparations.save_preparation(prepared, path)

    def load_preparation(self, path: str | os.PathLike, context: UnlearningContext, /) -> Prepared:
        """Reads a preparation written by `save_preparation` for the context's adapter shapes
        (not yet checked against it: `Prepared.check` does that)."""
        _, lora, _ = curvature.split_for_curvature(context.model)
        return preparations.load_preparation(path, lora)

    def _settled(self, settings: EraserSettings, context: UnlearningContext) -> EraserSettings:
        # Settling is idempotent, so settings the caller already settled come back unchanged.
        return self.settle(settings, context)[0]

    def _checked(
        self, prepared: Prepared | None, context: UnlearningContext, settings: EraserSettings
    ) -> EraserPreparation:
        if prepared is None:
            raise ValueError("LLMEraser needs its preparation: call prepare(context, settings).")
        prepared.check(self.name, context, self.preparation_key(settings))
        preparation: EraserPreparation = prepared.value
        # Also for a loaded preparation, made by code that may not have refused it.
        settings.strategy.check_curvature(preparation)
        return preparation


class _Request:
    """One request's pieces: the split model, its batches and what its solver draws on."""

    def __init__(
        self,
        context: UnlearningContext,
        resolved: ResolvedRequest,
        settings: EraserSettings,
        preparation: EraserPreparation,
    ):
        _check_context(context)
        if resolved.replacements and context.tokenizer is None:
            raise ValueError(
                "An edit request needs the tokenizer, to tokenize the edited examples."
            )
        self.settings, self.preparation, self.data = settings, preparation, context.data
        self.graphdef, self.lora, self.base = curvature.split_for_curvature(context.model)
        self.placement = placement = context.placement
        batch_size = settings.curvature.batch_size
        self.affected = length_sorted_batches(
            context.data, resolved.indices, batch_size, placement=placement
        )
        self.edited = []
        if resolved.replacements:
            edited_data = tokenize_examples(
                resolved.replacements,
                context.tokenizer,
                max_length=context.data.max_length,
                buckets=context.data.buckets,
            )
            self.edited = length_sorted_batches(
                edited_data, np.arange(len(edited_data)), batch_size, placement=placement
            )
        self.batches = self.affected + self.edited
        self.left_out = (
            resolved.indices if settings.curvature.leave_out_request else np.zeros((0,), np.int64)
        )

    def solve_inputs(self) -> SolveInputs:
        """The solver's inputs, with the fixed-sample operator linearized now if it needs one."""
        settings, curv = self.settings, self.settings.curvature
        operator = None
        if settings.strategy.uses_fixed_sample:
            operator = self.preparation.fixed_operator(
                self.graphdef,
                self.lora,
                self.base,
                self.data,
                kind=curv.kind,
                batch_size=curv.batch_size,
                left_out=self.left_out,
                placement=self.placement,
                linearization_budget_gib=curv.linearization_budget_gib,
            )
        return SolveInputs(
            settings=settings,
            preparation=self.preparation,
            graphdef=self.graphdef,
            lora=self.lora,
            base=self.base,
            data=self.data,
            left_out=self.left_out,
            operator=operator,
            placement=self.placement,
        )


@functools.partial(jax.jit, static_argnames="mode")
def _right_hand_side(change, full_gradient, lora, n, n_after, l2_regularization, mode):
    """b of the solve (C + (μ + λ)I) x = b, in one compiled call (no per-leaf dispatch).

    influence: b = (1/n) Σ_S [G(z) − G(z_δ)], and ΔΘ = x.
    newton: b = ∇R_after = (Σ_all G − Σ_S [G(z) − G(z_δ)]) / n_after + μΘ̂, and ΔΘ = −x.
    """
    if mode == "influence":
        return kernels.tree_scale(1.0 / n, change)
    gradient = kernels.tree_scale(1.0 / n_after, kernels.tree_sub(full_gradient, change))
    return kernels.tree_add_scaled(gradient, l2_regularization, lora)


@jax.jit
def _apply_update(lora, x, sign):
    """(ΔΘ = sign·x, Θ̂ + ΔΘ in Θ̂'s dtypes, ‖ΔΘ‖)."""
    update = kernels.tree_scale(sign, x)
    new_lora = jax.tree.map(lambda p, d: (p + d).astype(p.dtype), lora, update)
    return update, new_lora, kernels.tree_norm(update)


def _check_context(context: UnlearningContext) -> None:
    if list(context.data.ids) != [example.id for example in context.examples]:
        raise ValueError("context.data must be context.examples tokenized, in the same order.")


def _trained_penalty(train_config: Mapping[str, Any] | None) -> float | None:
    """The μ the adapter was fine-tuned with (None: unknown)."""
    if train_config is None:
        return None
    return float(train_config.get("l2_regularization", 0.0) or 0.0)


def _penalty_note(*, known: bool) -> str:
    origin = (
        "The adapter was fine-tuned without an L2 penalty (μ = 0)"
        if known
        else "The adapter's fine-tune settings are unknown, so its L2 penalty is taken as μ = 0"
    )
    return (
        f"{origin}. The update assumes the adapter minimizes a penalized objective; on the "
        f"embedded default a fine-tune without the penalty let the update close "
        f"≈{_GAP_CLOSED_WITHOUT_PENALTY:g} of the forget gap against "
        f"≈{_GAP_CLOSED_WITH_PENALTY:g} with it (the project's earlier experiments). Fine-tune "
        "with an L2 penalty (--l2-regularization) for a faithful update."
    )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
