"""es_service/plot.py: the learning-curve PNG (a matplotlib chart with labelled axes and a legend), runs
whose metrics hold only some of the keys, and a machine without matplotlib (a warning, never a failed run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from es_service import plot
from es_service.plot import figure, plot_runs
from tests.helpers import REPO, cli_env, mnist_dir, tiny_config, write_config

ACCURACY_LABELS = ["train", "validation", "test", "test, no flushing"]


def records(generations: int = 30, every: int = 10, validation: bool = True) -> list[dict]:
    """metrics.jsonl lines as a run writes them: fitness every generation, accuracies on evaluations."""
    lines = []
    for generation in range(1, generations + 1):
        line = {"generation": generation, "fitness_mean": -2.3 + 1.8 * generation / generations, "wall_s": 0.1}
        if generation % every == 0:
            accuracy = 0.5 + 0.4 * generation / generations
            line.update(
                train_accuracy=accuracy, test_accuracy=accuracy - 0.01, test_accuracy_unflushed=accuracy + 0.005
            )
            if validation:
                line["validation_accuracy"] = accuracy - 0.005
        lines.append(line)
    return lines


def legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [text.get_text() for text in legend.get_texts()]


def panels(fig):
    accuracy_ax, fitness_ax = fig.axes
    return accuracy_ax, fitness_ax


def test_the_png_is_written_whole_at_the_chart_size(tmp_path):
    path = tmp_path / "curve.png"
    assert plot_runs([("run", records())], path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (plot.WIDTH_IN * plot.DPI, plot.HEIGHT_IN * plot.DPI)
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]  # atomic_write left no temporary file


def test_the_chart_has_labelled_axes_ticks_and_a_legend():
    accuracy_ax, fitness_ax = panels(figure([("run", records())]))
    assert accuracy_ax.get_ylabel() == "accuracy"
    assert "fitness" in fitness_ax.get_ylabel()
    assert fitness_ax.get_xlabel() == "generation"
    assert legend_labels(accuracy_ax) == ACCURACY_LABELS
    assert legend_labels(fitness_ax) == ["mean fitness"]
    for ax in (accuracy_ax, fitness_ax):
        assert len(ax.get_xticks()) > 2 and len(ax.get_yticks()) > 2
    # the curves are the records' values, on their generations
    test_line = accuracy_ax.get_lines()[ACCURACY_LABELS.index("test")]
    assert list(test_line.get_xdata()) == [10, 20, 30]
    assert test_line.get_ydata()[-1] == pytest.approx(0.89)
    assert len(fitness_ax.get_lines()[0].get_xdata()) == 30


def test_several_runs_share_the_chart_one_colour_each():
    accuracy_ax, fitness_ax = panels(figure([("a", records()), ("b", records(validation=False))]))
    labels = legend_labels(accuracy_ax)
    assert labels == [f"a: {name}" for name in ACCURACY_LABELS] + ["b: train", "b: test", "b: test, no flushing"]
    assert legend_labels(fitness_ax) == ["a: mean fitness", "b: mean fitness"]
    colours = {line.get_label().split(":")[0]: line.get_color() for line in accuracy_ax.get_lines()}
    assert colours["a"] != colours["b"]


@pytest.mark.parametrize(
    "lines, accuracy_legend, fitness_legend",
    [
        (records(validation=False), ["train", "test", "test, no flushing"], ["mean fitness"]),
        ([{"generation": 1, "fitness_mean": -2.0}, {"generation": 2, "fitness_mean": -1.9}], [], ["mean fitness"]),
        ([{"generation": 5, "test_accuracy": 0.9}], ["test"], []),  # a lone evaluation
        ([{"generation": 1, "fitness_mean": None}, {"generation": 2, "fitness_mean": float("nan")}], [], []),
        ([{"wall_s": 1.0}], [], []),  # no generation: nothing to place
        ([], [], []),
    ],
)
def test_runs_with_only_some_keys(tmp_path, lines, accuracy_legend, fitness_legend):
    accuracy_ax, fitness_ax = panels(figure([("run", lines)]))
    assert legend_labels(accuracy_ax) == accuracy_legend
    assert legend_labels(fitness_ax) == fitness_legend
    for ax, legend in ((accuracy_ax, accuracy_legend), (fitness_ax, fitness_legend)):
        if not legend:
            assert "no data" in [text.get_text() for text in ax.texts]
    with Image.open(plot_runs([("run", lines)], tmp_path / "curve.png")) as image:
        assert image.size == (plot.WIDTH_IN * plot.DPI, plot.HEIGHT_IN * plot.DPI)


def test_the_accuracy_axis_fits_the_end_of_the_run():
    """The first evaluations (near chance) would flatten the last ones, which the comparison is about."""
    lines = records(generations=100, every=5)
    lines[4]["test_accuracy"] = 0.1  # generation 5, within the first 10%
    accuracy_ax, _ = panels(figure([("run", lines)]))
    low, high = accuracy_ax.get_ylim()
    assert 0.4 < low < 0.53 and 0.905 < high <= 1.0  # 0.1 at generation 5 is below the axis


WITHOUT_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None\n"


def without_matplotlib(code: str, *args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB + code, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=cwd or REPO,
    )


def test_without_matplotlib_the_plot_raises_a_hint_and_the_report_warns(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"status": "finished", "device": "cpu"}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in records()))
    code = (
        "from pathlib import Path\n"
        "from es_service.plot import PlotUnavailable, plot_runs\n"
        "from es_service.report import report\n"
        "try:\n"
        "    plot_runs([('run', [])], Path(sys.argv[2]))\n"
        "except PlotUnavailable as err:\n"
        "    print('raised:', err)\n"
        "print(report([Path(sys.argv[1])], Path(sys.argv[2])))\n"
    )
    result = without_matplotlib(code, str(run_dir), str(tmp_path / "r.png"))
    assert result.returncode == 0, result.stderr
    assert "raised: matplotlib is not installed; `pip install matplotlib`" in result.stdout
    assert "| run | es |" in result.stdout  # the table is still the report
    assert result.stdout.splitlines()[-1].startswith("warning: learning curves not drawn: matplotlib is not installed")
    assert not (tmp_path / "r.png").exists()


@pytest.mark.e2e
def test_a_run_without_matplotlib_finishes_with_one_warning(tmp_path):
    mnist_dir()
    config = write_config(tmp_path / "tiny.yaml", tiny_config("generations=2", "eval.train_size=200"))
    run_dir = tmp_path / "run"
    env = cli_env(tmp_path / "cache")
    result = without_matplotlib(
        "from es_service.cli import main; sys.exit(main())",
        "train",
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
        "--executor",
        "local",
        "--quiet",
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["generation"] == 2  # stdout is still just the summary
    warnings = [line for line in result.stderr.splitlines() if "learning curve" in line]
    assert len(warnings) == 1 and "pip install matplotlib" in warnings[0], result.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert not (run_dir / "learning_curve.png").exists()
