"""A deletion-rate study: S3T at several budgets (and SISA) simulated, tabled, saved and plotted.

`deletion_rate_study` simulates each budget with its own generator, seeded by (seed, budget),
so a budget's figure does not depend on which other budgets were asked for; SISA's is seeded
by (seed, 0). Every row also carries the exact expectation (`expected_deletions`), against
which the simulation can be read.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxunlearn._strict_json import strict_dumps
from jaxunlearn.errors import SettingsError
from jaxunlearn.unlearn._deletion_simulator import (
    DEFAULT_MAX_DELETIONS,
    DeletionSimulation,
    expected_deletions,
    expected_sisa_deletions,
    simulate_deletions,
    simulate_sisa_deletions,
    slice_probabilities,
)
from jaxunlearn.unlearn._slice_orders import checked_count, cyclic_orders, prior_aware_orders

__all__ = [
    "DELETION_RATE_JSON",
    "DELETION_RATE_PLOT",
    "ORDER_SELECTIONS",
    "DeletionRateRow",
    "DeletionRateStudy",
    "deletion_rate_study",
    "read_prior",
    "select_orders",
    "write_deletion_rate_report",
]

ORDER_SELECTIONS = ("cyclic", "prior-aware")
DELETION_RATE_JSON = "deletion-rate.json"
DELETION_RATE_PLOT = "deletion-rate.png"

# The seed of SISA's generator is (seed, 0): budgets start at 1, so no S3T row shares it.
_SISA_SEED_KEY = 0


class DeletionRateRow(NamedTuple):
    """One simulated configuration.

    Attributes:
        method: "S3T" or "SISA".
        budget: S3T's orders per shard, B; None for SISA.
        orders: S3T's orders, (B, L) shared by every shard or (m, B, L); None for SISA.
        simulation: The simulated counts.
        exact: The exact expected count.
    """

    method: str
    budget: int | None
    orders: np.ndarray | None
    simulation: DeletionSimulation
    exact: float


class DeletionRateStudy(NamedTuple):
    """Deletion rates of one sharding (m shards × L slices) at several budgets.

    Attributes:
        num_shards: m.
        num_slices: L.
        selection: How S3T's orders were chosen, one of `ORDER_SELECTIONS`.
        prior: The per-slice deletion weights as given, or None for a uniform prior.
        trials: Trials per row.
        seed: The seed every row's generator was derived from.
        rows: The S3T rows by increasing budget, then SISA's where asked for.
    """

    num_shards: int
    num_slices: int
    selection: str
    prior: np.ndarray | None
    trials: int
    seed: int
    rows: tuple[DeletionRateRow, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the settings and each row's figures (no per-trial counts)."""
        return {
            "num_shards": self.num_shards,
            "num_slices": self.num_slices,
            "selection": self.selection,
            "prior": None if self.prior is None else self.prior.tolist(),
            "trials": self.trials,
            "seed": self.seed,
            "rows": [
                {
                    "method": row.method,
                    "budget": row.budget,
                    "orders": None if row.orders is None else row.orders.tolist(),
                    "mean": row.simulation.mean,
                    "standard_error": row.simulation.standard_error,
                    "min": int(row.simulation.counts.min()),
                    "max": int(row.simulation.counts.max()),
                    "exact": row.exact,
                }
                for row in self.rows
            ],
        }

    def table(self) -> str:
        """The rows as a Markdown table, after one line of settings and before one of notes."""
        prior = "uniform prior" if self.prior is None else "prior " + _listed(self.prior)
        lines = [
            f"Deletions absorbed until no shard has a model: {self.num_shards} shards × "
            f"{self.num_slices} slices, {self.selection} orders, {prior}, {self.trials} trials, "
            f"seed {self.seed}.",
            "",
            "| method | budget | simulated mean ± stderr | exact |",
            "|---|---:|---:|---:|",
        ]
        for row in self.rows:
            budget = "-" if row.budget is None else str(row.budget)
            lines.append(
                f"| {row.method} | {budget} | {row.simulation.mean:.2f} ± "
                f"{row.simulation.standard_error:.2f} | {row.exact:.2f} |"
            )
        exact = (
            "m·L·H_k for S3T (k: the shards' distinct first slices) and m·H_m for SISA"
            if self.prior is None
            else "the coupon collector's expectation over the first slices (S3T) or the "
            "shards (SISA)"
        )
        lines += ["", f"exact: {exact}."]
        return "\n".join(lines)


def read_prior(spec: str, /) -> np.ndarray:
    """Per-slice deletion weights from comma-separated numbers or a JSON file.

    Args:
        spec: "8,4,2,1,1,1"-style numbers, or the path of a JSON file holding a list of L
            numbers (one per slice of a shard) or a list of m lists of L (one per slice of
            every shard).

    Raises:
        SettingsError: If the numbers do not parse or the JSON is not such a list.
        FileNotFoundError: If `spec` ends in ".json" and names no file.
    """
    path = pathlib.Path(spec)
    if spec.strip().endswith(".json") or path.is_file():
        try:
            weights = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SettingsError(f"The prior file {spec} is not JSON: {error}.") from error
        try:
            array = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise SettingsError(
                f"The prior file {spec} must hold a list of numbers, or a list of such lists "
                "of one length."
            ) from error
        if array.ndim not in (1, 2):
            raise SettingsError(
                f"The prior file {spec} must hold a list of numbers or a list of such lists, "
                f"got shape {array.shape}."
            )
        return array
    try:
        return np.asarray([float(item) for item in spec.split(",")], dtype=np.float64)
    except ValueError as error:
        raise SettingsError(
            f"The prior must be comma-separated numbers or a JSON file, got {spec!r}."
        ) from error


def select_orders(
    selection: str, /, *, num_shards: int, num_slices: int, budget: int, prior=None
) -> np.ndarray:
    """S3T's orders by the named selection: (B, L), or (m, B, L) for a per-shard prior.

    Args:
        selection: "cyclic" (`cyclic_orders`) or "prior-aware" (`prior_aware_orders`, from
            the prior's weights for each shard's slices; uniform weights without a prior).
        num_shards: m.
        num_slices: L.
        budget: B.
        prior: As for `slice_probabilities`.

    Raises:
        SettingsError: If the selection is unknown or an argument is out of range.
    """
    if selection not in ORDER_SELECTIONS:
        raise SettingsError(
            f"Unknown order selection {selection!r}: one of {', '.join(ORDER_SELECTIONS)}."
        )
    if selection == "cyclic":
        return cyclic_orders(num_slices, budget)
    probabilities = slice_probabilities(prior, num_shards=num_shards, num_slices=num_slices)
    if probabilities is None:
        return prior_aware_orders(np.ones(num_slices), budget)
    if np.ndim(prior) == 1:
        return prior_aware_orders(probabilities[0], budget)
    return np.stack([prior_aware_orders(shard, budget) for shard in probabilities])


def deletion_rate_study(
    *,
    num_shards: int,
    num_slices: int,
    budgets: Sequence[int],
    sisa: bool = False,
    prior=None,
    selection: str = "cyclic",
    trials: int,
    seed: int,
    max_deletions: int = DEFAULT_MAX_DELETIONS,
) -> DeletionRateStudy:
    """Simulates S3T at each budget (and SISA), with each row's exact expectation.

    Args:
        num_shards: m.
        num_slices: L.
        budgets: S3T's budgets, each in 1..L; repeats are dropped. May be empty if `sisa`.
        sisa: Add SISA's row.
        prior: Per-slice deletion weights, (L,) or (m, L) (`slice_probabilities`); None:
            uniform.
        selection: How S3T's orders are chosen, one of `ORDER_SELECTIONS`.
        trials: Trials per row (≥ 2).
        seed: An int ≥ 0 from which every row's generator is derived.
        max_deletions: The longest trial allowed (`simulate_deletions`).

    Raises:
        SettingsError: If an argument is out of range or there is nothing to simulate.
    """
    num_shards = checked_count(num_shards, "num_shards")
    num_slices = checked_count(num_slices, "num_slices")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise SettingsError(f"seed must be an integer ≥ 0, got {seed!r}.")
    budgets = sorted({checked_count(budget, "budget") for budget in budgets})
    if not budgets and not sisa:
        raise SettingsError("Nothing to simulate: give at least one budget, or SISA.")
    given_prior = None if prior is None else np.asarray(prior, dtype=np.float64)
    slice_probabilities(given_prior, num_shards=num_shards, num_slices=num_slices)  # checks

    rows = []
    for budget in budgets:
        orders = select_orders(
            selection,
            num_shards=num_shards,
            num_slices=num_slices,
            budget=budget,
            prior=given_prior,
        )
        simulation = simulate_deletions(
            orders,
            num_shards=num_shards,
            trials=trials,
            seed=[int(seed), budget],
            prior=given_prior,
            max_deletions=max_deletions,
        )
        exact = expected_deletions(orders, num_shards=num_shards, prior=given_prior)
        rows.append(DeletionRateRow("S3T", budget, orders, simulation, exact))
    if sisa:
        simulation = simulate_sisa_deletions(
            num_shards,
            trials=trials,
            seed=[int(seed), _SISA_SEED_KEY],
            prior=given_prior,
            max_deletions=max_deletions,
        )
        exact = expected_sisa_deletions(num_shards, prior=given_prior)
        rows.append(DeletionRateRow("SISA", None, None, simulation, exact))
    return DeletionRateStudy(
        num_shards=num_shards,
        num_slices=num_slices,
        selection=selection,
        prior=given_prior,
        trials=rows[0].simulation.trials,
        seed=int(seed),
        rows=tuple(rows),
    )


def write_deletion_rate_report(
    study: DeletionRateStudy, out: str | os.PathLike, /
) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes `deletion-rate.json` (strict JSON) and `deletion-rate.png` into `out`.

    The folder is made if missing; files of those names in it are replaced.

    Returns:
        The paths of the JSON file and of the plot.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / DELETION_RATE_JSON
    json_path.write_text(strict_dumps(study.to_json(), indent=2) + "\n")
    plot_path = out / DELETION_RATE_PLOT
    _plot(study, plot_path)
    return json_path, plot_path


def _plot(study: DeletionRateStudy, path: pathlib.Path) -> None:
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.add_subplot()
    s3t = [row for row in study.rows if row.method == "S3T"]
    if s3t:
        budgets = [row.budget for row in s3t]
        axes.errorbar(
            budgets,
            [row.simulation.mean for row in s3t],
            yerr=[2 * row.simulation.standard_error for row in s3t],
            marker="o",
            capsize=3,
            label=f"S3T, {study.selection} orders (simulated ± 2 s.e.)",
        )
        axes.plot(budgets, [row.exact for row in s3t], "k_", markersize=14, label="S3T exact")
        axes.set_xticks(budgets)
    for row in study.rows:
        if row.method == "SISA":
            axes.axhline(
                row.simulation.mean,
                color="tab:red",
                linestyle="--",
                label=f"SISA (simulated {row.simulation.mean:.1f}, exact {row.exact:.1f})",
            )
    axes.set_xlabel("budget B (orders per shard)")
    axes.set_ylabel("deletions until no shard has a model")
    prior = "uniform prior" if study.prior is None else "given prior"
    axes.set_title(
        f"{study.num_shards} shards × {study.num_slices} slices, {prior}, {study.trials} trials"
    )
    axes.set_ylim(bottom=0)
    axes.legend(fontsize="small")
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=120)


def _listed(weights: np.ndarray) -> str:
    if weights.size > 36:
        return f"of shape {weights.shape}"
    return json.dumps(np.round(weights, 6).tolist())
