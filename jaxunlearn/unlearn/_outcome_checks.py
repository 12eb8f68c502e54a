"""The checks every method's outcome passes before anything is written.

An update is refused when it is not finite, when it leaves the adapter as it was (nothing would
be unlearned, though the ledger would say a deletion was applied), or when it makes the
objective after the request worse on a held sample of the data after the request (a step
that overshot: on a real pretrained model a Newton step once took every loss from about 2 to
10 and was reported as a success).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import curvature, kernels
from jaxunlearn.data import tokenize_examples
from jaxunlearn.errors import UserError

__all__ = [
    "HELD_SAMPLE_SIZE",
    "NO_EFFECT_TOLERANCE",
    "OBJECTIVE_TOLERANCE",
    "NoEffectError",
    "ObjectiveWorsenedError",
    "check_outcome",
]

# The held sample of the objective after the request: this many retained examples (plus every
# edited one), enough to see a step that overshoots, few enough to cost two small forward passes.
HELD_SAMPLE_SIZE = 64
# An update is refused when the held objective after the request grows by more than this
# fraction; the relative change of the adapter below which it "changes nothing".
OBJECTIVE_TOLERANCE = 0.01
NO_EFFECT_TOLERANCE = 1e-6


class NoEffectError(UserError, RuntimeError):
    """The method's update leaves the adapter as it was: nothing would be unlearned."""


class ObjectiveWorsenedError(UserError, RuntimeError):
    """The update makes the objective after the request worse on a held sample."""


def check_outcome(
    outcome, context, resolved, tokenizer, tokenization, settings, *, refuse_worse: bool = True
) -> tuple[dict, list[str]]:
    """The figures of the checks, and notes for the user.

    `refuse_worse=False` is for methods whose update is itself a fine-tune of the objective
    after the request (module removal's restoration): a worse objective there means a budget
    too small for the utility the user wants, not a step in a wrong direction, so it is
    reported as a note rather than refused.
    """
    graphdef, before, base = curvature.split_for_curvature(context.model)
    after = outcome.lora
    if jax.tree.structure(after) != jax.tree.structure(before):
        raise TypeError("The method returned an adapter tree of another structure.")
    if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(after)):
        raise kernels.SolverError(
            "The method's update is not finite (NaN or infinity); nothing was written."
        )
    change = float(kernels.tree_norm(kernels.tree_sub(after, before)))
    scale = float(kernels.tree_norm(before))
    relative_change = change / scale if scale else change
    if relative_change <= NO_EFFECT_TOLERANCE:
        raise NoEffectError(
            f"The update changes the adapter by {relative_change:.3g} of its norm: nothing would "
            "be unlearned (is the damping far too large?); nothing was written."
        )
    held = _held_batches(context, resolved, tokenizer, tokenization)
    penalty = _penalty(settings, context)
    objective_before = _objective(graphdef, before, base, held, penalty)
    objective_after = _objective(graphdef, after, base, held, penalty)
    notes = []
    worse = objective_after > objective_before * (1 + OBJECTIVE_TOLERANCE)
    if math.isfinite(objective_after) and worse and not refuse_worse:
        rise = 100 * (objective_after / objective_before - 1)
        notes.append(
            f"The objective after the request is {rise:.3g}% "
            f"worse on a held sample of the retained data ({objective_before:.4g} before, "
            f"{objective_after:.4g} after): the restoration's budget did not recover the "
            "utility the reset took; a larger budget (--restore-steps) recovers more."
        )
    elif not math.isfinite(objective_after) or worse:
        raise ObjectiveWorsenedError(
            f"The update makes the objective after the request worse on a held sample of "
            f"{sum(curvature.real_examples(batch) for batch in held)} examples: "
            f"{objective_before:.4g} before, {objective_after:.4g} after (more than "
            f"{100 * OBJECTIVE_TOLERANCE:g}% worse); nothing was written. Try a larger damping, "
            "more solver steps, or the Gauss-Newton curvature."
        )
    figures = {
        "relative_change": relative_change,
        "held_objective_before": objective_before,
        "held_objective_after": objective_after,
    }
    return figures, notes


def _held_batches(context, resolved, tokenizer, tokenization):
    after = resolved.examples_after
    rng = np.random.default_rng(0)
    edited_ids = {example.id for example in resolved.replacements}
    retained = [example for example in after if example.id not in edited_ids]
    size = min(HELD_SAMPLE_SIZE, len(retained))
    chosen = [retained[i] for i in np.sort(rng.choice(len(retained), size, replace=False))]
    held = tokenize_examples([*chosen, *resolved.replacements], tokenizer, **tokenization)
    order = np.argsort(held.lengths, kind="stable")
    placement = context.placement
    batch_size = placement.round_batch_size(8)
    return [
        placement.batch(held.batch(order[start : start + batch_size], batch_size=batch_size))
        for start in range(0, len(order), batch_size)
    ]


def _penalty(settings, context) -> float:
    """μ of the objective: the method's setting when it has one, else the fine-tune's."""
    for value in (
        getattr(getattr(settings, "curvature", None), "l2_regularization", None),
        getattr(settings, "l2_regularization", None),
        (context.train_config or {}).get("l2_regularization"),
    ):
        if isinstance(value, int | float):
            return float(value)
    return 0.0


def _objective(graphdef, lora, base, batches, penalty: float) -> float:
    loss = _jitted_objective(graphdef)
    total, count = 0.0, 0
    for batch in batches:
        rows = curvature.real_examples(batch)
        if rows:
            total += rows * float(loss(lora, base, batch))
            count += rows
    squared = float(kernels.tree_vdot(lora, lora))
    return total / count + 0.5 * penalty * squared


@functools.cache
def _jitted_objective(graphdef):
    # One compiled objective per graph, reused by every later request on the same model.
    return jax.jit(curvature.objective(graphdef))
