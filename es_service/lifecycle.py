"""Run management: a run directory's whole life. ES runs (es_service/runner.py) and backprop runs
(es_service/backprop_runs.py) check, create, record and resume their directories here alone.

A run directory holds config.yaml (resolved), run.json (status, device, timings), metrics.jsonl,
checkpoint.pt and learning_curve.png; a hybrid's also holds its warm start's stages, a run directory
each, under warm_start/. It is checked before anything is loaded (``check_new``), appears whole (built
in a temporary sibling, then renamed), is never replaced without ``force``, and then only once
everything that can fail before the first generation (config, data, executor, cluster) has been built.
One process at a time writes it (its lock). ``resumption`` decides how one continues.

run.json's ``status``: "created" (or "warm start", while a hybrid's backprop stages run), "running"
(with the writer's pid), then "paused" (stopped by --stop-after or --time-budget), "finished",
"interrupted" or "failed" (with the ``error``). The files themselves (atomic writes, the lock) are
es_service/rundir.py; what a run starts from (data, problem, first theta) is es_service/runs.py.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from es_service import checkpoint, rundir
from es_service import plan as planning
from es_service.config import WARM_START_STAGES, Config, ConfigError, from_dict, shown
from es_service.config import load as load_config
from es_service.metrics import read as read_metrics
from es_service.plot import plot_runs
from es_service.rundir import CHECKPOINT_NAME, CONFIG_NAME, LOCK_NAME, METRICS_NAME, PLOT_NAME, RUN_INFO_NAME
from es_service.runs import UsageError
from es_service.stopping import Interrupted
from es_workers.problem import Problem

FINAL_ACCURACIES = ("train_accuracy", "test_accuracy", "validation_accuracy")  # what run.json's "final" keeps
WARM_START = "warm_start"  # the folder of a hybrid's backprop stages, a run directory each
RESUME_OVERRIDABLE = ("generations", "data_dir", "workers.", "eval.", "checkpoint.")  # what resume may --set


def check_new(run_dir: Path, force: bool) -> None:
    """Refuse, before anything is loaded, a --run-dir that cannot become this run's directory."""
    try:
        _check_new(run_dir, force)
    except OSError as err:  # a name too long, a loop of links: the path cannot be looked at, let alone made
        fix = "pass a shorter path" if err.errno == errno.ENAMETOOLONG else "pass another --run-dir"
        raise UsageError(f"--run-dir {shown(str(run_dir))}: {err.strerror}; {fix}") from None


def _check_new(run_dir: Path, force: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {str(run_dir)!r} is a file; pass the path of a directory (it is created)")
    existing = next(path for path in [run_dir, *run_dir.parents] if path.exists())
    if not existing.is_dir():
        raise UsageError(
            f"--run-dir {str(run_dir)!r} lies under the file {str(existing)!r}; pass a path in a directory"
        )
    folder = existing if existing != run_dir else run_dir.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(
            f"--run-dir {str(run_dir)!r}: {str(folder)!r} is not writable by this user; "
            "pass a --run-dir in a writable directory"
        )
    if run_dir.exists() and not force:
        raise UsageError(
            f"run directory {str(run_dir)!r} already exists; pick another --run-dir, "
            f"resume it with `es-service resume {run_dir}`, or pass --force to replace it"
        )
    if run_dir.exists() and Path.cwd().is_relative_to(run_dir.resolve()):
        raise UsageError(
            f"--run-dir {str(run_dir)!r} is (or holds) the directory this command runs in, which --force "
            "cannot replace; run the command from outside it, e.g. after `cd ..`"
        )
    if run_dir.name in ("", ".."):
        raise UsageError(
            f"--run-dir {str(run_dir)!r} does not end in a directory name; pass the run's path, e.g. runs/NAME"
        )
    if run_dir.is_symlink():
        raise UsageError(
            f"--run-dir {str(run_dir)!r} is a symbolic link, which a run directory never replaces; pass "
            f"the path it points to instead, --run-dir {run_dir.resolve()}"
        )
    if run_dir.exists() and not (run_dir / RUN_INFO_NAME).exists() and any(run_dir.iterdir()):
        raise UsageError(
            f"{str(run_dir)!r} exists and is not a run directory; refusing to replace it even with --force"
        )
    if (run_dir / LOCK_NAME).exists():
        rundir.Lock(run_dir).release()  # refuse now, not after loading everything, when a process writes it


def check_exists(run_dir: Path) -> None:
    """Refuse a run directory to continue that is not there."""
    if not run_dir.is_dir():
        raise UsageError(f"run directory {str(run_dir)!r} does not exist; pass a directory made by `es-service train`")


def lock(run_dir: Path) -> rundir.Lock:
    """The lock of an existing run directory, held: this process alone writes it until it is released."""
    return rundir.Lock(run_dir)


def run_info(run_dir: Path) -> dict:
    """run.json's fields; refuses a run directory whose run.json is missing or damaged."""
    info = rundir.read_run_info(run_dir)
    if info is None:
        raise UsageError(
            f"{str(run_dir / RUN_INFO_NAME)!r} is missing or damaged, and {str(run_dir)!r} cannot be "
            "continued without it: start the run again with --force"
        )
    return info


def final_accuracies(record: dict) -> dict:
    return {key: record[key] for key in FINAL_ACCURACIES if key in record}


@dataclasses.dataclass(frozen=True)
class Run:
    """A run directory and the config it runs."""

    path: Path
    config: Config

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def begun(self) -> bool:
        """Whether the directory has been created (a warm start's stage may not have been yet)."""
        return (self.path / RUN_INFO_NAME).is_file()

    def create(self, force: bool, state: dict | None = None, **info) -> rundir.Lock:
        """Build the directory in a temporary sibling and rename it into place (never half-written), with
        the checkpoint ``state`` when given, replacing an old run when ``force``; returns its lock, held."""

        def fill(folder: Path) -> None:
            _write_config(folder, self.config)
            rundir.write_run_info(
                folder,
                **{
                    "status": "created",
                    "created": time.time(),
                    "torch": torch.__version__,
                    "config_digest": self.config.digest(),
                    "noise_seed": planning.noise_seed(self.config.seed),
                    **info,
                },
            )
            if state is not None:
                checkpoint.save(state, folder / CHECKPOINT_NAME)

        return rundir.create(self.path, fill, force)

    def info(self) -> dict:
        return run_info(self.path)

    def record(self, **fields) -> None:
        """Update run.json (a field given as None is removed)."""
        rundir.write_run_info(self.path, **fields)

    def started(self, **fields) -> None:
        """run.json: this process runs it now (an old error is dropped)."""
        self.record(status="running", pid=os.getpid(), error=None, **fields)

    def stopped(self, err: BaseException, **fields) -> None:
        """run.json: the run was interrupted or failed, and why."""
        self.record(status="interrupted" if isinstance(err, Interrupted) else "failed", error=str(err), **fields)

    def resumed(self, noise_seed: int, info_lost: bool) -> None:
        """Write the config a resume runs (its overrides included), and run.json's fields when it was
        missing or damaged (the checkpoint and config.yaml hold the state)."""
        _write_config(self.path, self.config)
        if info_lost:
            self.record(config_digest=self.config.digest(), noise_seed=noise_seed)

    def wall_s_total(self) -> float:
        return sum(record["wall_s"] for record in read_metrics(self.path / METRICS_NAME))

    def warm_start_stages(self) -> Iterator[tuple[str, Run, int, float]]:
        """The warm start's stages that train (name, run, epochs, learning rate), in order, each a run
        directory under ``warm_start/`` (``es-service report`` reads them)."""
        for name, (epochs, learning_rate) in zip(WARM_START_STAGES, self.config.warm_start.schedules(), strict=True):
            if epochs:
                yield name, Run(self.path / WARM_START / name, self.config), epochs, learning_rate

    def plot(self) -> None:
        """Draw the run's learning curve; a failure is a warning, never the run's."""
        try:
            plot_runs([(self.path.name, read_metrics(self.path / METRICS_NAME))], self.path / PLOT_NAME)
        except Exception as err:
            # stderr: stdout carries the run's JSON summary
            print(f"es-service: warning: could not draw the learning curve: {err}", file=sys.stderr, flush=True)


def _write_config(folder: Path, config: Config) -> None:
    rundir.atomic_write(Path(folder) / CONFIG_NAME, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())


@dataclasses.dataclass(frozen=True)
class Resumption:
    """What ``resume`` continues: ``run`` (with the config it resumes with) as ``kind`` says; an ES run
    from ``state``, its checkpoint."""

    run: Run
    kind: str  # "es", "warm start" or "backprop"
    state: dict | None = None
    info_lost: bool = False  # run.json was missing or damaged: the ES checkpoint and config.yaml rebuild it


def resumption(run_dir: Path, overrides: list[str], stop_after: int | None, problem: Problem | None) -> Resumption:
    """Decide how the (locked) ``run_dir`` continues, refusing what cannot continue before anything
    changes. ``problem``: the one the run trained, when not the seed's network."""
    path = run_dir / CHECKPOINT_NAME
    read_metrics(run_dir / METRICS_NAME)  # a damaged line is refused before anything changes
    info = rundir.read_run_info(run_dir)
    if info is None and path.is_file():  # the checkpoint and config.yaml hold the state: run.json is rebuilt
        info = {}
        if any("noise_std" not in record for record in read_metrics(run_dir / METRICS_NAME)):
            raise UsageError(
                f"{str(run_dir / RUN_INFO_NAME)!r} is missing or damaged, and this is a backprop run, "
                "whose schedule only run.json records; start it again with --force"
            )
    elif info is None and not (run_dir / WARM_START).is_dir():
        info = run_info(run_dir)  # raises, naming what is wrong
    if (info or {}).get("method", "es").startswith("backprop"):
        if stop_after is not None:
            raise UsageError(
                "--stop-after counts ES generations; a backprop run resumes to its --epochs "
                "(--time-budget stops it sooner)"
            )
        return Resumption(Run(run_dir, _resume_config(load_config(run_dir / CONFIG_NAME), overrides)), "backprop")
    if not path.exists() and (run_dir / WARM_START).is_dir():  # stopped in its warm start, before ES began
        return Resumption(Run(run_dir, _resume_config(load_config(run_dir / CONFIG_NAME), overrides)), "warm start")
    if not path.exists():  # checkpoint.load's fix (pass a checkpoint) is no option of resume's
        raise UsageError(
            f"run directory {str(run_dir)!r} has no {CHECKPOINT_NAME} to continue from; start the run again "
            f"with `es-service train --config {run_dir / CONFIG_NAME} --run-dir {run_dir} --force`"
        )
    state = checkpoint.load(path) if problem is None else checkpoint.load(path, problem.layout)
    _check_belongs(run_dir, path, state, info or {})
    config = _resume_config(state["config"], overrides)
    if state["generation"] > config.generations:
        raise ConfigError(
            f"generations: {config.generations} is below the checkpoint's generation {state['generation']}"
        )
    return Resumption(Run(run_dir, config), "es", state, info_lost=not info)


def _resume_config(saved: Config, overrides: list[str]) -> Config:
    """The saved config with resume's --set overrides, which may not change theta's path."""
    for text in overrides:
        if not text.startswith(RESUME_OVERRIDABLE):
            raise ConfigError(
                f"--set {text!r}: resume may change only {', '.join(RESUME_OVERRIDABLE)} "
                "(other fields would change theta's path); start a new run instead"
            )
    config = from_dict(saved.to_dict(), list(overrides))
    if config.digest() != saved.digest():
        raise ConfigError(
            "--set generations: this run's schedules (es.*_final) stretch over `generations`, so changing it "
            "would change theta's path; resume without it or start a new run"
        )
    return config


def _check_belongs(run_dir: Path, path: Path, state: dict, info: dict) -> None:
    """Refuse a checkpoint that is not this run's (another run's copied in, or a changed noise seed):
    resuming from it would silently turn this directory into another run."""
    try:
        saved = load_config(run_dir / CONFIG_NAME)
    except ConfigError:
        saved = None
    digest = saved.digest() if saved is not None else info.get("config_digest")
    if digest is None:
        raise UsageError(
            f"{str(run_dir)!r}: config.yaml cannot be read and run.json does not record the run's "
            "config, so nothing shows that checkpoint.pt belongs to this run; start a new run "
            f"with `es-service train --init-from {path}`"
        )
    if state["config"].digest() != digest:
        raise checkpoint.CheckpointError(
            f"checkpoint {str(path)!r} was made with another config than this run directory's (digest "
            f"{state['config'].digest()}, not {digest}): it belongs to another run; put this run's checkpoint "
            f"back, or start a new run with `es-service train --init-from {path}`"
        )
    seed = info.get("noise_seed", planning.noise_seed(state["config"].seed))
    if state["noise"]["seed"] != seed:
        raise checkpoint.CheckpointError(
            f"checkpoint {str(path)!r} has noise seed {state['noise']['seed']}, but this run's is {seed}: "
            "its theta followed other noise; put this run's checkpoint back or start a new run"
        )
