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
from es_service.config import WARM_START_STAGES, Config, ConfigError, WarmStartConfig, from_dict
from es_service.data import load_mnist
from es_service.driver import CHECKPOINT_NAME, Trainer, TrainState
from es_service.executors import LocalExecutor, resolve_device
from es_service.metrics import read as read_metrics
from es_service.progress import Progress
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
        write_run_info(run_dir, status="failed" if not type(err).__name__ == "Interrupted" else "interrupted",
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
    noise_seed = planning.derive_seed(config.seed, planning.STREAM_NOISE)
    from es_service.strategy import AdamES

    warm = config.warm_start.epochs > 0
    if warm:  # the directory appears first, to hold the stages; its ES checkpoint comes after them
        create_run_dir(run_dir, config, None, force, status="warm start")
        theta, origin = warm_start(config, run_dir, theta, data)
    adam = AdamES.from_config(theta, config.es)
    state = checkpoint.build(config, theta, adam.state_dict(), 0, noise_seed)
    if warm:
        checkpoint.save(state, run_dir / CHECKPOINT_NAME)
        write_run_info(run_dir, status="created", init_from=origin)
    else:
        create_run_dir(run_dir, config, state, force, init_from=origin)
    return _train(config, run_dir, TrainState(theta, None, 0), noise_seed, data, address,
                  stop_after, time_budget_s, quiet)


def warm_start(config: Config, run_dir: Path, theta: torch.Tensor, data) -> tuple[torch.Tensor, dict]:
    """``config.warm_start``'s backprop stages, each a run directory under ``run_dir/warm_start/``
    (``es-service report`` reads them); returns the last stage's theta and where it came from."""
    warm = config.warm_start
    schedules = [(warm.epochs, warm.learning_rate), (warm.finetune_epochs, warm.finetune_learning_rate)]
    device = resolve_device(config.workers.device)
    origin = None
    for name, (epochs, learning_rate) in zip(WARM_START_STAGES, schedules, strict=True):
        if not epochs:
            continue
        stage_dir = run_dir / "warm_start" / name
        _backprop_run(config, stage_dir, False, data, device, epochs, learning_rate, time_budget_s=None,
                      gradient=warm.gradient, theta=theta, origin=origin, batch_size=warm.batch_size)
        theta, origin = initial_theta(config, stage_dir / CHECKPOINT_NAME)
    return theta, origin


def resume(run_dir: Path, overrides: list[str] = (), address: str | None = None,
           stop_after: int | None = None, time_budget_s: float | None = None, quiet: bool = False) -> dict:
    path = run_dir / CHECKPOINT_NAME
    if not run_dir.is_dir():
        raise UsageError(f"run directory {str(run_dir)!r} does not exist; pass a directory made by `es-service train`")
    if not path.exists() and (run_dir / "warm_start").is_dir():
        raise UsageError(f"run {str(run_dir)!r} stopped during its warm start (backprop), before ES began: there is "
                         "nothing to resume; start it again with `es-service train ... --force`")
    state = checkpoint.load(path)
    config: Config = state["config"]
    for text in overrides:
        if not text.startswith(RESUME_OVERRIDABLE):
            raise ConfigError(
                f"--set {text!r}: resume may change only {', '.join(RESUME_OVERRIDABLE)} "
                "(other fields would change theta's path); start a new run instead"
            )
    config = from_dict(config.to_dict(), list(overrides))
    if config.digest() != state["config"].digest():
        raise ConfigError(
            "--set generations: this run's schedules (es.*_final) stretch over `generations`, so changing it "
            "would change theta's path; resume without it or start a new run"
        )
    if state["generation"] > config.generations:
        raise ConfigError(f"generations: {config.generations} is below the checkpoint's generation {state['generation']}")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    set_process_arithmetic(config.network.arithmetic)
    data = load_data(config)
    train_state = TrainState(state["theta"], state["optimizer"], state["generation"])
    return _train(config, run_dir, train_state, state["noise"]["seed"], data, address, stop_after, time_budget_s, quiet)


def backprop(config: Config, run_dir: Path, force: bool, epochs: int, learning_rate: float,
             time_budget_s: float | None, device: str, gradient: str = "masked", init_from: Path | None = None) -> dict:
    """The ablation's backprop row, in a run directory of the usual format."""
    check_run_dir(run_dir, force)
    if config.network.arithmetic == "cpu-ftz":
        raise ConfigError("network.arithmetic: backprop supports tf-ftz and linear (autograd), not cpu-ftz")
    theta, origin = initial_theta(config, init_from)
    record = _backprop_run(config, run_dir, force, load_data(config), resolve_device(device), epochs, learning_rate,
                           time_budget_s, gradient, theta, origin)
    return {"run_dir": str(run_dir), **{k: record[k] for k in ("generation", *FINAL_ACCURACIES) if k in record}}


def _backprop_run(config: Config, run_dir: Path, force: bool, data, device: str, epochs: int, learning_rate: float,
                  time_budget_s: float | None, gradient: str, theta: torch.Tensor, origin: dict | None,
                  batch_size: int = 128) -> dict:
    from es_service.backprop import train_backprop

    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    method = "backprop" if gradient == "masked" else f"backprop ({gradient})"
    create_run_dir(run_dir, config, None, force, method=method, device=f"local ({device}){gpu}", init_from=origin)
    record = train_backprop(config, run_dir, data, device, epochs, batch_size=batch_size, learning_rate=learning_rate,
                            time_budget_s=time_budget_s, gradient=gradient, theta=theta)
    write_run_info(run_dir, status="finished", generation=record["generation"],
                   final={k: record[k] for k in FINAL_ACCURACIES if k in record})
    _plot(run_dir)
    return record


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
