"""Start, resume and evaluate runs: everything between the CLI's arguments and the Trainer.

A run directory holds config.yaml (resolved), run.json (status, device, timings), metrics.jsonl,
checkpoint.pt and learning_curve.png. It appears whole (built in a temporary sibling, then renamed)
and is never replaced without ``force``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from es_service import checkpoint, noise, plan as planning
from es_service.config import WARM_START_STAGES, Config, ConfigError, WarmStartConfig, from_dict, load as load_config
from es_service.data import load_mnist
from es_service.driver import CHECKPOINT_NAME, Trainer, TrainState
from es_service.executors import LocalExecutor, resolve_device
from es_service.metrics import read as read_metrics
from es_service.progress import Progress
from es_service.stopping import Interrupted
from workers.evaluator import center_accuracies, set_process_arithmetic

RESUME_OVERRIDABLE = ("generations", "data_dir", "workers.", "eval.", "checkpoint.")
FINAL_ACCURACIES = ("train_accuracy", "test_accuracy", "validation_accuracy")  # what run.json's "final" keeps


class UsageError(RuntimeError):
    """A bad argument or path, phrased with the fix."""


def load_data(config: Config, data_dir: str | None = None):
    """MNIST for a run: from ``data_dir`` or the config's, with ``validation_size`` images held out."""
    return load_mnist(data_dir or config.data_dir).hold_out(config.validation_size)


def default_run_dir(config_path: str | Path) -> Path:
    return Path("runs") / f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(run_dir: Path, force: bool) -> None:
    if run_dir.exists() and not force:
        raise UsageError(
            f"run directory {str(run_dir)!r} already exists; pick another --run-dir, "
            f"resume it with `es-service resume {run_dir}`, or pass --force to replace it"
        )
    if run_dir.exists() and not (run_dir / "run.json").exists() and any(run_dir.iterdir()):
        raise UsageError(f"{str(run_dir)!r} exists and is not a run directory; refusing to replace it even with --force")


def device_description(executor) -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return f"{executor.describe()}; driver CPU {cpu} x{os.cpu_count()}" + (f"; GPU {gpu}" if gpu else "")


def write_run_info(run_dir: Path, **fields) -> None:
    """Update run.json atomically; a field given as None is removed (a resumed run drops its old error)."""
    path = run_dir / "run.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    info.update(fields)
    info = {key: value for key, value in info.items() if value is not None}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def create_run_dir(run_dir: Path, config: Config, state: dict | None, force: bool, **info) -> None:
    """Build the directory in a temporary sibling and rename it into place: never half-written."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.creating-", dir=run_dir.parent))
    try:
        (tmp / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        write_run_info(tmp, **{"status": "created", "created": time.time(), "torch": torch.__version__, **info})
        if state is not None:
            checkpoint.save(state, tmp / CHECKPOINT_NAME)
        if run_dir.exists() and force:
            shutil.rmtree(run_dir)
        os.replace(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_executor(config: Config, table, data, address: str | None):
    arithmetic = config.network.arithmetic
    if config.workers.executor == "local":
        device = "cpu" if arithmetic == "cpu-ftz" else resolve_device(config.workers.device)
        return LocalExecutor(table, data.train_images, data.train_labels, arithmetic, device, config.workers.fused)
    import ray

    from es_service.ray_executor import RayExecutor

    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):  # a cluster (inside a Ray job RAY_ADDRESS is set)
            kwargs = {"address": address} if address else {}
        else:  # a private embedded Ray: never join some other `ray start` cluster on this machine
            kwargs = {"address": "local", "include_dashboard": False}
        ray.init(logging_level="WARNING", log_to_driver=True, **kwargs)
    autoscale = bool(address or os.environ.get("RAY_ADDRESS"))
    return RayExecutor(table, data.train_images, data.train_labels, arithmetic, config.workers, autoscale)


def _train(config: Config, run_dir: Path, state: TrainState, noise_seed: int, data, address: str | None,
           stop_after: int | None, time_budget_s: float | None, quiet: bool) -> dict:
    table = noise.make_table(noise_seed, config.noise.table_size)
    executor = build_executor(config, table, data, address)
    progress = None if quiet else Progress(config.generations, start=state.generation)
    # the driver's update shares the executor's copy of the table (on the GPU for a local CUDA executor)
    trainer = Trainer(config, run_dir, data, executor.table, noise_seed, executor, state, executor.device, progress)
    write_run_info(run_dir, status="running", device=device_description(executor), pid=os.getpid(), error=None)
    try:
        record = trainer.run(stop_after=stop_after, time_budget_s=time_budget_s)
    except BaseException as err:
        write_run_info(run_dir, status="interrupted" if isinstance(err, Interrupted) else "failed",
                       error=str(err), generation=trainer.generation)
        raise
    finally:
        executor.close()
        _plot(run_dir)
    finished = trainer.generation >= config.generations
    if not any(key.endswith("_accuracy") for key in record):
        record.update(trainer.evaluate_center())
    write_run_info(run_dir, status="finished" if finished else "paused", generation=trainer.generation,
                   final={k: record[k] for k in FINAL_ACCURACIES if k in record},
                   wall_s_total=sum(r["wall_s"] for r in read_metrics(run_dir / "metrics.jsonl")))
    return {"generation": trainer.generation, "run_dir": str(run_dir), **trainer.last_accuracy}


def _plot(run_dir: Path) -> None:
    try:
        from es_service.plot import plot_runs

        plot_runs([(run_dir.name, read_metrics(run_dir / "metrics.jsonl"))], run_dir / "learning_curve.png")
    except Exception as err:  # a plot must never cost a run
        print(f"warning: could not draw the learning curve: {err}")


def initial_theta(config: Config, init_from: Path | None) -> tuple[torch.Tensor, dict | None]:
    """The seed's initialisation, or the theta of the checkpoint ``init_from`` (with where it came from,
    for run.json). Only theta is taken: the new run starts its own optimizer and schedules."""
    if init_from is None:
        return planning.seed_theta(config.seed), None
    try:
        state = checkpoint.load(init_from)
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(f"--init-from: {err}") from None
    theta = state["theta"].clone()
    if not bool(torch.isfinite(theta).all()):
        raise checkpoint.CheckpointError(f"--init-from: checkpoint {str(init_from)!r} holds a theta with inf or nan; "
                                         "start from another checkpoint")
    digest = hashlib.sha256(theta.numpy().tobytes()).hexdigest()
    return theta, {"checkpoint": str(Path(init_from).resolve()), "generation": state["generation"], "theta_sha256": digest}


def train(config: Config, run_dir: Path, force: bool = False, address: str | None = None,
          stop_after: int | None = None, time_budget_s: float | None = None, quiet: bool = False,
          init_from: Path | None = None) -> dict:
    check_run_dir(run_dir, force)
    if init_from is not None and config.warm_start.epochs:
        print("warm_start skipped: --init-from gives ES its starting theta", flush=True)
        config = dataclasses.replace(config, warm_start=WarmStartConfig())
    theta, origin = initial_theta(config, init_from)
    set_process_arithmetic(config.network.arithmetic)
    data = load_data(config)
    if config.warm_start.epochs:  # the directory appears first, to hold the stages; its ES checkpoint comes after them
        create_run_dir(run_dir, config, None, force, status="warm start")
        return _warm_start_then_train(config, run_dir, data, address, stop_after, time_budget_s, quiet)
    create_run_dir(run_dir, config, _es_start(config, theta), force, init_from=origin)
    return _train(config, run_dir, TrainState(theta, None, 0), planning.noise_seed(config.seed), data, address,
                  stop_after, time_budget_s, quiet)


def _es_start(config: Config, theta: torch.Tensor) -> dict:
    """The checkpoint of generation 0: theta and a fresh Adam."""
    from es_service.strategy import AdamES

    adam = AdamES.from_config(theta, config.es)
    return checkpoint.build(config, theta, adam.state_dict(), 0, planning.noise_seed(config.seed))


def _warm_start_then_train(config: Config, run_dir: Path, data, address: str | None, stop_after: int | None,
                           time_budget_s: float | None, quiet: bool) -> dict:
    try:
        theta, origin = warm_start(config, run_dir, data, quiet)
    except BaseException as err:
        write_run_info(run_dir, status="interrupted" if isinstance(err, Interrupted) else "failed", error=str(err))
        raise
    checkpoint.save(_es_start(config, theta), run_dir / CHECKPOINT_NAME)
    write_run_info(run_dir, status="created", init_from=origin, error=None)
    return _train(config, run_dir, TrainState(theta, None, 0), planning.noise_seed(config.seed), data, address,
                  stop_after, time_budget_s, quiet)


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
            if (stage_dir / "run.json").is_file():
                _continue_backprop(config, stage_dir, data, None, quiet)
            else:
                schedule = BackpropSchedule(epochs, learning_rate, warm.gradient, warm.batch_size, config.workers.device)
                _backprop_run(config, stage_dir, False, data, schedule, None, theta, origin, quiet)
        except Interrupted as err:
            raise Interrupted(f"{err} (warm start, {name} stage)") from None
        theta, origin = initial_theta(config, stage_dir / CHECKPOINT_NAME)
    return theta, origin


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


def resume(run_dir: Path, overrides: list[str] = (), address: str | None = None,
           stop_after: int | None = None, time_budget_s: float | None = None, quiet: bool = False) -> dict:
    """Continue a run where it stopped: an ES run from its checkpoint, a hybrid still in its warm start
    from its stage's last epoch, a backprop run from its last epoch."""
    path = run_dir / CHECKPOINT_NAME
    if not run_dir.is_dir():
        raise UsageError(f"run directory {str(run_dir)!r} does not exist; pass a directory made by `es-service train`")
    info = _run_info(run_dir) if (run_dir / "run.json").exists() else {}  # an ES run's checkpoint is enough
    if info.get("method", "es").startswith("backprop"):
        if stop_after is not None:
            raise UsageError("--stop-after counts ES generations; a backprop run resumes to its --epochs "
                             "(--time-budget stops it sooner)")
        config = _resume_config(load_config(run_dir / "config.yaml"), overrides)
        record = _continue_backprop(config, run_dir, load_data(config), time_budget_s, quiet)
        return {"run_dir": str(run_dir), **record}
    if not path.exists() and (run_dir / "warm_start").is_dir():  # stopped in its warm start, before ES began
        config = _resume_config(load_config(run_dir / "config.yaml"), overrides)
        set_process_arithmetic(config.network.arithmetic)
        return _warm_start_then_train(config, run_dir, load_data(config), address, stop_after, time_budget_s, quiet)
    state = checkpoint.load(path)
    config = _resume_config(state["config"], overrides)
    if state["generation"] > config.generations:
        raise ConfigError(f"generations: {config.generations} is below the checkpoint's generation {state['generation']}")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    set_process_arithmetic(config.network.arithmetic)
    data = load_data(config)
    train_state = TrainState(state["theta"], state["optimizer"], state["generation"])
    return _train(config, run_dir, train_state, state["noise"]["seed"], data, address, stop_after, time_budget_s, quiet)


def _run_info(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{str(path)!r} cannot be read ({err}); {str(run_dir)!r} is not a whole run directory: "
                         "start the run again with --force") from None


@dataclasses.dataclass(frozen=True)
class BackpropSchedule:
    """What a backprop run trains for, kept in its run.json (``backprop``) so that it can be resumed."""

    epochs: int
    learning_rate: float
    gradient: str = "masked"
    batch_size: int = 128
    device: str = "auto"  # as asked for: resolved when it (re)starts


def backprop(config: Config, run_dir: Path, force: bool, epochs: int, learning_rate: float,
             time_budget_s: float | None, device: str, gradient: str = "masked", init_from: Path | None = None) -> dict:
    """The ablation's backprop row, in a run directory of the usual format."""
    check_run_dir(run_dir, force)
    if config.network.arithmetic == "cpu-ftz":
        raise ConfigError("network.arithmetic: backprop supports tf-ftz and linear (autograd), not cpu-ftz")
    theta, origin = initial_theta(config, init_from)
    record = _backprop_run(config, run_dir, force, load_data(config), BackpropSchedule(epochs, learning_rate, gradient,
                           device=device), time_budget_s, theta, origin)
    return {"run_dir": str(run_dir), **record}


def _backprop_run(config: Config, run_dir: Path, force: bool, data, schedule: BackpropSchedule,
                  time_budget_s: float | None, theta: torch.Tensor, origin: dict | None, quiet: bool = False) -> dict:
    device = resolve_device(schedule.device)
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    method = "backprop" if schedule.gradient == "masked" else f"backprop ({schedule.gradient})"
    create_run_dir(run_dir, config, None, force, method=method, device=f"local ({device}){gpu}", init_from=origin,
                   backprop=dataclasses.asdict(schedule))
    return _continue_backprop(config, run_dir, data, time_budget_s, quiet, theta)


def _continue_backprop(config: Config, run_dir: Path, data, time_budget_s: float | None, quiet: bool,
                       theta: torch.Tensor | None = None) -> dict:
    """Train a backprop run directory to its schedule's epochs, from its checkpoint when it has one
    (else from ``theta``, or from the start its run.json records); returns its generation and accuracies."""
    from es_service.backprop import train_backprop

    info = _run_info(run_dir)
    try:
        schedule = BackpropSchedule(**info["backprop"])
    except (KeyError, TypeError):
        raise UsageError(f"{str(run_dir)!r}: run.json does not record its backprop schedule (made by an older "
                         "es-service, or edited); start it again with --force") from None
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
        record = train_backprop(config, run_dir, data, resolve_device(schedule.device), schedule.epochs,
                                batch_size=schedule.batch_size, learning_rate=schedule.learning_rate,
                                time_budget_s=time_budget_s, gradient=schedule.gradient, theta=theta,
                                optimizer_state=optimizer_state, start_epoch=start_epoch, quiet=quiet)
    except BaseException as err:
        write_run_info(run_dir, status="interrupted" if isinstance(err, Interrupted) else "failed", error=str(err))
        raise
    final = {k: record[k] for k in FINAL_ACCURACIES if k in record}
    final = final or info.get("final")  # no epoch left to run: the accuracies it had
    write_run_info(run_dir, status="finished", generation=record["generation"], final=final)
    _plot(run_dir)
    return {"generation": record["generation"], **(final or {})}


def _recorded_start(config: Config, run_dir: Path, origin: dict | None) -> torch.Tensor:
    """The theta a run without a checkpoint started from: the seed's, or its init_from checkpoint's,
    which must still be there, unchanged."""
    if origin is None:
        return initial_theta(config, None)[0]
    try:
        theta, now = initial_theta(config, Path(origin["checkpoint"]))
    except checkpoint.CheckpointError as err:
        raise UsageError(f"{str(run_dir)!r} has no checkpoint yet, and the one it started from cannot be read "
                         f"({err}); start it again with --force") from None
    if now["theta_sha256"] != origin["theta_sha256"]:
        raise UsageError(f"{str(run_dir)!r} has no checkpoint yet, and the one it started from, "
                         f"{origin['checkpoint']!r}, has changed since; start it again with --force")
    return theta


def evaluate_checkpoint(path: Path, data_dir: str | None = None, device: str = "auto") -> dict:
    state = checkpoint.load(path)
    config: Config = state["config"]
    set_process_arithmetic(config.network.arithmetic)
    data = load_data(config, data_dir)
    device = resolve_device(device)
    if config.network.arithmetic == "cpu-ftz":
        device = "cpu"
    return {
        "checkpoint": str(path),
        "generation": state["generation"],
        "arithmetic": config.network.arithmetic,
        "device": device,
        **center_accuracies(state["theta"], data.eval_sets(device), config.network.arithmetic),
    }
