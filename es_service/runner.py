"""ES runs: train, resume and evaluate, everything between the CLI's arguments and the Trainer.

A run directory's life (checking, creating, status, how it resumes) is es_service/lifecycle.py; what
ES runs share with backprop runs (data, problem, first theta) es_service/runs.py; a hybrid's warm start
and backprop runs es_service/backprop_runs.py.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import time
from pathlib import Path

import torch

from es_service import checkpoint, lifecycle
from es_service import plan as planning
from es_service.backprop_runs import continue_backprop, warm_start
from es_service.config import Config, WarmStartConfig, check_fits_memory, shown
from es_service.driver import Trainer, TrainState
from es_service.executors import LocalExecutor
from es_service.lifecycle import Run
from es_service.problems import name_of
from es_service.progress import Progress
from es_service.rundir import CHECKPOINT_NAME
from es_service.runs import RunFailed, UsageError, initial_theta, load_data, prepared_problem, resolve
from es_service.strategy import AdamES
from es_workers import noise
from es_workers.evaluator import center_accuracies, set_process_arithmetic
from es_workers.problem import Problem

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
    from es_service.ray_executor import RayExecutor

    return RayExecutor(problem, table, config.workers, autoscale=cluster_address(address) is not None)


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster to join: --address, else $RAY_ADDRESS (as inside a Ray job); None for an embedded Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def connected_ray(address: str | None):
    """Ray, up for as long as the block runs: a cluster's address (--address, or $RAY_ADDRESS as inside
    a Ray job), else a private embedded Ray. One this opened is shut down on the way out, before the
    caller prints its last line: an embedded Ray's raylet streams its warnings to this process until
    then. A Ray the caller had already started is left as it was."""
    import ray

    if ray.is_initialized():
        yield
        return
    if cluster := cluster_address(address):
        _check_reachable(cluster, "--address" if address else "$RAY_ADDRESS")
        kwargs = {"address": address} if address else {}
    else:  # never join some other `ray start` cluster on this machine
        kwargs = {"address": "local", "include_dashboard": False}
    ray.init(logging_level="WARNING", log_to_driver=True, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def started_executor(config: Config, noise_seed: int, problem: Problem, address: str | None):
    """The executor (with its noise table, and a connection to the cluster), closed on the way out."""
    check_fits_memory(config)
    table = noise.make_table(noise_seed, config.noise.table_size)
    with contextlib.ExitStack() as stack:
        if config.workers.executor == "ray":
            stack.enter_context(connected_ray(address))
        executor = build_executor(config, problem, table, address)
        stack.callback(executor.close)
        yield executor


def _train(
    run: Run,
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
        progress = None if quiet else Progress(run.config.generations, start=state.generation)
        # the driver's update shares the executor's copy of the table (on the GPU for a local CUDA executor)
        trainer = Trainer(
            run.config, run.path, problem, executor.table, noise_seed, executor, state, executor.device, progress
        )
        run.started(device=device_description(executor))
        record = trainer.run(stop_after=stop_after, time_budget_s=time_budget_s)
    except BaseException as err:
        run.stopped(err, generation=trainer.saved_generation if trainer else state.generation)
        raise
    finally:
        run.plot()
    finished = trainer.generation >= run.config.generations
    if not any(key.endswith("_accuracy") for key in record):
        record.update(trainer.evaluate_center())
    run.record(
        status="finished" if finished else "paused",
        generation=trainer.saved_generation,
        final=lifecycle.final_accuracies(record),
        wall_s_total=run.wall_s_total(),
    )
    return {"generation": trainer.generation, "run_dir": str(run.path), **trainer.last_accuracy}


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
    lifecycle.check_new(run_dir, force)
    if init_from is not None and config.warm_start.epochs:
        print("warm_start skipped: --init-from gives ES its starting theta", flush=True)
        config = config.model_copy(update={"warm_start": WarmStartConfig()})
    own = problem  # None: the seed's network on MNIST
    problem, data = prepared_problem(config, own)  # checks a problem of one's own against the config
    theta, origin = initial_theta(config, init_from, own)
    named = {} if own is None else {"problem": name_of(own)}  # what resume builds again
    run, noise_seed = Run(run_dir, config), planning.noise_seed(config.seed)
    with started_executor(config, noise_seed, problem, address) as executor:
        if config.warm_start.epochs:  # the directory holds the stages; its ES checkpoint comes after them
            with run.create(force, status="warm start"):
                return _warm_start_then_train(run, data, problem, executor, stop_after, time_budget_s, quiet)
        with run.create(force, _es_start(config, theta, problem), init_from=origin, **named):
            state = TrainState(theta, None, 0)
            return _train(run, state, noise_seed, problem, executor, stop_after, time_budget_s, quiet)


def _es_start(config: Config, theta: torch.Tensor, problem: Problem) -> dict:
    """The checkpoint of generation 0: theta and a fresh Adam."""
    adam = AdamES.from_config(theta, config.es)
    return checkpoint.build(config, theta, adam.state_dict(), 0, planning.noise_seed(config.seed), problem.layout)


def _warm_start_then_train(
    run: Run, data, problem: Problem, executor, stop_after: int | None, time_budget_s: float | None, quiet: bool
) -> dict:
    try:
        theta, origin = warm_start(run, data, quiet)
        checkpoint.save(_es_start(run.config, theta, problem), run.checkpoint)
    except BaseException as err:
        run.stopped(err)
        raise
    run.record(status="created", init_from=origin, error=None)
    state = TrainState(theta, None, 0)
    noise_seed = planning.noise_seed(run.config.seed)
    return _train(run, state, noise_seed, problem, executor, stop_after, time_budget_s, quiet)


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
    lifecycle.check_exists(run_dir)
    if address:
        check_address(address)
    with lifecycle.lock(run_dir):
        how = lifecycle.resumption(run_dir, list(overrides), stop_after, problem)
        run, config = how.run, how.run.config
        if how.kind == "backprop":
            return {"run_dir": str(run_dir), **continue_backprop(run, load_data(config), time_budget_s, quiet)}
        problem, data = prepared_problem(config, problem)
        if how.kind == "warm start":
            with started_executor(config, planning.noise_seed(config.seed), problem, address) as executor:
                return _warm_start_then_train(run, data, problem, executor, stop_after, time_budget_s, quiet)
        noise_seed = how.state["noise"]["seed"]
        with started_executor(config, noise_seed, problem, address) as executor:
            run.resumed(noise_seed, how.info_lost)
            state = TrainState(how.state["theta"], how.state["optimizer"], how.state["generation"])
            return _train(run, state, noise_seed, problem, executor, stop_after, time_budget_s, quiet)


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
        **center_accuracies(
            state["theta"], data.eval_sets(device), config.network.arithmetic, arch=config.network.architecture()
        ),
    }
