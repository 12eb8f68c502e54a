"""A test-only unlearning method: a few gradient steps on the objective after the request.

It exists to show that adding a method is one module plus one `register` call, and to drive
the exactly-once protocol through every step cheaply. Registered as "retain-descent".
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import ClassVar

import jax
import numpy as np

from jaxunlearn import curvature, kernels
from jaxunlearn.unlearn import MethodOutcome, Prepared, register

NAME = "retain-descent"


@dataclasses.dataclass(frozen=True)
class DescentSettings:
    """Gradient descent on the retained examples.

    Attributes:
        steps: Gradient steps (0 changes nothing: the protocol must refuse it).
        learning_rate: Step size (a huge one makes the objective worse).
        prepare_norm: Prepare the full-data gradient norm (to exercise preparations).
    """

    steps: int = 2
    learning_rate: float = 0.05
    prepare_norm: bool = True


class RetainDescent:
    name: ClassVar[str] = NAME
    settings_type: ClassVar[type] = DescentSettings
    description: ClassVar[str] = "gradient steps on the data after the request (tests only)"

    def settle(self, settings, context):
        return settings, []

    def preparation_key(self, settings):
        return {"prepare_norm": True} if settings.prepare_norm else None

    def prepare(self, context, settings):
        graphdef, lora, base = curvature.split_for_curvature(context.model)
        batches = [context.data.batch(np.arange(len(context.data)))]
        gradient = curvature.objective_gradient(graphdef, lora, base, batches, reduction="mean")
        return Prepared(
            NAME,
            context.adapter_digest,
            context.data_digest,
            self.preparation_key(settings),
            float(kernels.tree_norm(gradient)),
        )

    def warm_up(self, context, resolved, settings, prepared):
        return None

    def apply(self, context, resolved, settings, prepared):
        graphdef, lora, base = curvature.split_for_curvature(context.model)
        kept = np.setdiff1d(np.arange(len(context.data)), resolved.indices)
        batch = context.data.batch(kept)
        for _ in range(settings.steps):
            gradient = curvature.objective_gradient(graphdef, lora, base, [batch], reduction="mean")
            lora = kernels.tree_add_scaled(lora, -settings.learning_rate, gradient)
        lora = jax.tree.map(lambda leaf: leaf.astype(np.float32), lora)
        return MethodOutcome(
            lora=lora,
            approximate=True,
            converged=None,
            residual=None,
            figures={"steps": settings.steps},
            message=f"{settings.steps} descent steps on {len(kept)} retained examples.",
        )

    def save_preparation(self, prepared, path):
        pathlib.Path(path).mkdir(parents=True)
        (pathlib.Path(path) / "prepared.json").write_text(json.dumps(dataclasses.asdict(prepared)))

    def load_preparation(self, path, context):
        return Prepared(**json.loads((pathlib.Path(path) / "prepared.json").read_text()))


register(NAME, RetainDescent, replace=True)
