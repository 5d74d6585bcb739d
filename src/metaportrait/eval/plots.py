"""Figures of evaluation results: `plot_series` draws the curves of ``results["series"]`` into one PNG.

The series format is described in `metaportrait.eval.protocols.ProtocolResult`. matplotlib is used through
its object API with the Agg canvas (no pyplot, no display), so plotting works on a headless machine and leaves
matplotlib's global backend alone.
"""

from __future__ import annotations

import math
from pathlib import Path

from metaportrait.io.atomic import atomic_path

SUBPLOT_SIZE = (5.0, 3.6)  # inches per series
MAX_COLUMNS = 2


def _check_series(name: str, series: dict) -> None:
    """Raises ValueError naming the series and the field if ``series`` does not follow the format."""
    for key in ("x_label", "y_label", "lower_is_better", "curves"):
        if key not in series:
            raise ValueError(f"series {name!r}: missing {key!r}")
    if not isinstance(series["curves"], dict) or not series["curves"]:
        raise ValueError(f"series {name!r}: 'curves' must be a non-empty dict of name -> {{'x': ..., 'y': ...}}")
    for curve_name, curve in series["curves"].items():
        if not isinstance(curve, dict) or "x" not in curve or "y" not in curve:
            raise ValueError(f"series {name!r}, curve {curve_name!r}: needs 'x' and 'y'")
        if len(curve["x"]) != len(curve["y"]) or not curve["x"]:
            raise ValueError(
                f"series {name!r}, curve {curve_name!r}: x and y must be non-empty and of the same length, "
                f"got {len(curve['x'])} and {len(curve['y'])}"
            )


def plot_series(results: dict, path: str | Path) -> None:
    """Draw every series of ``results["series"]`` as one subplot (a line per curve, legend by curve name) into
    the PNG ``path``. Baseline curves are dashed; null y values are gaps; the y label says which way is better.

    Raises:
        ValueError: no series, or a series that does not follow the format.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    all_series = results.get("series") or {}
    if not all_series:
        raise ValueError("results have no series to plot")
    for name, series in all_series.items():
        _check_series(name, series)

    columns = min(MAX_COLUMNS, len(all_series))
    rows = math.ceil(len(all_series) / columns)
    figure = Figure(figsize=(SUBPLOT_SIZE[0] * columns, SUBPLOT_SIZE[1] * rows), layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself to the figure: savefig renders with Agg
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, series) in zip(axes, all_series.items()):
        for curve_name, curve in series["curves"].items():
            y = [math.nan if value is None else float(value) for value in curve["y"]]
            baseline = bool(curve.get("baseline", False))
            ax.plot(curve["x"], y, linestyle="--" if baseline else "-", marker=None if baseline else ".",
                    label=curve_name)
        direction = "lower is better" if series["lower_is_better"] else "higher is better"
        ax.set_title(name)
        ax.set_xlabel(series["x_label"])
        ax.set_ylabel(f"{series['y_label']} ({direction})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(all_series):]:
        ax.set_visible(False)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
