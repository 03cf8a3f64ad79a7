"""ES runs: train, resume and evaluate, everything between the CLI's arguments and the Trainer.

The run directory and what ES runs share with backprop runs are es_service/runs.py; a hybrid's warm
start and backprop runs are es_service/backprop_runs.py.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import time
from pathlib import Path

import torch

from es_service import checkpoint, rundir
from es_service import plan as planning
from es_service.backprop_runs import continue_backprop, warm_start
from es_service.config import Config, ConfigError, WarmStartConfig, check_fits_memory, from_dict, shown
from es_service.config import load as load_config
from es_service.driver import Trainer, TrainState
from es_service.executors import LocalExecutor
from es_service.metrics import read as read_metrics
from es_service.progress import Progress
from es_service.rundir import CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, RUN_INFO_NAME, write_run_info
from es_service.runs import (
    FINAL_ACCURACIES,
    RunFailed,
    UsageError,
    check_run_dir,
    create_run_dir,
    initial_theta,
    load_data,
    plot,
    prepared_problem,
    record_stop,
    resolve,
    run_info,
    write_config,
)
from es_service.strategy import AdamES
from es_workers import noise
from es_workers.evaluator import center_accuracies, set_process_arithmetic
from es_workers.problem import Problem

RESUME_OVERRIDABLE = ("generations", "data_dir", "workers.", "eval.", "checkpoint.")
CONNECT_TIMEOUT_S = 10.0


def default_run_dir(config_path: str | Path) -> Path:
    return Path("runs") / f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def device_description(executor) -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return f"{executor.describe()}; driver CPU {cpu} x{os.cpu_count()}" + (f"; GPU {gpu}" if gpu else "")


def check_address(address: str, source: str = "--address") -> None:
    """Refuse a cluster address ray.init would refuse only after everything is loaded (and in a traceback)."""
    if address in ("auto", "local"):  # Ray resolves these itself
        return
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if "://" in host or not (host and colon and port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(
            f"{source} {shown(address)}: expected the head's HOST:PORT (e.g. 127.0.0.1:6379), ray://HOST:PORT or auto"
        )


def _check_reachable(address: str, source: str) -> None:
    """ray.init retries an unreachable cluster for minutes; a TCP connect to it answers within seconds."""
    check_address(address, source)
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise RunFailed(
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}); check --address "
            "(or $RAY_ADDRESS) and that the cluster is up"
        ) from None


def build_executor(config: Config, problem: Problem, table: torch.Tensor, address: str | None):
    if config.workers.executor == "local":
        device = (
            "cpu"
            if config.network.arithmetic == "cpu-ftz"
            else resolve(config.workers.device, "workers.device", "use --set workers.device=cpu (or auto)")
        )
        return LocalExecutor(problem, table, device)
    import ray

    from es_service.ray_executor import RayExecutor

    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):  # a cluster (inside a Ray job RAY_ADDRESS is set)
            _check_reachable(address or os.environ["RAY_ADDRESS"], "--address" if address else "$RAY_ADDRESS")
            kwargs = {"address": address} if address else {}
        else:  # a private embedded Ray: never join some other `ray start` cluster on this machine
            kwargs = {"address": "local", "include_dashboard": False}
        ray.init(logging_level="WARNING", log_to_driver=True, **kwargs)
    autoscale = bool(address or os.environ.get("RAY_ADDRESS"))
    return RayExecutor(problem, table, config.workers, autoscale)


@contextlib.contextmanager
def started_executor(config: Config, noise_seed: int, problem: Problem, address: str | None):
    """The executor (with its noise table, and a connection to the cluster), closed on the way out."""
    check_fits_memory(config)
    executor = build_executor(config, problem, noise.make_table(noise_seed, config.noise.table_size), address)
    try:
        yield executor
    finally:
        executor.close()


def _train(
    config: Config,
    run_dir: Path,
    state: TrainState,
    noise_seed: int,
    problem: Problem,
    executor,
    stop_after: int | None,
    time_budget_s: float | None,
    quiet: bool,
) -> dict:
    trainer = None
    try:
        progress = None if quiet else Progress(config.generations, start=state.generation)
        # the driver's update shares the executor's copy of the table (on the GPU for a local CUDA executor)
        trainer = Trainer(
            config, run_dir, problem, executor.table, noise_seed, executor, state, executor.device, progress
        )
        write_run_info(run_dir, status="running", device=device_description(executor), pid=os.getpid(), error=None)
        record = trainer.run(stop_after=stop_after, time_budget_s=time_budget_s)
    except BaseException as err:
        record_stop(run_dir, err, generation=trainer.saved_generation if trainer else state.generation)
        raise
    finally:
        plot(run_dir)
    finished = trainer.generation >= config.generations
    if not any(key.endswith("_accuracy") for key in record):
        record.update(trainer.evaluate_center())
    write_run_info(
        run_dir,
        status="finished" if finished else "paused",
        generation=trainer.saved_generation,
        final={k: record[k] for k in FINAL_ACCURACIES if k in record},
        wall_s_total=sum(r["wall_s"] for r in read_metrics(run_dir / METRICS_NAME)),
    )
    return {"generation": trainer.generation, "run_dir": str(run_dir), **trainer.last_accuracy}


def train(
    config: Config,
    run_dir: Path,
    force: bool = False,
    address: str | None = None,
    stop_after: int | None = None,
    time_budget_s: float | None = None,
    quiet: bool = False,
    init_from: Path | None = None,
    problem: Problem | None = None,
) -> dict:
    """Train ``problem`` (default: the seed's network on MNIST) as ``config`` says, in ``run_dir``."""
    if address:
        check_address(address)
    check_run_dir(run_dir, force)
    if init_from is not None and config.warm_start.epochs:
        print("warm_start skipped: --init-from gives ES its starting theta", flush=True)
        config = config.model_copy(update={"warm_start": WarmStartConfig()})
    theta, origin = initial_theta(config, init_from, problem)
    problem, data = prepared_problem(config, problem)
    noise_seed = planning.noise_seed(config.seed)
    with started_executor(config, noise_seed, problem, address) as executor:
        if config.warm_start.epochs:  # the directory holds the stages; its ES checkpoint comes after them
            with create_run_dir(run_dir, config, None, force, status="warm start"):
                return _warm_start_then_train(
                    config, run_dir, data, problem, executor, stop_after, time_budget_s, quiet
                )
        with create_run_dir(run_dir, config, _es_start(config, theta, problem), force, init_from=origin):
            state = TrainState(theta, None, 0)
            return _train(config, run_dir, state, noise_seed, problem, executor, stop_after, time_budget_s, quiet)


def _es_start(config: Config, theta: torch.Tensor, problem: Problem) -> dict:
    """The checkpoint of generation 0: theta and a fresh Adam."""
    adam = AdamES.from_config(theta, config.es)
    return checkpoint.build(config, theta, adam.state_dict(), 0, planning.noise_seed(config.seed), problem.layout)


def _warm_start_then_train(
    config: Config,
    run_dir: Path,
    data,
    problem: Problem,
    executor,
    stop_after: int | None,
    time_budget_s: float | None,
    quiet: bool,
) -> dict:
    try:
        theta, origin = warm_start(config, run_dir, data, quiet)
        checkpoint.save(_es_start(config, theta, problem), run_dir / CHECKPOINT_NAME)
    except BaseException as err:
        record_stop(run_dir, err)
        raise
    write_run_info(run_dir, status="created", init_from=origin, error=None)
    state = TrainState(theta, None, 0)
    return _train(
        config, run_dir, state, planning.noise_seed(config.seed), problem, executor, stop_after, time_budget_s, quiet
    )


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


def resume(
    run_dir: Path,
    overrides: list[str] = (),
    address: str | None = None,
    stop_after: int | None = None,
    time_budget_s: float | None = None,
    quiet: bool = False,
    problem: Problem | None = None,
) -> dict:
    """Continue a run where it stopped: an ES run from its checkpoint, a hybrid still in its warm start
    from its stage's last epoch, a backprop run from its last epoch. ``problem``: the one the run
    trained, when not the seed's network."""
    if not run_dir.is_dir():
        raise UsageError(f"run directory {str(run_dir)!r} does not exist; pass a directory made by `es-service train`")
    if address:
        check_address(address)
    with rundir.Lock(run_dir):
        return _resume(run_dir, list(overrides), address, stop_after, time_budget_s, quiet, problem)


def _resume(
    run_dir: Path,
    overrides: list[str],
    address: str | None,
    stop_after: int | None,
    time_budget_s: float | None,
    quiet: bool,
    problem: Problem | None,
) -> dict:
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
    elif info is None and not (run_dir / "warm_start").is_dir():
        info = run_info(run_dir)  # raises, naming what is wrong
    if (info or {}).get("method", "es").startswith("backprop"):
        if stop_after is not None:
            raise UsageError(
                "--stop-after counts ES generations; a backprop run resumes to its --epochs "
                "(--time-budget stops it sooner)"
            )
        config = _resume_config(load_config(run_dir / CONFIG_NAME), overrides)
        record = continue_backprop(config, run_dir, load_data(config), time_budget_s, quiet)
        return {"run_dir": str(run_dir), **record}
    if not path.exists() and (run_dir / "warm_start").is_dir():  # stopped in its warm start, before ES began
        config = _resume_config(load_config(run_dir / CONFIG_NAME), overrides)
        problem, data = prepared_problem(config, problem)
        with started_executor(config, planning.noise_seed(config.seed), problem, address) as executor:
            return _warm_start_then_train(config, run_dir, data, problem, executor, stop_after, time_budget_s, quiet)
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
    problem, _ = prepared_problem(config, problem)
    noise_seed = state["noise"]["seed"]
    with started_executor(config, noise_seed, problem, address) as executor:
        write_config(run_dir, config)
        if not info:
            write_run_info(run_dir, config_digest=config.digest(), noise_seed=noise_seed)
        train_state = TrainState(state["theta"], state["optimizer"], state["generation"])
        return _train(config, run_dir, train_state, noise_seed, problem, executor, stop_after, time_budget_s, quiet)


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


def evaluate_checkpoint(path: Path, data_dir: str | None = None, device: str = "auto") -> dict:
    if path.is_dir():
        raise UsageError(
            f"{str(path)!r} is a directory; pass the checkpoint file itself, e.g. "
            f"`es-service eval {path / CHECKPOINT_NAME}`"
        )
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
