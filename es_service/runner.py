"""Start, resume and evaluate runs: everything between the CLI's arguments and the Trainer.

A run directory (es_service/rundir.py) holds config.yaml (resolved), run.json (status, device,
timings), metrics.jsonl, checkpoint.pt and learning_curve.png. It appears whole (built in a temporary
sibling, then renamed), is never replaced without ``force``, and then only once everything that can
fail before the first generation (config, data, executor, cluster) has been built. One process at a
time writes it (its lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import platform
import socket
import sys
import time
from pathlib import Path

import torch
import yaml

from es_service import checkpoint, plan as planning, rundir
from es_service.config import (
    WARM_START_STAGES, Config, ConfigError, WarmStartConfig, check_fits_memory, from_dict, load as load_config,
)
from es_service.data import load_mnist
from es_service.driver import Trainer, TrainState
from es_service.executors import LocalExecutor, resolve_device
from es_service.metrics import read as read_metrics
from es_service.progress import Progress
from es_service.rundir import CHECKPOINT_NAME, CONFIG_NAME, LOCK_NAME, METRICS_NAME, PLOT_NAME, RUN_INFO_NAME, write_run_info
from es_service.stopping import Interrupted
from workers import layer_members, noise
from workers.evaluator import center_accuracies, set_process_arithmetic

RESUME_OVERRIDABLE = ("generations", "data_dir", "workers.", "eval.", "checkpoint.")
FINAL_ACCURACIES = ("train_accuracy", "test_accuracy", "validation_accuracy")  # what run.json's "final" keeps
CONNECT_TIMEOUT_S = 10.0


class UsageError(RuntimeError):
    """A bad argument or path, phrased with the fix."""


class RunFailed(RuntimeError):
    """The input was fine but the run could not go on (e.g. the cluster is unreachable)."""


def load_data(config: Config, data_dir: str | None = None):
    """MNIST for a run: from ``data_dir`` or the config's, with ``validation_size`` images held out."""
    return load_mnist(data_dir or config.data_dir).hold_out(config.validation_size)


def default_run_dir(config_path: str | Path) -> Path:
    return Path("runs") / f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse, before anything is loaded, a --run-dir that cannot become this run's directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {str(run_dir)!r} is a file; pass the path of a directory (it is created)")
    existing = next(path for path in [run_dir, *run_dir.parents] if path.exists())
    if not existing.is_dir():
        raise UsageError(f"--run-dir {str(run_dir)!r} lies under the file {str(existing)!r}; pass a path in a directory")
    folder = existing if existing != run_dir else run_dir.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--run-dir {str(run_dir)!r}: {str(folder)!r} is not writable by this user; "
                         "pass a --run-dir in a writable directory")
    if run_dir.exists() and not force:
        raise UsageError(
            f"run directory {str(run_dir)!r} already exists; pick another --run-dir, "
            f"resume it with `es-service resume {run_dir}`, or pass --force to replace it"
        )
    if run_dir.exists() and not (run_dir / RUN_INFO_NAME).exists() and any(run_dir.iterdir()):
        raise UsageError(f"{str(run_dir)!r} exists and is not a run directory; refusing to replace it even with --force")
    if (run_dir / LOCK_NAME).exists():
        rundir.Lock(run_dir).release()  # refuse now, not after loading everything, when a process writes it


def device_description(executor) -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return f"{executor.describe()}; driver CPU {cpu} x{os.cpu_count()}" + (f"; GPU {gpu}" if gpu else "")


def write_config(folder: Path, config: Config) -> None:
    rundir.atomic_write(Path(folder) / CONFIG_NAME, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())


def create_run_dir(run_dir: Path, config: Config, state: dict | None, force: bool, **info) -> rundir.Lock:
    """Build the directory in a temporary sibling and rename it into place (never half-written), replacing
    an old run when ``force``; returns its lock, held."""

    def fill(folder: Path) -> None:
        write_config(folder, config)
        write_run_info(folder, **{"status": "created", "created": time.time(), "torch": torch.__version__,
                                  "config_digest": config.digest(), "noise_seed": planning.noise_seed(config.seed),
                                  **info})
        if state is not None:
            checkpoint.save(state, folder / CHECKPOINT_NAME)

    return rundir.create(run_dir, fill, force)


def resolve(preference: str, option: str, fix: str) -> str:
    """resolve_device, with a missing GPU reported as the option that asked for it."""
    try:
        return resolve_device(preference)
    except RuntimeError:
        raise UsageError(f"{option} is 'cuda' but torch sees no CUDA device on this machine; {fix}") from None


def _check_reachable(address: str) -> None:
    """ray.init retries an unreachable cluster for minutes; a TCP connect to it answers within seconds."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # "auto" and the like: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise RunFailed(f"cannot reach the Ray cluster at {address} ({err.strerror or err}); check --address "
                        "(or $RAY_ADDRESS) and that the cluster is up") from None


def build_executor(config: Config, table, data, address: str | None):
    arithmetic = config.network.arithmetic
    w1 = config.es.w1  # layer-1 members' subspace: from the run's training images (never validation or test)
    basis = layer_members.image_basis(data.train_images, w1.subspace) if w1.pop_size and w1.subspace else None
    if config.workers.executor == "local":
        device = "cpu" if arithmetic == "cpu-ftz" else resolve(config.workers.device, "workers.device",
                                                                  "use --set workers.device=cpu (or auto)")
        return LocalExecutor(table, data.train_images, data.train_labels, arithmetic, device, config.workers.fused,
                             basis=basis)
    import ray

    from es_service.ray_executor import RayExecutor

    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):  # a cluster (inside a Ray job RAY_ADDRESS is set)
            _check_reachable(address or os.environ["RAY_ADDRESS"])
            kwargs = {"address": address} if address else {}
        else:  # a private embedded Ray: never join some other `ray start` cluster on this machine
            kwargs = {"address": "local", "include_dashboard": False}
        ray.init(logging_level="WARNING", log_to_driver=True, **kwargs)
    autoscale = bool(address or os.environ.get("RAY_ADDRESS"))
    return RayExecutor(table, data.train_images, data.train_labels, arithmetic, config.workers, autoscale, basis)


@contextlib.contextmanager
def started_executor(config: Config, noise_seed: int, data, address: str | None):
    """The executor (with its noise table, and a connection to the cluster), closed on the way out."""
    check_fits_memory(config)
    executor = build_executor(config, noise.make_table(noise_seed, config.noise.table_size), data, address)
    try:
        yield executor
    finally:
        executor.close()


def _train(config: Config, run_dir: Path, state: TrainState, noise_seed: int, data, executor,
           stop_after: int | None, time_budget_s: float | None, quiet: bool) -> dict:
    trainer = None
    try:
        progress = None if quiet else Progress(config.generations, start=state.generation)
        # the driver's update shares the executor's copy of the table (on the GPU for a local CUDA executor)
        trainer = Trainer(config, run_dir, data, executor.table, noise_seed, executor, state, executor.device, progress,
                          basis=executor.basis)
        write_run_info(run_dir, status="running", device=device_description(executor), pid=os.getpid(), error=None)
        record = trainer.run(stop_after=stop_after, time_budget_s=time_budget_s)
    except BaseException as err:
        write_run_info(run_dir, status="interrupted" if isinstance(err, Interrupted) else "failed", error=str(err),
                       generation=trainer.saved_generation if trainer else state.generation)
        raise
    finally:
        _plot(run_dir)
    finished = trainer.generation >= config.generations
    if not any(key.endswith("_accuracy") for key in record):
        record.update(trainer.evaluate_center())
    write_run_info(run_dir, status="finished" if finished else "paused", generation=trainer.saved_generation,
                   final={k: record[k] for k in FINAL_ACCURACIES if k in record},
                   wall_s_total=sum(r["wall_s"] for r in read_metrics(run_dir / METRICS_NAME)))
    return {"generation": trainer.generation, "run_dir": str(run_dir), **trainer.last_accuracy}


def _plot(run_dir: Path) -> None:
    try:
        from es_service.plot import plot_runs

        plot_runs([(run_dir.name, read_metrics(run_dir / METRICS_NAME))], run_dir / PLOT_NAME)
    except Exception as err:  # a plot must never cost a run
        # stderr: stdout carries the run's JSON summary
        print(f"es-service: warning: could not draw the learning curve: {err}", file=sys.stderr, flush=True)


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
    digest = hashlib.sha256(theta.numpy().tobytes()).hexdigest()
    return theta, {"checkpoint": str(Path(init_from).resolve()), "generation": state["generation"], "theta_sha256": digest}


def train(config: Config, run_dir: Path, force: bool = False, address: str | None = None,
          stop_after: int | None = None, time_budget_s: float | None = None, quiet: bool = False,
          init_from: Path | None = None) -> dict:
    check_run_dir(run_dir, force)
    if init_from is not None and config.warm_start.epochs:
        print("warm_start skipped: --init-from gives ES its starting theta", flush=True)
        config = config.model_copy(update={"warm_start": WarmStartConfig()})
    theta, origin = initial_theta(config, init_from)
    set_process_arithmetic(config.network.arithmetic)
    data = load_data(config)
    noise_seed = planning.noise_seed(config.seed)
    with started_executor(config, noise_seed, data, address) as executor:
        if config.warm_start.epochs:  # the directory holds the stages; its ES checkpoint comes after them
            with create_run_dir(run_dir, config, None, force, status="warm start"):
                return _warm_start_then_train(config, run_dir, data, executor, stop_after, time_budget_s, quiet)
        with create_run_dir(run_dir, config, _es_start(config, theta), force, init_from=origin):
            return _train(config, run_dir, TrainState(theta, None, 0), noise_seed, data, executor, stop_after,
                          time_budget_s, quiet)


def _es_start(config: Config, theta: torch.Tensor) -> dict:
    """The checkpoint of generation 0: theta and a fresh Adam."""
    from es_service.strategy import AdamES

    adam = AdamES.from_config(theta, config.es)
    return checkpoint.build(config, theta, adam.state_dict(), 0, planning.noise_seed(config.seed))


def _warm_start_then_train(config: Config, run_dir: Path, data, executor, stop_after: int | None,
                           time_budget_s: float | None, quiet: bool) -> dict:
    try:
        theta, origin = warm_start(config, run_dir, data, quiet)
        checkpoint.save(_es_start(config, theta), run_dir / CHECKPOINT_NAME)
    except BaseException as err:
        write_run_info(run_dir, status="interrupted" if isinstance(err, Interrupted) else "failed", error=str(err))
        raise
    write_run_info(run_dir, status="created", init_from=origin, error=None)
    return _train(config, run_dir, TrainState(theta, None, 0), planning.noise_seed(config.seed), data, executor,
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
            if (stage_dir / RUN_INFO_NAME).is_file():
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
    if not run_dir.is_dir():
        raise UsageError(f"run directory {str(run_dir)!r} does not exist; pass a directory made by `es-service train`")
    with rundir.Lock(run_dir):
        return _resume(run_dir, list(overrides), address, stop_after, time_budget_s, quiet)


def _resume(run_dir: Path, overrides: list[str], address: str | None, stop_after: int | None,
            time_budget_s: float | None, quiet: bool) -> dict:
    path = run_dir / CHECKPOINT_NAME
    read_metrics(run_dir / METRICS_NAME)  # a damaged line is refused before anything changes
    info = rundir.read_run_info(run_dir)
    if info is None and path.is_file():  # the checkpoint and config.yaml hold the state: run.json is rebuilt
        info = {}
        if any("noise_std" not in record for record in read_metrics(run_dir / METRICS_NAME)):
            raise UsageError(f"{str(run_dir / RUN_INFO_NAME)!r} is missing or damaged, and this is a backprop run, "
                             "whose schedule only run.json records; start it again with --force")
    elif info is None and not (run_dir / "warm_start").is_dir():
        info = _run_info(run_dir)  # raises, naming what is wrong
    if (info or {}).get("method", "es").startswith("backprop"):
        if stop_after is not None:
            raise UsageError("--stop-after counts ES generations; a backprop run resumes to its --epochs "
                             "(--time-budget stops it sooner)")
        config = _resume_config(load_config(run_dir / CONFIG_NAME), overrides)
        record = _continue_backprop(config, run_dir, load_data(config), time_budget_s, quiet)
        return {"run_dir": str(run_dir), **record}
    if not path.exists() and (run_dir / "warm_start").is_dir():  # stopped in its warm start, before ES began
        config = _resume_config(load_config(run_dir / CONFIG_NAME), overrides)
        set_process_arithmetic(config.network.arithmetic)
        data = load_data(config)
        with started_executor(config, planning.noise_seed(config.seed), data, address) as executor:
            return _warm_start_then_train(config, run_dir, data, executor, stop_after, time_budget_s, quiet)
    state = checkpoint.load(path)
    _check_belongs(run_dir, path, state, info or {})
    config = _resume_config(state["config"], overrides)
    if state["generation"] > config.generations:
        raise ConfigError(f"generations: {config.generations} is below the checkpoint's generation {state['generation']}")
    set_process_arithmetic(config.network.arithmetic)
    data = load_data(config)
    noise_seed = state["noise"]["seed"]
    with started_executor(config, noise_seed, data, address) as executor:
        write_config(run_dir, config)
        if not info:
            write_run_info(run_dir, config_digest=config.digest(), noise_seed=noise_seed)
        train_state = TrainState(state["theta"], state["optimizer"], state["generation"])
        return _train(config, run_dir, train_state, noise_seed, data, executor, stop_after, time_budget_s, quiet)


def _check_belongs(run_dir: Path, path: Path, state: dict, info: dict) -> None:
    """Refuse a checkpoint that is not this run's (another run's copied in, or a changed noise seed):
    resuming from it would silently turn this directory into another run."""
    try:
        saved = load_config(run_dir / CONFIG_NAME)
    except ConfigError:
        saved = None
    digest = saved.digest() if saved is not None else info.get("config_digest")
    if digest is None:
        raise UsageError(f"{str(run_dir)!r}: config.yaml cannot be read and run.json does not record the run's "
                         "config, so nothing shows that checkpoint.pt belongs to this run; start a new run "
                         f"with `es-service train --init-from {path}`")
    if state["config"].digest() != digest:
        raise checkpoint.CheckpointError(
            f"checkpoint {str(path)!r} was made with another config than this run directory's (digest "
            f"{state['config'].digest()}, not {digest}): it belongs to another run; put this run's checkpoint "
            f"back, or start a new run with `es-service train --init-from {path}`")
    seed = info.get("noise_seed", planning.noise_seed(state["config"].seed))
    if state["noise"]["seed"] != seed:
        raise checkpoint.CheckpointError(
            f"checkpoint {str(path)!r} has noise seed {state['noise']['seed']}, but this run's is {seed}: "
            "its theta followed other noise; put this run's checkpoint back or start a new run")


def _run_info(run_dir: Path) -> dict:
    path = run_dir / RUN_INFO_NAME
    info = rundir.read_run_info(run_dir)
    if info is None:
        raise UsageError(f"{str(path)!r} is missing or damaged, and {str(run_dir)!r} cannot be continued without "
                         "it: start the run again with --force")
    return info


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
    resolve(device, "--device", "use --device cpu (or auto)")
    theta, origin = initial_theta(config, init_from)
    record = _backprop_run(config, run_dir, force, load_data(config), BackpropSchedule(epochs, learning_rate, gradient,
                           device=device), time_budget_s, theta, origin)
    return {"run_dir": str(run_dir), **record}


def _backprop_run(config: Config, run_dir: Path, force: bool, data, schedule: BackpropSchedule,
                  time_budget_s: float | None, theta: torch.Tensor, origin: dict | None, quiet: bool = False) -> dict:
    device = resolve(schedule.device, "--device", "use --device cpu (or auto)")
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    method = "backprop" if schedule.gradient == "masked" else f"backprop ({schedule.gradient})"
    with create_run_dir(run_dir, config, None, force, method=method, device=f"local ({device}){gpu}",
                        init_from=origin, backprop=dataclasses.asdict(schedule)):
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
        record = train_backprop(config, run_dir, data, resolve(schedule.device, "--device", "use --device cpu"),
                                schedule.epochs,
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
    if path.is_dir():
        raise UsageError(f"{str(path)!r} is a directory; pass the checkpoint file itself, e.g. "
                         f"`es-service eval {path / CHECKPOINT_NAME}`")
    device = resolve(device, "--device", "use --device cpu (or auto)")
    state = checkpoint.load(path)
    config: Config = state["config"]
    set_process_arithmetic(config.network.arithmetic)
    # the checkpoint's data_dir is where it was made, maybe another machine: this machine's folder first
    data = load_data(config, data_dir or os.environ.get("ES_DATA_DIR"))
    if config.network.arithmetic == "cpu-ftz":
        device = "cpu"
    return {
        "checkpoint": str(path),
        "generation": state["generation"],
        "arithmetic": config.network.arithmetic,
        "device": device,
        **center_accuracies(state["theta"], data.eval_sets(device), config.network.arithmetic),
    }
