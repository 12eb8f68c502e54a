"""LLMEraser's request-independent work at one adapter, and its storage on disk.

Computed once and reused by every request on the same adapter and data: the fixed curvature
sample, the spectrum estimate and the damping chosen from it, the low-rank eigenbasis, and the
full-data gradient of a Newton step. It is immutable: the curvature operator of the sample is
not kept in it but built by each request that needs it (one linearization per request), so a
preparation can be saved, loaded and shared without hidden state.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import curvature, kernels
from jaxunlearn.batch import Batch
from jaxunlearn.checkpoint import load_adapter, read_adapter_metadata, save_adapter
from jaxunlearn.data import DataError, TokenizedDataset
from jaxunlearn.errors import SettingsError
from jaxunlearn.parallel import ONE_DEVICE, Placement
from jaxunlearn.unlearn._llmeraser_settings import EraserSettings
from jaxunlearn.unlearn._method import PreparationMismatchError, Prepared

__all__ = [
    "EraserPreparation",
    "length_sorted_batches",
    "load_preparation",
    "preparation_key",
    "prepare",
    "save_preparation",
]

_FORMAT = "jaxunlearn.llmeraser-preparation/2"
_NO_SPECTRUM = curvature.Spectrum(math.nan, math.nan, (), 0)


@dataclasses.dataclass(frozen=True, eq=False)
class EraserPreparation:
    """The request-independent work of LLMEraser at one adapter.

    Attributes:
        num_examples: n, the number of training examples.
        sample_indices: Positions of the fixed curvature sample in the training set, ascending
            (read-only).
        spectrum: Extreme eigenvalue estimates of the sample's curvature (NaN when nothing
            needed them: cg with a given damping).
        damping: The λ every solve of this preparation uses.
        l2_regularization: The μ of the penalty the solves add to the curvature.
        eigenpairs: The top eigenpairs of the sample's curvature (lowrank only).
        full_gradient: Σ G(z) over the whole training set (newton only).
    """

    num_examples: int
    sample_indices: np.ndarray
    spectrum: curvature.Spectrum
    damping: float
    l2_regularization: float
    eigenpairs: kernels.Eigenpairs | None = None
    full_gradient: Any | None = None

    def __post_init__(self):
        indices = np.array(self.sample_indices, np.int64)
        indices.setflags(write=False)
        object.__setattr__(self, "sample_indices", indices)

    @property
    def shift(self) -> float:
        """What the solves add to the curvature: μ + λ (the penalty's and the damping's)."""
        return self.l2_regularization + self.damping

    def curvature_sample(self, left_out: Sequence[int] | np.ndarray = (), /) -> np.ndarray:
        """The positions the curvature is taken over: the sample less `left_out`.

        Raises:
            SettingsError: If `left_out` covers the whole sample.
        """
        if not len(left_out):
            return self.sample_indices
        kept = np.setdiff1d(self.sample_indices, np.asarray(left_out, np.int64))
        if not kept.size:
            raise SettingsError(
                "The request touches every example of the curvature sample; nothing is left to "
                "take the curvature over (raise sample_size or set leave_out_request=False)."
            )
        return kept

    def fixed_operator(
        self,
        graphdef,
        lora,
        base,
        data: TokenizedDataset,
        /,
        *,
        kind: curvature.CurvatureKind,
        batch_size: int,
        left_out: Sequence[int] | np.ndarray = (),
        placement: Placement = ONE_DEVICE,
        linearization_budget_gib: float = math.inf,
    ):
        """v ↦ Cv over `curvature_sample(left_out)` (a new one each call): linearized here
        when the linearizations take at most `linearization_budget_gib` per device (their
        total over the placement's devices), else recomputed batch by batch per product."""
        batches = length_sorted_batches(
            data, self.curvature_sample(left_out), batch_size, placement=placement
        )
        linearize = linearization_budget_gib > 0
        if 0 < linearization_budget_gib < math.inf:  # else the answer needs no measuring
            saved = curvature.linearization_bytes(graphdef, lora, base, batches, kind=kind)
            devices = 1 if placement.mesh is None else placement.mesh.size
            linearize = saved / devices <= linearization_budget_gib * 2**30
        return curvature.fixed_curvature(
            graphdef, lora, base, batches, kind=kind, linearize=linearize
        )


def preparation_key(settings: EraserSettings, /) -> dict[str, Any]:
    """The settings a preparation depends on, None where they do not matter.

    Raises:
        ValueError: If the settings are not settled (`LLMEraser.settle` fills in μ).
    """
    curv = settings.curvature
    if curv.l2_regularization is None:
        raise ValueError(
            "preparation_key needs settled settings: call LLMEraser.settle(settings, context) "
            "first (it fills in the adapter's L2 penalty)."
        )
    rank = settings.strategy.eigenbasis_rank(settings)
    estimated = rank is None and _estimates_spectrum(settings)
    return {
        "curvature": curv.kind,
        "sample_size": curv.sample_size,
        "batch_size": curv.batch_size,
        "seed": settings.seed,
        "l2_regularization": curv.l2_regularization,
        "damping": curv.damping,
        "relative_damping": curv.relative_damping if curv.damping is None else None,
        "spectrum_steps": curv.spectrum_steps if estimated else None,
        "eigenbasis_rank": rank,
        "full_gradient": settings.mode == "newton",
    }


def _estimates_spectrum(settings: EraserSettings) -> bool:
    # For the damping rule, LiSSA's scale and the SGD step size.
    return settings.curvature.damping is None or settings.strategy.needs_spectrum


def prepare(
    graphdef,
    lora,
    base,
    data: TokenizedDataset,
    settings: EraserSettings,
    /,
    *,
    placement: Placement = ONE_DEVICE,
) -> EraserPreparation:
    """Does the request-independent work at `lora` (settled settings: μ is a number), with
    every batch placed by `placement` (the model's own).

    Raises:
        SettingsError: If the damping cannot be chosen from the spectrum (it has no positive
            eigenvalue).
        kernels.SolverError: If the curvature is indefinite for a solver that cannot handle it.
    """
    curv = settings.curvature
    strategy = settings.strategy
    n = len(data)
    if n == 0:
        raise DataError("The training set is empty.")
    rng = np.random.default_rng(settings.seed)
    sample = np.sort(rng.choice(n, min(curv.sample_size, n), replace=False))
    key = jax.random.key(settings.seed)
    preparation = EraserPreparation(
        num_examples=n,
        sample_indices=sample,
        spectrum=_NO_SPECTRUM,
        damping=math.nan,
        l2_regularization=curv.l2_regularization,
    )
    rank = strategy.eigenbasis_rank(settings)
    eigenpairs = None
    spectrum = _NO_SPECTRUM
    if rank is not None or _estimates_spectrum(settings):
        operator = preparation.fixed_operator(
            graphdef,
            lora,
            base,
            data,
            kind=curv.kind,
            batch_size=curv.batch_size,
            placement=placement,
            linearization_budget_gib=curv.linearization_budget_gib,
        )
        if rank is not None:
            # One Lanczos run gives both the eigenbasis and the spectrum estimate.
            start = kernels.tree_random_normal_like(key, lora)
            eigenpairs = curvature.jitted_lanczos(
                operator, start, num_steps=rank, key=jax.random.fold_in(key, 1)
            )
            spectrum = curvature.Spectrum.of(eigenpairs, rank)
        else:
            spectrum = curvature.estimate_spectrum(
                operator, lora, num_steps=curv.spectrum_steps, key=key
            )
    damping = curv.damping
    if damping is None:
        try:
            damping = curvature.choose_damping(spectrum, relative=curv.relative_damping)
        except ValueError as error:
            raise SettingsError(f"{error} Or set the damping explicitly.") from error
    preparation = dataclasses.replace(
        preparation, spectrum=spectrum, damping=damping, eigenpairs=eigenpairs
    )
    strategy.check_curvature(preparation)
    if settings.mode == "newton":
        batches = length_sorted_batches(data, np.arange(n), curv.batch_size, placement=placement)
        preparation = dataclasses.replace(
            preparation, full_gradient=curvature.objective_gradient(graphdef, lora, base, batches)
        )
    # Dispatch is asynchronous: the work counts as done when its arrays are.
    jax.block_until_ready((preparation.eigenpairs, preparation.full_gradient))
    return preparation


def length_sorted_batches(
    data: TokenizedDataset,
    indices: Sequence[int] | np.ndarray,
    batch_size: int,
    *,
    placement: Placement = ONE_DEVICE,
) -> list[Batch]:
    """Batches of the examples at `indices`, grouped by length to pad little, placed by
    `placement` (on a mesh, their rows split over its batch axes)."""
    indices = np.asarray(indices, np.int64)
    ordered = indices[np.argsort(data.lengths[indices], kind="stable")]
    return [
        placement.batch(data.batch(ordered[start : start + batch_size], batch_size=batch_size))
        for start in range(0, len(ordered), batch_size)
    ]


def save_preparation(prepared: Prepared, path: str | os.PathLike, /) -> None:
    """Writes a preparation to a new directory (arrays with orbax, the rest as JSON).

    Raises:
        FileExistsError: If `path` exists.
    """
    value: EraserPreparation = prepared.value
    pairs = value.eigenpairs
    tree = {"sample_indices": np.asarray(value.sample_indices)}
    if pairs is not None:
        tree["eigenvalues"] = np.asarray(pairs.eigenvalues)
        tree["eigenvectors"] = pairs.eigenvectors
        tree["eigen_residuals"] = np.asarray(pairs.residuals)
    if value.full_gradient is not None:
        tree["full_gradient"] = value.full_gradient
    spectrum = value.spectrum
    metadata = {
        "format": _FORMAT,
        "method": prepared.method,
        "adapter_digest": prepared.adapter_digest,
        "data_digest": prepared.data_digest,
        "settings_key": dict(prepared.settings_key),
        "seconds": prepared.seconds,
        "num_examples": value.num_examples,
        "num_samples": len(value.sample_indices),
        # JSON has no NaN: an estimate nothing needed is stored as null.
        "spectrum": {
            "largest": _finite_or_none(spectrum.largest),
            "smallest": _finite_or_none(spectrum.smallest),
            "ritz_values": list(spectrum.ritz_values),
            "num_steps": spectrum.num_steps,
        },
        "damping": value.damping,
        "l2_regularization": value.l2_regularization,
        "has_full_gradient": value.full_gradient is not None,
        "num_eigenpairs": None if pairs is None else int(np.shape(pairs.eigenvalues)[0]),
        "eigenvalue_dtype": None if pairs is None else str(np.asarray(pairs.eigenvalues).dtype),
    }
    save_adapter(path, tree, metadata=metadata)


def load_preparation(path: str | os.PathLike, lora_like, /) -> Prepared:
    """Reads a preparation written by `save_preparation`, for adapters shaped like `lora_like`.

    The result is not checked against any adapter: `Prepared.check` does that.

    Raises:
        FileNotFoundError: If `path` holds no saved preparation.
        PreparationMismatchError: If it holds something else, or arrays of another shape.
    """
    metadata = read_adapter_metadata(path)
    if metadata.get("format") != _FORMAT:
        raise PreparationMismatchError(
            f"{os.fspath(path)} is not an LLMEraser preparation of this version "
            f"(format {metadata.get('format')!r}, expected {_FORMAT!r})."
        )
    target: dict[str, Any] = {
        "sample_indices": np.zeros((metadata["num_samples"],), np.int64),
    }
    count = metadata["num_eigenpairs"]
    if count is not None:
        dtype = np.dtype(metadata["eigenvalue_dtype"])
        target["eigenvalues"] = np.zeros((count,), dtype)
        target["eigen_residuals"] = np.zeros((count,), dtype)
        target["eigenvectors"] = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(
                (count, *leaf.shape), leaf.dtype, sharding=_stacked_sharding(leaf)
            ),
            lora_like,
        )
    if metadata["has_full_gradient"]:
        target["full_gradient"] = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(
                leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None)
            ),
            lora_like,
        )
    try:
        tree, _ = load_adapter(path, target=target)
    except ValueError as error:
        raise PreparationMismatchError(
            f"{os.fspath(path)} does not fit this adapter: {error}"
        ) from error
    spectrum = metadata["spectrum"]
    eigenpairs = None
    if count is not None:
        eigenpairs = kernels.Eigenpairs(
            jnp.asarray(tree["eigenvalues"]),
            tree["eigenvectors"],
            jnp.asarray(tree["eigen_residuals"]),
        )
    value = EraserPreparation(
        num_examples=metadata["num_examples"],
        sample_indices=np.asarray(tree["sample_indices"]),
        spectrum=curvature.Spectrum(
            _nan_if_none(spectrum["largest"]),
            _nan_if_none(spectrum["smallest"]),
            tuple(spectrum["ritz_values"]),
            spectrum["num_steps"],
        ),
        damping=metadata["damping"],
        l2_regularization=metadata["l2_regularization"],
        eigenpairs=eigenpairs,
        full_gradient=tree.get("full_gradient"),
    )
    return Prepared(
        method=metadata["method"],
        adapter_digest=metadata["adapter_digest"],
        data_digest=metadata["data_digest"],
        settings_key=metadata["settings_key"],
        value=value,
        seconds=metadata["seconds"],
    )


def _stacked_sharding(leaf):
    """The sharding of a stack of trees like `leaf` (eigenvectors): the stack axis whole, the
    rest like `leaf` (None for a leaf that has no mesh sharding)."""
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    return jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec)
    )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value
