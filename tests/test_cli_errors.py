"""End to end through the real CLI in a subprocess: bad input exits 2 with one clear line and writes nothing;
a tiny local run writes a complete run directory whose checkpoint `eval` can read.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from es_service import checkpoint
from es_service.config import Config, from_dict
from tests.helpers import TINY, cli, error_line, mnist_dir, snapshot, start_cli, tiny_config, write_config

pytestmark = pytest.mark.e2e

RUN_FILES = {"config.yaml", "run.json", "metrics.jsonl", "checkpoint.pt", "learning_curve.png", ".lock"}


@pytest.fixture
def work(tmp_path):
    """A cwd for the command (so a stray default runs/ would show) and where --run-dir points."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd, tmp_path / "out" / "run"


def config_file(folder: Path, data: Config | None = None) -> Path:
    return write_config(folder / "tiny.yaml", TINY if data is None else data)


def assert_nothing_written(cwd: Path, run_dir: Path) -> None:
    assert not run_dir.exists()
    if run_dir.parent.exists():
        assert [p.name for p in run_dir.parent.iterdir() if ".creating-" in p.name] == []
    assert [p.name for p in cwd.iterdir()] == ["tiny.yaml"]  # no default runs/ either


def refused_train(env, work, *args: str) -> str:
    cwd, run_dir = work
    config = config_file(cwd)
    result = cli("train", "--config", config, "--run-dir", run_dir, "--quiet", *args, env=env, cwd=cwd, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert_nothing_written(cwd, run_dir)
    return error_line(result)


# ---- train refusals ---------------------------------------------------------------------------------


def test_bad_config_field(env, work):
    line = refused_train(env, work, "--set", "es.noise_std=-0.5")
    assert "es.noise_std" in line and "-0.5" in line and "> 0" in line


def test_init_from_a_file_that_is_not_a_checkpoint(env, work):
    cwd, run_dir = work
    line = refused_train(env, work, "--init-from", str(cwd / "tiny.yaml"))
    assert (
        line.startswith("es-service: error: --init-from: checkpoint")
        and "tiny.yaml" in line
        and "cannot be read" in line
    )


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
    result = cli("train", "--config", config, "--run-dir", run_dir, "--quiet", env=env, cwd=cwd, check=False)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert str(run_dir) in line and "already exists" in line and "--force" in line
    assert snapshot(run_dir) == before
    assert [p.name for p in run_dir.parent.iterdir()] == ["run"]


# ---- resume and eval refusals -----------------------------------------------------------------------


def test_resume_of_a_nonexistent_dir(env, work):
    cwd, run_dir = work
    result = cli("resume", run_dir, "--quiet", env=env, cwd=cwd, check=False)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert str(run_dir) in line and "does not exist" in line
    assert not run_dir.exists() and list(cwd.iterdir()) == []


def test_resume_refuses_a_trajectory_override(env, trained_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run, run_dir)
    before = snapshot(run_dir)
    result = cli(
        "resume",
        run_dir,
        "--set",
        "es.noise_std=0.05",
        "--set",
        "generations=5",
        "--quiet",
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert "es.noise_std=0.05" in line and "resume may change only" in line and "new run" in line
    assert snapshot(run_dir) == before


def test_eval_of_a_garbage_checkpoint(env, tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x00garbage" * 64)
    result = cli("eval", path, "--device", "cpu", env=env, cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert str(path) in line and "cannot be read" in line
    assert result.stdout == ""


# ---- the success path -------------------------------------------------------------------------------

GENERATIONS = 3


@pytest.fixture(scope="module")
def trained_run(env, tmp_path_factory):
    """One tiny local run (TINY for 3 generations), shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("trained")
    config = config_file(folder, tiny_config(f"generations={GENERATIONS}"))
    run_dir = folder / "run"
    result = cli(
        "train", "--config", config, "--run-dir", run_dir, "--executor", "local", "--quiet", env=env, cwd=folder
    )
    summary = json.loads(result.stdout)
    assert summary["generation"] == GENERATIONS and summary["run_dir"] == str(run_dir)
    return run_dir


def test_train_writes_a_complete_run_dir(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    events = {name for name in names if name.startswith("events.out.tfevents.")}  # TensorBoard's, beside metrics.jsonl
    assert names - events == RUN_FILES and len(events) == 1
    assert [p.name for p in trained_run.parent.iterdir() if ".creating-" in p.name] == []


def test_run_config_and_info(trained_run):
    expected = tiny_config(f"generations={GENERATIONS}", "workers.executor=local")
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
    assert state["config"].digest() == tiny_config().digest()


def test_learning_curve_is_a_png(trained_run):
    from PIL import Image

    path = trained_run / "learning_curve.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_eval_of_the_run_checkpoint(env, trained_run, tmp_path):
    result = cli("eval", trained_run / "checkpoint.pt", "--device", "cpu", env=env, cwd=tmp_path)
    report = json.loads(result.stdout)
    assert report["generation"] == GENERATIONS
    assert 0.0 <= report["train_accuracy"] <= 1.0 and 0.0 <= report["test_accuracy"] <= 1.0
    # Same theta, same arithmetic, same device, the full test set: the run's own final number.
    last = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert report["test_accuracy"] == last["test_accuracy"]


# ---- damaged or foreign run files, a second writer, --force -----------------------------------------


@pytest.fixture(scope="module")
def paused_run(env, tmp_path_factory):
    """The trained run's config stopped after 2 of its 3 generations: what `resume` continues."""
    folder = tmp_path_factory.mktemp("paused")
    config = config_file(folder, tiny_config(f"generations={GENERATIONS}"))
    cli(
        "train",
        "--config",
        config,
        "--run-dir",
        folder / "run",
        "--executor",
        "local",
        "--stop-after",
        "2",
        "--quiet",
        env=env,
        cwd=folder,
    )
    return folder / "run"


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


def theta_of(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["theta"]


def test_a_torn_metrics_line_is_dropped_by_report_and_resume(env, paused_run, trained_run, tmp_path):
    run_dir = copy_of(paused_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as log:
        log.write('{"generation": 3, "wall_s": 0.1')  # a crash mid-append
    result = cli("report", run_dir, "--plot", tmp_path / "r.png", env=env, cwd=tmp_path)
    assert "| copy | es |" in result.stdout and "| 2 |" in result.stdout
    cli("resume", run_dir, "--quiet", env=env, cwd=tmp_path)
    assert [json.loads(line)["generation"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    assert torch.equal(theta_of(run_dir), theta_of(trained_run))


def test_a_damaged_metrics_line_before_the_last_is_refused(env, paused_run, tmp_path):
    run_dir = copy_of(paused_run, tmp_path)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0][:20], *lines[1:]]) + "\n")
    before = snapshot(run_dir)
    for args in (["report", str(run_dir), "--plot", str(tmp_path / "r.png")], ["resume", str(run_dir), "--quiet"]):
        result = cli(*args, env=env, cwd=tmp_path, check=False)
        assert result.returncode == 2, result.stderr
        line = error_line(result)
        assert "metrics.jsonl: line 1 is damaged" in line and "delete line 1" in line
    assert snapshot(run_dir) == before


def test_resume_rebuilds_a_truncated_run_json_from_the_checkpoint(env, paused_run, trained_run, tmp_path):
    run_dir = copy_of(paused_run, tmp_path)
    text = (run_dir / "run.json").read_text()
    (run_dir / "run.json").write_text(text[: len(text) // 2])
    cli("resume", run_dir, "--quiet", env=env, cwd=tmp_path)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["generation"] == GENERATIONS
    assert torch.equal(theta_of(run_dir), theta_of(trained_run))


@pytest.mark.parametrize("foreign", ["another run's checkpoint", "a changed noise seed"])
def test_resume_refuses_a_checkpoint_that_is_not_this_runs(env, paused_run, trained_run, tmp_path, foreign):
    run_dir = copy_of(paused_run, tmp_path)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    if foreign == "another run's checkpoint":
        other = from_dict(state["config"], ["seed=4"])
        state["config"], state["config_digest"] = other.to_dict(), other.digest()
        expected = "belongs to another run"
    else:
        state["noise"]["seed"] += 1
        expected = "noise seed"
    torch.save(state, run_dir / "checkpoint.pt")
    before = snapshot(run_dir)
    result = cli("resume", run_dir, "--quiet", env=env, cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert expected in error_line(result)
    assert snapshot(run_dir) == before  # config.yaml not rewritten to the foreign config


def test_resume_refuses_a_checkpoint_with_a_bad_field(env, paused_run, tmp_path):
    run_dir = copy_of(paused_run, tmp_path)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["generation"] = -1
    torch.save(state, run_dir / "checkpoint.pt")
    before = snapshot(run_dir)
    result = cli("resume", run_dir, "--quiet", env=env, cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert "generation is -1" in error_line(result)
    assert snapshot(run_dir) == before


def test_a_second_writer_is_refused_naming_the_first(env, paused_run, tmp_path):
    run_dir = copy_of(paused_run, tmp_path)
    first = start_cli("resume", run_dir, "--set", "generations=100000", "--quiet", env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / ".lock").read_text() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (run_dir / ".lock").read_text() == f"{first.pid}\n"
        second = cli("resume", run_dir, "--quiet", env=env, cwd=tmp_path, check=False)
        assert second.returncode == 2, second.stderr
        assert f"in use by process {first.pid}" in error_line(second)
        while len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3 and first.poll() is None:
            time.sleep(0.05)  # in the training loop, where SIGTERM checkpoints and exits 130
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 130
    generations = [json.loads(line)["generation"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert generations == list(range(1, len(generations) + 1))  # one writer's lines, in order


def test_force_with_an_unreachable_cluster_keeps_the_old_run(env, trained_run, tmp_path):
    run_dir = copy_of(trained_run, tmp_path)
    before = snapshot(run_dir)
    config = config_file(tmp_path)
    result = cli(
        "train",
        "--config",
        config,
        "--run-dir",
        run_dir,
        "--force",
        "--executor",
        "ray",
        "--address",
        "127.0.0.1:1",
        "--quiet",
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    line = error_line(result)
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in line and "--address" in line
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "tiny.yaml"]  # no half-built or set-aside run


def test_force_replaces_the_old_run_once_the_new_one_starts(env, trained_run, tmp_path):
    run_dir = copy_of(trained_run, tmp_path)
    (run_dir / "notes.txt").write_text("the old run's\n")
    cli(
        "train",
        "--config",
        config_file(tmp_path, tiny_config("generations=1")),
        "--run-dir",
        run_dir,
        "--force",
        "--quiet",
        env=env,
        cwd=tmp_path,
    )
    assert not (run_dir / "notes.txt").exists() and json.loads((run_dir / "run.json").read_text())["generation"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "tiny.yaml"]


def test_a_diverging_run_fails_and_keeps_its_last_finite_checkpoint(env, work):
    """Decoupled weight decay of 1e38 at learning rate 10 multiplies theta by -1e39: inf in float32."""
    cwd, run_dir = work
    config = config_file(cwd)
    result = cli(
        "train",
        "--config",
        config,
        "--run-dir",
        run_dir,
        "--quiet",
        "--set",
        "es.weight_decay_mode=decoupled",
        "--set",
        "es.weight_decay=1e38",
        "--set",
        "es.learning_rate=10",
        env=env,
        cwd=cwd,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    line = error_line(result)
    assert "after generation 1" in line and "learning rate 10" in line and "checkpoint of generation 0 is kept" in line
    state = checkpoint.load(run_dir / "checkpoint.pt")  # loads: finite
    info = json.loads((run_dir / "run.json").read_text())
    assert state["generation"] == info["generation"] == 0 and info["status"] == "failed"
