"""Report plots, written as PNG files.

Figures are built with `matplotlib.figure.Figure` and its Agg canvas, never through pyplot:
no global figure registry to leak into, no GUI backend, and nothing to close afterwards.
"""

import os
from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxunlearn.eval._mia import mia_auc


def plot_forget_losses(
    path: str | os.PathLike,
    losses: Mapping[str, np.ndarray],
    /,
    *,
    title: str = "Per-example forget-set loss",
    sort_by: str | None = None,
) -> str | os.PathLike:
    """Plots each model's per-example loss on the forget set, one series per model.

    Examples are sorted by one model's loss (the original's, by default), so the plot shows how
    every other model moved each example relative to it.

    Args:
        path: The PNG file to write.
        losses: Per-example ℓ of each model, all in one example order, e.g. keys "original",
            "unlearned", "retrained".
        title: The figure title.
        sort_by: The model whose losses order the examples; defaults to "original" when it is
            a key, else the first model.

    Returns:
        `path`.

    Raises:
        ValueError: If there is no model, a series is empty, the lengths differ, or `sort_by`
            is not a key.
    """
    series = _checked_series(losses, "losses")
    if sort_by is None:
        sort_by = "original" if "original" in series else next(iter(series))
    if sort_by not in series:
        raise ValueError(f"sort_by={sort_by!r} is not one of the models {list(series)}.")
    order = np.argsort(series[sort_by], kind="stable")
    rank = np.arange(len(order))

    figure = Figure(figsize=(7.0, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for name, values in series.items():
        axes.plot(rank, values[order], marker="o", markersize=3, linewidth=1, label=name)
    axes.set_xlabel(f"forget example (sorted by {sort_by} loss)")
    axes.set_ylabel("mean response-token NLL ℓ")
    axes.set_title(title)
    axes.legend()
    return _save(figure, path)


def plot_score_histograms(
    path: str | os.PathLike,
    member: Mapping[str, np.ndarray],
    nonmember: Mapping[str, np.ndarray],
    /,
    *,
    score_name: str = "MIA score",
    bins: int = 20,
) -> str | os.PathLike:
    """Overlays histograms of member and non-member scores, one subplot per model.

    Each subplot's title gives the model and its AUC (members labelled 1, `mia_auc`).

    Args:
        path: The PNG file to write.
        member: Each model's member-high scores of the members (the forget set).
        nonmember: The same models' scores of the non-members; same keys as `member`.
        score_name: The x-axis label, e.g. "Min-40% log-prob".
        bins: Histogram bins, shared by members and non-members within a subplot.

    Returns:
        `path`.

    Raises:
        ValueError: If the keys differ, there is no model, or scores are empty or not finite.
    """
    if list(member) != list(nonmember):
        raise ValueError(
            f"member and nonmember name different models: {list(member)} vs {list(nonmember)}."
        )
    if not member:
        raise ValueError("No model to plot.")
    figure = Figure(figsize=(4.0 * len(member), 3.5), layout="constrained")
    subplots = figure.subplots(1, len(member), squeeze=False)[0]
    for axes, name in zip(subplots, member, strict=True):
        members = np.asarray(member[name], np.float64).reshape(-1)
        nonmembers = np.asarray(nonmember[name], np.float64).reshape(-1)
        auc = mia_auc(members, nonmembers)  # also checks both sides are non-empty and finite
        edges = np.histogram_bin_edges(np.concatenate([members, nonmembers]), bins=bins)
        axes.hist(nonmembers, bins=edges, alpha=0.5, label="non-member")
        axes.hist(members, bins=edges, alpha=0.5, label="member")
        axes.set_title(f"{name}: AUC {auc:.3f}")
        axes.set_xlabel(score_name)
        axes.set_ylabel("examples")
        axes.legend()
    return _save(figure, path)


def _checked_series(series: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    if not series:
        raise ValueError(f"{name} names no model to plot.")
    arrays = {key: np.asarray(values, np.float64).reshape(-1) for key, values in series.items()}
    lengths = {key: values.size for key, values in arrays.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"Every model needs the same, non-zero number of examples: {lengths}.")
    return arrays


def _save(figure: Figure, path: str | os.PathLike) -> str | os.PathLike:
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=120)
    return path
