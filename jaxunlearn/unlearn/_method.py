"""The interface every unlearning method implements, and the registry `apply_request` reads.

A method is one module that declares:
- its settings, a frozen dataclass whose fields (with their types, defaults and the
  `Attributes:` section of its docstring) become the command line's flags;
- optionally, what it prepares: request-independent work done once at an adapter and reused
  by later requests, keyed to the adapter digest and data digest it was made at (a mismatch
  raises `PreparationMismatchError`, never a silent reuse);
- how it turns a resolved request into a new adapter tree (`MethodOutcome`).

The method computes and nothing else: `apply_request` checks the request against the
adapter's lineage and the ledger before calling it, checks its outcome (finite, changes
something, does not make the objective after the request worse; a method whose update is a
fine-tune of that objective sets `refuses_worse_objective = False` to have a worse one
reported as a note instead), and saves and records it.
Adding a method is this module's protocol implemented once plus one `register` call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from flax import nnx

from jaxunlearn.data import Example, TokenizedDataset
from jaxunlearn.errors import UserError
from jaxunlearn.parallel import ONE_DEVICE, Placement
from jaxunlearn.unlearn._requests import ResolvedRequest

__all__ = [
    "Method",
    "MethodOutcome",
    "PreparationMismatchError",
    "Prepared",
    "UnknownMethodError",
    "UnlearningContext",
    "get_method",
    "method_names",
    "register",
]


class PreparationMismatchError(UserError, ValueError):
    """A preparation belongs to another adapter, dataset, method or settings."""


class UnknownMethodError(UserError, ValueError):
    """No unlearning method is registered under the name asked for."""


@dataclasses.dataclass(frozen=True)
class UnlearningContext:
    """What a method sees of the adapter a request is applied to.

    Attributes:
        model: The base model holding the adapter (Θ̂). A method must not change it: it
            returns the new adapter tree instead.
        examples: The adapter's current training set (after every earlier request of its
            lineage), in training order.
        data: `examples` tokenized exactly as the adapter was trained on them.
        tokenizer: The tokenizer of `data` (to tokenize edited examples).
        adapter_digest: The digest of the adapter's LoRA arrays.
        data_digest: The digest of `examples` (ids and contents, in order).
        train_config: The fine-tune's `TrainConfig` as a dict, or None when unknown (an
            adapter from elsewhere).
        placement: Where `model` lives (one device, or a mesh and its rules); a method
            places its batches and state with it, so that its arrays meet the model's.
    """

    model: nnx.Module
    examples: Sequence[Example]
    data: TokenizedDataset
    tokenizer: Any
    adapter_digest: str
    data_digest: str
    train_config: Mapping[str, Any] | None = None
    placement: Placement = ONE_DEVICE


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Request-independent work of a method at one adapter.

    Attributes:
        method: The method's name.
        adapter_digest: The adapter digest it was computed at.
        data_digest: The data digest it was computed on.
        settings_key: The settings it depends on (JSON-like), compared on reuse.
        value: The method's own object.
        seconds: Wall-clock of the preparation.
    """

    method: str
    adapter_digest: str
    data_digest: str
    settings_key: Mapping[str, Any]
    value: Any
    seconds: float = 0.0

    def check(self, method: str, context: UnlearningContext, settings_key: Mapping[str, Any]):
        """Raises `PreparationMismatchError` unless it was made for exactly this use."""
        problems = []
        if self.method != method:
            problems.append(f"it is a {self.method!r} preparation, not {method!r}")
        if self.adapter_digest != context.adapter_digest:
            problems.append(
                f"it was made at adapter {self.adapter_digest[:12]}, the request is on "
                f"{context.adapter_digest[:12]}"
            )
        if self.data_digest != context.data_digest:
            problems.append("it was made on other training data")
        differing = sorted(
            name
            for name in set(self.settings_key) | set(settings_key)
            if self.settings_key.get(name) != settings_key.get(name)
        )
        if differing:
            shown = ", ".join(
                f"{name}={self.settings_key.get(name)!r} (asked {settings_key.get(name)!r})"
                for name in differing
            )
            problems.append(f"it was made with {shown}")
        if problems:
            raise PreparationMismatchError(
                "The preparation cannot serve this request: " + "; ".join(problems) + "."
            )


@dataclasses.dataclass(frozen=True)
class MethodOutcome:
    """What a method computed for one request.

    Attributes:
        lora: The new adapter tree (the structure and dtypes of the context's adapter).
        approximate: True when the method stopped on a work budget its settings asked for,
            or approximates by construction; recorded as approximate, never as exact.
        converged: Whether an iterative solve reached its tolerance (None: no such solve).
        residual: The solve's final relative residual (None: none).
        figures: Numbers about the run (finite floats, ints, strings, bools or None).
        message: One line for people.
    """

    lora: nnx.State
    approximate: bool
    converged: bool | None
    residual: float | None
    figures: Mapping[str, Any]
    message: str


@runtime_checkable
class Method(Protocol):
    """An unlearning method: settings, an optional preparation, and the update.

    Attributes:
        name: The registry name (`--method NAME`).
        settings_type: The frozen dataclass of its settings.
        description: One line for `--help`.
    """

    name: ClassVar[str]
    settings_type: ClassVar[type]
    description: ClassVar[str]

    def settle(self, settings: Any, context: UnlearningContext, /) -> tuple[Any, list[str]]:
        """The settings with what defaults from the adapter filled in (e.g. its L2 penalty),
        and notes for the user about that choice (e.g. what a missing penalty costs).

        Raises:
            jaxunlearn.errors.SettingsError: If the settings cannot serve this adapter.
        """
        ...

    def preparation_key(self, settings: Any, /) -> Mapping[str, Any] | None:
        """The settings a preparation depends on; None when the method prepares nothing."""
        ...

    def prepare(self, context: UnlearningContext, settings: Any, /) -> Prepared | None:
        """The request-independent work at the context's adapter (None: nothing to prepare)."""
        ...

    def warm_up(
        self,
        context: UnlearningContext,
        resolved: ResolvedRequest,
        settings: Any,
        prepared: Prepared | None,
        /,
    ) -> None:
        """Compiles what `apply` will run for this request (without its cost counting), so
        that timing `apply` afterwards measures running, not compiling. May do nothing."""
        ...

    def apply(
        self,
        context: UnlearningContext,
        resolved: ResolvedRequest,
        settings: Any,
        prepared: Prepared | None,
        /,
    ) -> MethodOutcome:
        """The new adapter for a request resolved against `context.examples`."""
        ...

    def save_preparation(self, prepared: Prepared, path: str | os.PathLike, /) -> None:
        """Writes a preparation to a new directory."""
        ...

    def load_preparation(self, path: str | os.PathLike, context: UnlearningContext, /) -> Prepared:
        """Reads a preparation written by `save_preparation` (not yet checked)."""
        ...


_REGISTRY: dict[str, Callable[[], Method]] = {}


def register(name: str, factory: Callable[[], Method], /, *, replace: bool = False) -> None:
    """Makes a method available to `apply_request` and `jaxunlearn unlearn --method`.

    Args:
        name: The method's name (its `name` attribute).
        factory: Builds the method (called on each lookup; methods hold no state).
        replace: Allow replacing a method already registered under `name`.
    """
    if not replace and name in _REGISTRY:
        raise ValueError(f"An unlearning method named {name!r} is already registered.")
    _REGISTRY[name] = factory


def unregister(name: str, /) -> None:
    """Removes a registered method (for tests and plug-ins)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered methods' names, sorted."""
    return tuple(sorted(_REGISTRY))


def get_method(name: str, /) -> Method:
    """The registered method `name`.

    Raises:
        UnknownMethodError: If none is registered under that name.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"Unknown unlearning method {name!r}; registered: {', '.join(method_names())}."
        ) from None
    method = factory()
    if method.name != name:
        raise ValueError(f"Method registered as {name!r} calls itself {method.name!r}.")
    return method
