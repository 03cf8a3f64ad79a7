"""Backprop run directories: the ``es-service backprop`` command's run and a hybrid's warm start.

A backprop run keeps its schedule (``BackpropSchedule``) in run.json, so that ``resume`` can continue
it from its last epoch. The training loop itself is es_service/backprop.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from es_service import checkpoint, lifecycle
from es_service.backprop import train_backprop
from es_service.config import Config, ConfigError
from es_service.lifecycle import Run
from es_service.runs import UsageError, initial_theta, load_data, resolve
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
    lifecycle.check_new(run_dir, force)
    if config.network.arithmetic == "cpu-ftz":
        raise ConfigError("network.arithmetic: backprop supports tf-ftz and linear (autograd), not cpu-ftz")
    resolve(device, "--device", "use --device cpu (or auto)")
    theta, origin = initial_theta(config, init_from)
    schedule = BackpropSchedule(epochs, learning_rate, gradient, device=device)
    record = start_backprop(Run(run_dir, config), force, load_data(config), schedule, time_budget_s, theta, origin)
    return {"run_dir": str(run_dir), **record}


def warm_start(run: Run, data, quiet: bool = False) -> tuple[torch.Tensor, dict]:
    """``run.config.warm_start``'s backprop stages (``Run.warm_start_stages``); returns the last stage's
    theta and where it came from. A stage already there is continued from its last epoch (or kept, when
    finished): a resume redoes nothing."""
    warm = run.config.warm_start
    theta, origin = initial_theta(run.config, None)
    for name, stage, epochs, learning_rate in run.warm_start_stages():
        try:
            if stage.begun:
                continue_backprop(stage, data, None, quiet)
            else:
                schedule = BackpropSchedule(
                    epochs, learning_rate, warm.gradient, warm.batch_size, run.config.workers.device
                )
                start_backprop(stage, False, data, schedule, None, theta, origin, quiet)
        except Interrupted as err:
            raise Interrupted(f"{err} (warm start, {name} stage)") from None
        theta, origin = initial_theta(run.config, stage.checkpoint)
    return theta, origin


def start_backprop(
    run: Run,
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
    with run.create(
        force,
        method=method,
        device=f"local ({device}){gpu}",
        init_from=origin,
        backprop=dataclasses.asdict(schedule),
    ):
        return continue_backprop(run, data, time_budget_s, quiet, theta)


def continue_backprop(
    run: Run, data, time_budget_s: float | None, quiet: bool, theta: torch.Tensor | None = None
) -> dict:
    """Train a backprop run directory to its schedule's epochs, from its checkpoint when it has one
    (else from ``theta``, or from the start its run.json records); returns its generation and accuracies."""
    info = run.info()
    try:
        schedule = BackpropSchedule(**info["backprop"])
    except (KeyError, TypeError):
        raise UsageError(
            f"{str(run.path)!r}: run.json does not record its backprop schedule (made by an older "
            "es-service, or edited); start it again with --force"
        ) from None
    if info.get("status") == "finished":
        return {"generation": info.get("generation"), **info.get("final", {})}
    optimizer_state, start_epoch = None, 0
    if run.checkpoint.is_file():
        state = checkpoint.load(run.checkpoint)
        theta, optimizer_state, start_epoch = state["theta"], state["optimizer"], state["generation"]
    elif theta is None:
        theta = _recorded_start(run, info.get("init_from"))
    run.started()
    try:
        record = train_backprop(
            run.config,
            run.path,
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
        run.stopped(err)
        raise
    final = lifecycle.final_accuracies(record) or info.get("final")  # no epoch left to run: the accuracies it had
    run.record(status="finished", generation=record["generation"], final=final)
    run.plot()
    return {"generation": record["generation"], **(final or {})}


def _recorded_start(run: Run, origin: dict | None) -> torch.Tensor:
    """The theta a run without a checkpoint started from: the seed's, or its init_from checkpoint's,
    which must still be there, unchanged."""
    if origin is None:
        return initial_theta(run.config, None)[0]
    try:
        theta, now = initial_theta(run.config, Path(origin["checkpoint"]))
    except checkpoint.CheckpointError as err:
        raise UsageError(
            f"{str(run.path)!r} has no checkpoint yet, and the one it started from cannot be read "
            f"({err}); start it again with --force"
        ) from None
    if now["theta_sha256"] != origin["theta_sha256"]:
        raise UsageError(
            f"{str(run.path)!r} has no checkpoint yet, and the one it started from, "
            f"{origin['checkpoint']!r}, has changed since; start it again with --force"
        )
    return theta
