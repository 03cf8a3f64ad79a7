"""Learning curves as PNG, drawn with matplotlib's Agg renderer.

Top panel: the center's accuracy on evaluation generations (train, validation when the run holds
one out, test, and test evaluated with no flushing). Bottom panel: the population's mean fitness on
each generation's minibatch. With one run each curve has its own colour; with several, the colour
is the run and the line style the curve.

matplotlib is imported when a plot is drawn, not with this module, so a machine without it still
trains and reports; ``PlotUnavailable`` then says how to get the PNG.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from es_service import rundir

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install matplotlib"
# (metrics key, legend label, line style)
ACCURACY_CURVES = (
    ("train_accuracy", "train", ":"),
    ("validation_accuracy", "validation", "--"),
    ("test_accuracy", "test", "-"),
    ("test_accuracy_unflushed", "test, no flushing", "-."),
)
FITNESS_CURVE = ("fitness_mean", "mean fitness", "-")
WIDTH_IN, HEIGHT_IN, DPI = 12, 8, 100  # 1200 x 800 pixels
# Beyond this many points markers would merge into a thick line; below it they show which
# generations were evaluated (accuracies are sparse) and keep a lone point visible.
MARKER_LIMIT = 60
# The first generations move from chance to most of the final accuracy; scaling the y axis to
# them would flatten the differences of a tenth of a percent that the comparison is about.
ZOOM_SKIP = 0.1


class PlotUnavailable(RuntimeError):
    """matplotlib cannot be imported: the run and the report go on without their PNG."""


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator, PercentFormatter
    except ImportError:
        raise PlotUnavailable(f"matplotlib is not installed; `{INSTALL_HINT}` to draw learning curves") from None
    return Figure, FigureCanvasAgg, MaxNLocator, PercentFormatter


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [
        (r["generation"], r[key])
        for r in records
        if r.get("generation") is not None and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [x for x, _ in points], [y for _, y in points]


def _tail_limits(
    curves: list[tuple[list[float], list[float]]], margin: float, clamp: tuple[float, float] | None = None
) -> tuple[float, float] | None:
    """y limits that fit every curve past its first ``ZOOM_SKIP`` of generations."""
    tail = [y for xs, ys in curves if xs for x, y in zip(xs, ys) if x >= ZOOM_SKIP * xs[-1]]
    if not tail:
        return None
    low, high = min(tail), max(tail)
    pad = margin * (high - low if high > low else max(abs(high), 1e-3))
    low, high = low - pad, high + pad
    if clamp:
        low, high = max(clamp[0], low), min(clamp[1], high)
    return (low, high) if high > low else None


def _draw(ax: Axes, runs: list[tuple[str, list[dict]]], curves, margin: float, clamp=None) -> None:
    drawn = []
    for run_index, (label, records) in enumerate(runs):
        for curve_index, (key, name, style) in enumerate(curves):
            xs, ys = _series(records, key)
            if not xs:
                continue
            color = f"C{curve_index if len(runs) == 1 else run_index % 10}"
            ax.plot(
                xs,
                ys,
                linestyle=style,
                color=color,
                linewidth=1.6,
                marker="o" if len(xs) <= MARKER_LIMIT else None,
                markersize=3,
                label=name if len(runs) == 1 else f"{label}: {name}",
            )
            drawn.append((xs, ys))
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        return
    limits = _tail_limits(drawn, margin, clamp)
    if limits:
        ax.set_ylim(*limits)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def figure(runs: list[tuple[str, list[dict]]]) -> Figure:
    """The chart of ``runs`` ([(label, metrics records)]) as a matplotlib Figure on an Agg canvas."""
    Figure, FigureCanvasAgg, MaxNLocator, PercentFormatter = _matplotlib()
    # Figure + Agg canvas rather than pyplot: no GUI backend is ever chosen (no display needed)
    # and no global figure list keeps the figure alive after the run has drawn it.
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    accuracy_ax, fitness_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    _draw(accuracy_ax, runs, ACCURACY_CURVES, margin=0.1, clamp=(0.0, 1.0))
    zoomed = f"(y axis fitted to generations past the first {ZOOM_SKIP:.0%})"
    accuracy_ax.set_title(f"accuracy of the center {zoomed}", fontsize="medium")
    accuracy_ax.set_ylabel("accuracy")
    accuracy_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    _draw(fitness_ax, runs, (FITNESS_CURVE,), margin=0.1)
    fitness_ax.set_title(f"fitness: population mean on the generation's minibatch {zoomed}", fontsize="medium")
    fitness_ax.set_ylabel("fitness (mean)")
    fitness_ax.set_xlabel("generation")
    fitness_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (accuracy_ax, fitness_ax):
        ax.grid(True, color="0.9")
        ax.tick_params(labelbottom=True)  # sharex hides the top panel's generation labels otherwise
    fig.suptitle(runs[0][0] if len(runs) == 1 else "learning curves")
    return fig


def printable(name: str) -> str:
    """A file name as text anyone can print or draw: bytes that are not UTF-8 (which Python keeps as
    lone surrogates, and neither matplotlib nor a UTF-8 terminal accepts) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def plot_runs(runs: list[tuple[str, list[dict]]], path: str | Path) -> Path:
    """Draw one PNG comparing runs; ``runs`` is [(label, metrics records)]. Raises ``PlotUnavailable``
    without matplotlib."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # a run name in a script the font lacks draws as boxes; a warning per character says no more
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        figure([(printable(label), records) for label, records in runs]).savefig(buffer, format="png")
    return rundir.atomic_write(path, buffer.getvalue())
