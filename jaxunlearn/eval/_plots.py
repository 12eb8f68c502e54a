"""Report plots, written as PNG files.

Figures are built with `matplotlib.figure.Figure` and its Agg canvas, never through pyplot:
no global figure registry to leak into, no GUI backend, and nothing to close afterwards.
"""

import math
import os
from collections.abc import Collection, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

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
    return save_figure(figure, path)


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
    return save_figure(figure, path)


def plot_module_scores(
    path: str | os.PathLike,
    scores: Mapping[str, float],
    /,
    *,
    reset: Collection[str] = (),
    title: str = "Forget-set gradient norm per LoRA module",
) -> str | os.PathLike:
    """Draws module scores as a grid of decoder layer (rows) × projection (columns).

    Module names are dotted NNX paths (`model.layers.3.self_attn.q_proj`); the integer after
    `layers` or `h` is the layer, what follows it the projection. Reset modules are outlined.

    Args:
        path: The PNG file to write.
        scores: {module name: score}, as module removal reports them.
        reset: The names of the modules that were reset.
        title: The figure title.

    Returns:
        `path`.

    Raises:
        ValueError: If there is no score, a score is not finite, or a name has no layer index.
    """
    if not scores:
        raise ValueError("No module score to plot.")
    cells = {}
    for name, score in scores.items():
        parts = name.split(".")
        where = next(
            (
                i
                for i in range(len(parts) - 1)
                if parts[i] in ("layers", "h") and parts[i + 1].isdigit()
            ),
            None,
        )
        if where is None:
            raise ValueError(f"Module {name!r} names no decoder layer.")
        if not math.isfinite(score):
            raise ValueError(f"Module {name!r} has a score that is not finite: {score}.")
        cells[(int(parts[where + 1]), ".".join(parts[where + 2 :]))] = (float(score), name)
    layers = sorted({layer for layer, _ in cells})
    projections = list(dict.fromkeys(projection for _, projection in sorted(cells)))
    grid = np.full((len(layers), len(projections)), np.nan)
    for (layer, projection), (score, _) in cells.items():
        grid[layers.index(layer), projections.index(projection)] = score
    figure = Figure(
        figsize=(1.2 * len(projections) + 2.5, 0.35 * len(layers) + 1.8), layout="constrained"
    )
    axes = figure.subplots()
    image = axes.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    figure.colorbar(image, ax=axes, label="score")
    chosen = set(reset)
    for (layer, projection), (_, name) in cells.items():
        if name in chosen:
            axes.add_patch(
                Rectangle(
                    (projections.index(projection) - 0.5, layers.index(layer) - 0.5),
                    1,
                    1,
                    fill=False,
                    edgecolor="red",
                    linewidth=2,
                )
            )
    axes.set_xticks(range(len(projections)), projections, rotation=45, ha="right")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("projection")
    axes.set_ylabel("decoder layer")
    axes.set_title(title + (f" ({len(chosen)} reset, outlined)" if chosen else ""))
    return save_figure(figure, path)


def _checked_series(series: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    if not series:
        raise ValueError(f"{name} names no model to plot.")
    arrays = {key: np.asarray(values, np.float64).reshape(-1) for key, values in series.items()}
    lengths = {key: values.size for key, values in arrays.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"Every model needs the same, non-zero number of examples: {lengths}.")
    return arrays


def save_figure(figure: Figure, path: str | os.PathLike) -> str | os.PathLike:
    """Renders `figure` with the Agg canvas and writes it to `path` as a PNG."""
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=120)
    return path
