"""End to end through the real CLI in a subprocess: bad input exits 2 with one clear line and writes nothing;
a tiny local run writes a complete run directory whose checkpoint `eval` can read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from es_service import checkpoint
from es_service.config import from_dict
from tests.helpers import TINY, cli_env, error_line, mnist_dir, run_cli, tiny_dict, write_yaml

pytestmark = pytest.mark.e2e

RUN_FILES = {"config.yaml", "run.json", "metrics.jsonl", "checkpoint.pt", "learning_curve.png"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One MNIST cache for the module (the first run verifies and copies the files once)."""
    mnist_dir()
    return cli_env(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture
def work(tmp_path):
    """A cwd for the command (so a stray default runs/ would show) and where --run-dir points."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd, tmp_path / "out" / "run"


def config_file(folder: Path, data: dict | None = None) -> Path:
    return write_yaml(folder / "tiny.yaml", TINY if data is None else data)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_nothing_written(cwd: Path, run_dir: Path) -> None:
    assert not run_dir.exists()
    if run_dir.parent.exists():
        assert [p.name for p in run_dir.parent.iterdir() if ".creating-" in p.name] == []
    assert [p.name for p in cwd.iterdir()] == ["tiny.yaml"]  # no default runs/ either


def refused_train(env, work, *args: str, data: dict | None = None) -> str:
    cwd, run_dir = work
    config = config_file(cwd, data)
    result = run_cli(["train", "--config", str(config), "--run-dir", str(run_dir), "--quiet", *args], env, cwd)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert_nothing_written(cwd, run_dir)
    return error_line(result)


# ---- train refusals ---------------------------------------------------------------------------------


def test_bad_config_field(env, work):
    line = refused_train(env, work, "--set", "es.noise_std=-0.5")
    assert "es.noise_std" in line and "-0.5" in line and "> 0" in line


def test_unknown_key(env, work):
    line = refused_train(env, work, data=tiny_dict(es={"noise_sd": 0.1}))
    assert "es.noise_sd" in line and "unknown field" in line and "noise_std" in line


def test_odd_population(env, work):
    line = refused_train(env, work, "--set", "es.pop_size=5")
    assert "es.pop_size" in line and "5" in line and "odd" in line and "even" in line


def test_wrong_type_from_set(env, work):
    line = refused_train(env, work, "--set", "es.batch_size=many")
    assert "es.batch_size" in line and "'many'" in line and "integer" in line


def test_set_without_equals(env, work):
    line = refused_train(env, work, "--set", "es.noise_std")
    assert "es.noise_std" in line and "key=value" in line


def test_init_from_a_file_that_is_not_a_checkpoint(env, work):
    cwd, run_dir = work
    line = refused_train(env, work, "--init-from", str(cwd / "tiny.yaml"))
    assert line.startswith("es-service: error: --init-from: checkpoint") and "tiny.yaml" in line and "cannot be read" in line


def test_missing_config_file(env, work):
    cwd, run_dir = work
    missing = cwd / "absent.yaml"
    result = run_cli(["train", "--config", str(missing), "--run-dir", str(run_dir)], env, cwd)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert str(missing) in line and "does not exist" in line
    assert not run_dir.exists() and list(cwd.iterdir()) == []


def test_data_dir_missing_a_file(env, work, tmp_path):
    source = mnist_dir()
    partial = tmp_path / "partial-mnist"
    partial.mkdir()
    dropped = "t10k-labels-idx1-ubyte"
    copied = [p for p in source.iterdir() if p.is_file() and p.name.startswith(("train-", "t10k-images"))]
    assert len(copied) == 3, [p.name for p in source.iterdir()]
    for path in copied:
        shutil.copy(path, partial / path.name)
    line = refused_train(env, work, "--data-dir", str(partial))
    assert str(partial) in line and f"lacks {dropped} (" in line  # that file, and only that one


def test_existing_run_dir_without_force(env, work):
    cwd, run_dir = work
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text('{"status": "finished"}\n')
    (run_dir / "notes.txt").write_text("results I care about\n")
    before = snapshot(run_dir)
    config = config_file(cwd)
    result = run_cli(["train", "--config", str(config), "--run-dir", str(run_dir), "--quiet"], env, cwd)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert str(run_dir) in line and "already exists" in line and "--force" in line
    assert snapshot(run_dir) == before
    assert [p.name for p in run_dir.parent.iterdir()] == ["run"]


# ---- resume and eval refusals -----------------------------------------------------------------------


def test_resume_of_a_nonexistent_dir(env, work):
    cwd, run_dir = work
    result = run_cli(["resume", str(run_dir), "--quiet"], env, cwd)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert str(run_dir) in line and "does not exist" in line
    assert not run_dir.exists() and list(cwd.iterdir()) == []


def test_resume_refuses_a_trajectory_override(env, trained_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run, run_dir)
    before = snapshot(run_dir)
    result = run_cli(["resume", str(run_dir), "--set", "es.noise_std=0.05", "--set", "generations=5", "--quiet"],
                     env, tmp_path)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert "es.noise_std=0.05" in line and "resume may change only" in line and "new run" in line
    assert snapshot(run_dir) == before


def test_eval_of_a_garbage_checkpoint(env, tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x00garbage" * 64)
    result = run_cli(["eval", str(path), "--device", "cpu"], env, tmp_path)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert str(path) in line and "cannot be read" in line
    assert result.stdout == ""


# ---- the success path -------------------------------------------------------------------------------

GENERATIONS = 3


@pytest.fixture(scope="module")
def trained_run(env, tmp_path_factory):
    """One tiny local run (3 generations of pop 4 on 32 images), shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("trained")
    config = config_file(folder, tiny_dict(generations=GENERATIONS))
    run_dir = folder / "run"
    result = run_cli(["train", "--config", str(config), "--run-dir", str(run_dir), "--executor", "local",
                      "--quiet"], env, folder)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["generation"] == GENERATIONS and summary["run_dir"] == str(run_dir)
    return run_dir


def test_train_writes_a_complete_run_dir(trained_run):
    assert {p.name for p in trained_run.iterdir()} == RUN_FILES
    assert [p.name for p in trained_run.parent.iterdir() if ".creating-" in p.name] == []


def test_run_config_and_info(trained_run):
    expected = from_dict(tiny_dict(generations=GENERATIONS), ["workers.executor=local"])
    assert from_dict(yaml.safe_load((trained_run / "config.yaml").read_text())) == expected
    info = json.loads((trained_run / "run.json").read_text())
    assert info["status"] == "finished" and info["generation"] == GENERATIONS
    assert 0.0 <= info["final"]["test_accuracy"] <= 1.0


def test_metrics_has_one_line_per_generation(trained_run):
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["generation"] for r in records] == list(range(1, GENERATIONS + 1))
    assert all(r["batch_size"] == TINY["es"]["batch_size"] for r in records)
    assert all(r["nonfinite"] == 0 for r in records)
    # eval.every=2: generation 2 and the last generation carry the center's accuracy.
    assert "test_accuracy" in records[1] and "test_accuracy" in records[-1]
    assert "test_accuracy" not in records[0]


def test_checkpoint_is_the_last_generation(trained_run):
    state = checkpoint.load(trained_run / "checkpoint.pt")
    assert state["generation"] == GENERATIONS
    assert state["config"].digest() == from_dict(TINY).digest()


def test_learning_curve_is_a_png(trained_run):
    from PIL import Image

    path = trained_run / "learning_curve.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_eval_of_the_run_checkpoint(env, trained_run, tmp_path):
    result = run_cli(["eval", str(trained_run / "checkpoint.pt"), "--device", "cpu"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["generation"] == GENERATIONS
    assert 0.0 <= report["train_accuracy"] <= 1.0 and 0.0 <= report["test_accuracy"] <= 1.0
    # Same theta, same arithmetic, same device, the full test set: the run's own final number.
    last = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert report["test_accuracy"] == last["test_accuracy"]
