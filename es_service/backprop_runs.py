"""Backprop run directories: the ``es-service backprop`` command's run and a hybrid's warm start.

A backprop run keeps its schedule (``BackpropSchedule``) in run.json, so that ``resume`` can continue
it from its last epoch. The training loop itself is es_service/backprop.py.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from es_service import checkpoint
from es_service.backprop import train_backprop
from es_service.config import WARM_START_STAGES, Config, ConfigError
from es_service.rundir import CHECKPOINT_NAME, RUN_INFO_NAME, write_run_info
from es_service.runs import (
    FINAL_ACCURACIES,
    UsageError,
    check_run_dir,
    create_run_dir,
    initial_theta,
    load_data,
    plot,
    record_stop,
    resolve,
    run_info,
)
from es_service.stopping import Interrupted


@dataclasses.dataclass(frozen=True)
class BackpropSchedule:
    """What a backprop run trains for, kept in its run.json (``backprop``) so that it can be resumed."""

    epochs: int
    learning_rate: float
    gradient: str = "masked"
    batch_size: int = 128
    device: str = "auto"  # as asked for: resolved when it (re)starts


def backprop(
    config: Config,
    run_dir: Path,
    force: bool,
    epochs: int,
    learning_rate: float,
    time_budget_s: float | None,
    device: str,
    gradient: str = "masked",
    init_from: Path | None = None,
) -> dict:
    """The ablation's backprop row, in a run directory of the usual format."""
    check_run_dir(run_dir, force)
    if config.network.arithmetic == "cpu-ftz":
        raise ConfigError("network.arithmetic: backprop supports tf-ftz and linear (autograd), not cpu-ftz")
    resolve(device, "--device", "use --device cpu (or auto)")
    theta, origin = initial_theta(config, init_from)
    record = start_backprop(
        config,
        run_dir,
        force,
        load_data(config),
        BackpropSchedule(epochs, learning_rate, gradient, device=device),
        time_budget_s,
        theta,
        origin,
    )
    return {"run_dir": str(run_dir), **record}


def warm_start(config: Config, run_dir: Path, data, quiet: bool = False) -> tuple[torch.Tensor, dict]:
    """``config.warm_start``'s backprop stages, each a run directory under ``run_dir/warm_start/``
    (``es-service report`` reads them); returns the last stage's theta and where it came from. A stage
    already there is continued from its last epoch (or kept, when finished): a resume redoes nothing."""
    warm = config.warm_start
    theta, origin = initial_theta(config, None)
    for name, (epochs, learning_rate) in zip(WARM_START_STAGES, warm.schedules(), strict=True):
        if not epochs:
            continue
        stage_dir = run_dir / "warm_start" / name
        try:
            if (stage_dir / RUN_INFO_NAME).is_file():
                continue_backprop(config, stage_dir, data, None, quiet)
            else:
                schedule = BackpropSchedule(
                    epochs, learning_rate, warm.gradient, warm.batch_size, config.workers.device
                )
                start_backprop(config, stage_dir, False, data, schedule, None, theta, origin, quiet)
        except Interrupted as err:
            raise Interrupted(f"{err} (warm start, {name} stage)") from None
        theta, origin = initial_theta(config, stage_dir / CHECKPOINT_NAME)
    return theta, origin


def start_backprop(
    config: Config,
    run_dir: Path,
    force: bool,
    data,
    schedule: BackpropSchedule,
    time_budget_s: float | None,
    theta: torch.Tensor,
    origin: dict | None,
    quiet: bool = False,
) -> dict:
    """Create a backprop run directory that starts from ``theta`` and train it."""
    device = resolve(schedule.device, "--device", "use --device cpu (or auto)")
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    method = "backprop" if schedule.gradient == "masked" else f"backprop ({schedule.gradient})"
    with create_run_dir(
        run_dir,
        config,
        None,
        force,
        method=method,
        device=f"local ({device}){gpu}",
        init_from=origin,
        backprop=dataclasses.asdict(schedule),
    ):
        return continue_backprop(config, run_dir, data, time_budget_s, quiet, theta)


def continue_backprop(
    config: Config, run_dir: Path, data, time_budget_s: float | None, quiet: bool, theta: torch.Tensor | None = None
) -> dict:
    """Train a backprop run directory to its schedule's epochs, from its checkpoint when it has one
    (else from ``theta``, or from the start its run.json records); returns its generation and accuracies."""
    info = run_info(run_dir)
    try:
        schedule = BackpropSchedule(**info["backprop"])
    except (KeyError, TypeError):
        raise UsageError(
            f"{str(run_dir)!r}: run.json does not record its backprop schedule (made by an older "
            "es-service, or edited); start it again with --force"
        ) from None
    if info.get("status") == "finished":
        return {"generation": info.get("generation"), **info.get("final", {})}
    optimizer_state, start_epoch = None, 0
    if (run_dir / CHECKPOINT_NAME).is_file():
        state = checkpoint.load(run_dir / CHECKPOINT_NAME)
        theta, optimizer_state, start_epoch = state["theta"], state["optimizer"], state["generation"]
    elif theta is None:
        theta = _recorded_start(config, run_dir, info.get("init_from"))
    write_run_info(run_dir, status="running", pid=os.getpid(), error=None)
    try:
        record = train_backprop(
            config,
            run_dir,
            data,
            resolve(schedule.device, "--device", "use --device cpu"),
            schedule.epochs,
            batch_size=schedule.batch_size,
            learning_rate=schedule.learning_rate,
            time_budget_s=time_budget_s,
            gradient=schedule.gradient,
            theta=theta,
            optimizer_state=optimizer_state,
            start_epoch=start_epoch,
            quiet=quiet,
        )
    except BaseException as err:
        record_stop(run_dir, err)
        raise
    final = {k: record[k] for k in FINAL_ACCURACIES if k in record}
    final = final or info.get("final")  # no epoch left to run: the accuracies it had
    write_run_info(run_dir, status="finished", generation=record["generation"], final=final)
    plot(run_dir)
    return {"generation": record["generation"], **(final or {})}


def _recorded_start(config: Config, run_dir: Path, origin: dict | None) -> torch.Tensor:
    """The theta a run without a checkpoint started from: the seed's, or its init_from checkpoint's,
    which must still be there, unchanged."""
    if origin is None:
        return initial_theta(config, None)[0]
    try:
        theta, now = initial_theta(config, Path(origin["checkpoint"]))
    except checkpoint.CheckpointError as err:
        raise UsageError(
            f"{str(run_dir)!r} has no checkpoint yet, and the one it started from cannot be read "
            f"({err}); start it again with --force"
        ) from None
    if now["theta_sha256"] != origin["theta_sha256"]:
        raise UsageError(
            f"{str(run_dir)!r} has no checkpoint yet, and the one it started from, "
            f"{origin['checkpoint']!r}, has changed since; start it again with --force"
        )
    return theta
