"""Learning curves as PNG, drawn with Pillow (already a torchvision dependency; no matplotlib).

Left panel: accuracy (test and train of the center, batch mean of the population) per generation.
Right panel: mean and best fitness per generation. One colour per run.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

from es_service import rundir

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
WIDTH, MARGIN, PANEL_HEIGHT, LEGEND_ROW = 1200, 60, 440, 14


def _series(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["generation"], r[key]) for r in records if r.get(key) is not None]


def _zoomed_range(curves) -> tuple[float, float]:
    """Skip each curve's first 10% of generations so the interesting end is not squashed."""
    tail = [y for _, _, pts in curves for x, y in pts if pts and x >= 0.1 * pts[-1][0]]
    if not tail:
        return (0.0, 1.0)
    return (max(0.0, min(tail) - 0.02), min(1.0, max(tail) + 0.01))


def _panel(draw, box, title, curves, y_range=None):
    left, top, right, bottom = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left, top - 18), title, fill=(0, 0, 0))
    points = [p for _, _, pts in curves for p in pts]
    if not points:
        draw.text((left + 10, top + 10), "no data", fill=(0, 0, 0))
        return
    x_max = max(1.0, max(x for x, _ in points))
    y_low, y_high = y_range or (min(y for _, y in points), max(y for _, y in points))
    if y_high <= y_low:
        y_high = y_low + 1e-9
    def to_px(x, y):
        return (left + (right - left) * x / x_max, bottom - (bottom - top) * (y - y_low) / (y_high - y_low))
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y_low + (y_high - y_low) * fraction
        _, py = to_px(0, y)
        draw.line([(left, py), (right, py)], fill=(225, 225, 225))
        draw.text((left - 55, py - 6), f"{y:.3g}", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 6), f"gen {x_max:.0f}", fill=(0, 0, 0))
    for row, (label, color, pts) in enumerate(curves):
        visible = [(x, min(max(y, y_low), y_high)) for x, y in pts]
        if len(visible) > 1:
            draw.line([to_px(x, y) for x, y in visible], fill=color, width=2)
        for x, y in visible[-1:]:
            px, py = to_px(x, y)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.text((left, bottom + 24 + LEGEND_ROW * row), label, fill=color)  # legend below the panel


def _shade(color, amount):
    return tuple(int(c + (255 - c) * amount) for c in color)


def plot_runs(runs: list[tuple[str, list[dict]]], path: str | Path) -> Path:
    """Draw one PNG comparing runs; ``runs`` is [(label, metrics records)]."""
    accuracy_curves, fitness_curves = [], []
    for index, (label, records) in enumerate(runs):
        color = COLORS[index % len(COLORS)]
        accuracy_curves += [
            (f"{label} test", color, _series(records, "test_accuracy")),
            (f"{label} train", _shade(color, 0.45), _series(records, "train_accuracy")),
        ]
        if len(runs) == 1:
            accuracy_curves.append((f"{label} batch mean", _shade(color, 0.75), _series(records, "batch_accuracy_mean")))
        fitness_curves += [
            (f"{label} best", color, _series(records, "fitness_max")),
            (f"{label} mean", _shade(color, 0.6), _series(records, "fitness_mean")),
        ]
    legend_height = 40 + LEGEND_ROW * max(len(accuracy_curves), len(fitness_curves))
    image = Image.new("RGB", (WIDTH, 40 + PANEL_HEIGHT + legend_height), "white")
    draw = ImageDraw.Draw(image)
    half = WIDTH // 2
    bottom = 40 + PANEL_HEIGHT
    _panel(draw, (MARGIN, 40, half - 20, bottom), "accuracy (zoomed)", accuracy_curves, _zoomed_range(accuracy_curves))
    _panel(draw, (half + MARGIN, 40, WIDTH - 20, bottom), "fitness", fitness_curves)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return rundir.atomic_write(path, buffer.getbuffer())
