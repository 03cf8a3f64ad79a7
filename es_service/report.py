"""`es-service report RUN_DIR...`: the ablation table and one PNG of everyone's learning curves."""

from __future__ import annotations

import os
from pathlib import Path

from es_service import rundir
from es_service.config import WARM_START_STAGES, ConfigError
from es_service.config import load as load_config
from es_service.metrics import read as read_metrics
from es_service.plot import PlotUnavailable, plot_runs, printable


class ReportError(RuntimeError):
    pass


def summarize(run_dir: Path) -> dict:
    info_path, metrics_path = run_dir / rundir.RUN_INFO_NAME, run_dir / rundir.METRICS_NAME
    if not info_path.is_file() or not metrics_path.is_file():
        raise ReportError(
            f"{str(run_dir)!r} is not a run directory (no run.json or metrics.jsonl); "
            "pass directories made by `es-service train` or `es-service backprop`"
        )
    info = rundir.read_run_info(run_dir) or {"status": "? (run.json damaged)"}
    records = read_metrics(metrics_path)
    evaluated = [r for r in records if r.get("test_accuracy") is not None]
    last = evaluated[-1] if evaluated else {}
    try:  # the bounded loader: a run directory's config.yaml is input like any other
        arithmetic = load_config(run_dir / rundir.CONFIG_NAME).network.arithmetic
    except ConfigError:
        arithmetic = "?"
    method, wall_s = info.get("method", "es"), sum(r.get("wall_s", 0.0) for r in records)
    stages = [
        read_metrics(path)
        for name in WARM_START_STAGES
        if (path := run_dir / "warm_start" / name / "metrics.jsonl").is_file()
    ]
    if stages:  # a hybrid: its warm start's epochs and time belong to the row
        method += f" after {'+'.join(str(len(epochs)) for epochs in stages)} backprop epochs"
        wall_s += sum(r.get("wall_s", 0.0) for epochs in stages for r in epochs)
    return {
        "run": printable(run_dir.name),
        "method": method,
        "arithmetic": arithmetic,
        "train_accuracy": last.get("train_accuracy"),
        "test_accuracy": last.get("test_accuracy"),
        "best_test_accuracy": max((r["test_accuracy"] for r in evaluated), default=None),
        "test_accuracy_unflushed": last.get("test_accuracy_unflushed"),
        "generations": records[-1]["generation"] if records else 0,
        "wall_s": wall_s,
        "device": info.get("device", "?"),
        "status": info.get("status", "?"),
    }


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def render(rows: list[dict]) -> str:
    header = "| run | method | arithmetic | train | test | best test | test, no flush | generations | wall s | device |"
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['method']} | {r['arithmetic']} | {_pct(r['train_accuracy'])} | "
            f"{_pct(r['test_accuracy'])} | {_pct(r['best_test_accuracy'])} | "
            f"{_pct(r['test_accuracy_unflushed'])} | {r['generations']} | "
            f"{r['wall_s']:.0f} | {r['device']} |"
        )
    return "\n".join(lines)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_FILES = {
    rundir.CONFIG_NAME,
    rundir.RUN_INFO_NAME,
    rundir.METRICS_NAME,
    rundir.CHECKPOINT_NAME,
    rundir.PLOT_NAME,
    rundir.LOCK_NAME,
    "warm_start",
}


def check_plot_path(plot_path: Path, run_dirs: list[Path]) -> None:
    """Refuse a --plot that would write over anything but an earlier chart, or over a run's own files
    (a chart saved as a run's checkpoint.pt would end the run; its learning_curve.png is the run's to draw)."""
    shown, target = repr(printable(str(plot_path))), plot_path.resolve()
    for run_dir in run_dirs:
        if any(target.is_relative_to(run_dir.resolve() / name) for name in RUN_FILES):
            raise ReportError(
                f"--plot {shown} is one of the files of the run directory {printable(str(run_dir))!r}, which "
                "only its run writes; pass another path, e.g. --plot report.png"
            )
    if plot_path.exists() and not plot_path.is_file():
        raise ReportError(f"--plot {shown} exists and is not a file; pass the path of a new PNG")
    if plot_path.exists():
        with plot_path.open("rb") as file:
            if file.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                raise ReportError(
                    f"--plot {shown} exists and is not a PNG; refusing to write over it: pass a new file name"
                )
    folder = plot_path.parent
    if not folder.is_dir():
        raise ReportError(
            f"--plot {shown}: the folder {printable(str(folder))!r} does not exist; create it, or pass a "
            "--plot in an existing folder"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ReportError(f"--plot {shown}: the folder is not writable by this user; pass a --plot elsewhere")


def report(run_dirs: list[Path], plot_path: Path) -> str:
    check_plot_path(plot_path, run_dirs)
    rows = [summarize(path) for path in run_dirs]
    try:
        plot_runs([(path.name, read_metrics(path / rundir.METRICS_NAME)) for path in run_dirs], plot_path)
    except PlotUnavailable as err:  # the table is the report; the chart is the part that can wait
        return render(rows) + f"\n\nwarning: learning curves not drawn: {err}"
    return render(rows) + f"\n\nlearning curves: {printable(str(plot_path))}"
