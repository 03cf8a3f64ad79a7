"""The run directory's guarantees in process: atomic writes (a full disk included), the lock, torn
metrics lines, and the driver's refusal to step on nothing or to keep a non-finite theta."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch

from es_service import checkpoint, rundir, runner, strategy
from es_service import plan as planning
from es_service.driver import Diverged, TrainState
from es_service.metrics import MetricsError, MetricsLog, read
from tests.helpers import run_local, tiny_config


def no_space(real_write, victim: str):
    """os.write that fails with ENOSPC on temporary files of ``victim`` (the one fault injected here)."""

    def write(fd, data):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{victim}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    return write


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.bin"
    rundir.atomic_write(path, b"old")
    rundir.atomic_write(path, lambda handle: [handle.write(b"new "), handle.write(b"bytes")])
    assert path.read_bytes() == b"new bytes" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]

    def fails(handle):
        handle.write(b"half")
        raise ValueError("stopped mid-write")

    with pytest.raises(ValueError):
        rundir.atomic_write(path, fails)
    assert path.read_bytes() == b"new bytes" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_full_disk_says_so_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    config = tiny_config()
    state = checkpoint.build(
        config,
        planning.seed_theta(config.seed),
        {"state": {}, "param_groups": [{}]},
        0,
        planning.noise_seed(config.seed),
    )
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(state, path)
    before = path.read_bytes()
    monkeypatch.setattr(os, "write", no_space(os.write, "checkpoint.pt"))
    with pytest.raises(rundir.WriteError, match=f"disk full at {path}"):
        checkpoint.save({**state, "generation": 1}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_run_json_never_runs_ahead_of_a_checkpoint_the_full_disk_refused(tmp_path, monkeypatch):
    """The generation-0 checkpoint is written, every later one hits a full disk: the run fails naming the
    disk, and run.json records generation 0, the checkpoint's, not the generations trained in memory."""
    config = tiny_config("generations=3", "checkpoint.every=2")
    run_dir = tmp_path / "run"
    real_save = checkpoint.save
    saves = []

    def save_then_fill_the_disk(state, path):
        saves.append(state["generation"])
        if len(saves) > 1:
            monkeypatch.setattr(os, "write", no_space(real_write, "checkpoint.pt"))
        real_save(state, path)

    real_write = os.write
    monkeypatch.setattr(checkpoint, "save", save_then_fill_the_disk)
    with pytest.raises(rundir.WriteError, match="disk full at"):
        runner.train(config, run_dir, quiet=True)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and "disk full at" in info["error"]
    assert saves[:2] == [0, 2]
    assert info["generation"] == torch.load(run_dir / "checkpoint.pt", weights_only=True)["generation"] == 0


def test_the_lock_refuses_a_second_writer_naming_the_first(tmp_path):
    with rundir.Lock(tmp_path):
        assert (tmp_path / rundir.LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(rundir.LockedError, match=f"in use by process {os.getpid()}"):
            rundir.Lock(tmp_path)
    with rundir.Lock(tmp_path):  # released: the next writer gets it
        pass
    assert (tmp_path / rundir.LOCK_NAME).read_bytes() == b""


def test_a_torn_last_line_is_dropped_and_a_damaged_middle_line_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"generation": 1, "fitness_mean": -0.5}\n{"generation": 2, "fitness_mean": -0.5}\n{"generation": 3, "wa'
    )
    assert [r["generation"] for r in read(path)] == [1, 2]
    MetricsLog(path).truncate_after(5)
    assert path.read_text() == '{"generation": 1, "fitness_mean": -0.5}\n{"generation": 2, "fitness_mean": -0.5}\n'
    path.write_text('{"generation": 1}\n{"generat\n{"generation": 3}\n')
    with pytest.raises(MetricsError, match="line 2 is damaged"):
        read(path)


def test_centered_ranks_of_no_finite_fitness_are_zero():
    assert np.array_equal(strategy.centered_ranks(np.array([np.nan, np.inf, -np.inf, np.nan])), np.zeros(4))


def with_sigma(config, sigma):
    """The config with a sigma that validate() refuses: how a run would get there if nothing checked."""
    return config.model_copy(update={"es": config.es.model_copy(update={"noise_std": sigma})})


def test_a_generation_where_no_member_scores_does_not_step(mnist, tmp_path):
    config = with_sigma(tiny_config("generations=2"), 1e12)  # every member's logits overflow
    trainer = run_local(config, mnist, tmp_path)
    records = read(tmp_path / "metrics.jsonl")
    assert all(r["nonfinite"] == config.es.pop_size and r["step_skipped"] for r in records)
    assert torch.equal(trainer.theta, planning.seed_theta(config.seed))  # Adam's momentum did not move it


def test_a_non_finite_theta_stops_the_run_before_anything_is_written(mnist, tmp_path):
    config = with_sigma(tiny_config("generations=2"), 1e-50)  # the estimate divides by sigma: inf
    with pytest.raises(Diverged, match="after generation 1 .*sigma 1e-50"):
        run_local(config, mnist, tmp_path, state=TrainState(planning.seed_theta(config.seed), None, 0))
    assert not (tmp_path / "checkpoint.pt").exists() and read(tmp_path / "metrics.jsonl") == []
