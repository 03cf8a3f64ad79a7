"""What ES runs and backprop runs share: their errors, data, starting theta and run directory.

A run directory (es_service/rundir.py) holds config.yaml (resolved), run.json (status, device,
timings), metrics.jsonl, checkpoint.pt and learning_curve.png. It appears whole (built in a temporary
sibling, then renamed), is never replaced without ``force``, and then only once everything that can
fail before the first generation (config, data, executor, cluster) has been built. One process at a
time writes it (its lock).
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from es_service import checkpoint, rundir
from es_service import plan as planning
from es_service.config import Config, ConfigError, shown
from es_service.data import Mnist, load_mnist
from es_service.metrics import read as read_metrics
from es_service.plot import plot_runs
from es_service.rundir import CHECKPOINT_NAME, CONFIG_NAME, LOCK_NAME, METRICS_NAME, PLOT_NAME, RUN_INFO_NAME
from es_service.stopping import Interrupted
from es_workers.evaluator import set_process_arithmetic
from es_workers.ftz_mnist import FtzMnist
from es_workers.problem import Problem

FINAL_ACCURACIES = ("train_accuracy", "test_accuracy", "validation_accuracy")  # what run.json's "final" keeps


class UsageError(RuntimeError):
    """A bad argument or path, phrased with the fix."""


class RunFailed(RuntimeError):
    """The input was fine but the run could not go on (e.g. the cluster is unreachable)."""


def load_data(config: Config, data_dir: str | None = None):
    """MNIST for a run: from ``data_dir`` or the config's, with ``validation_size`` images held out."""
    return load_mnist(data_dir or config.data_dir).hold_out(config.validation_size)


def resolve(preference: str, option: str, fix: str) -> str:
    """The device 'auto', 'cpu' or 'cuda' means here (auto: CUDA if torch sees one); a missing GPU is
    reported as the option that asked for it, with ``fix``."""
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option} is 'cuda' but torch sees no CUDA device on this machine; {fix}")
    return preference


def seed_problem(config: Config, data: Mnist) -> FtzMnist:
    """The seed's network on ``data`` as ``config`` describes it."""
    eval_sets = data.eval_sets("cpu", config.eval.train_size)
    basis = planning.layer1_basis(config, data.train_images)
    return FtzMnist(
        data.train_images, data.train_labels, config.network.arithmetic, config.workers.fused, basis, eval_sets
    )


def prepared_problem(config: Config, problem: Problem | None) -> tuple[Problem, Mnist | None]:
    """The run's problem, set up in this process: ``problem``, or the seed's network on MNIST when
    None (with the data, which a backprop warm start trains on)."""
    if problem is None:
        set_process_arithmetic(config.network.arithmetic)
        data = load_data(config)
        return seed_problem(config, data), data
    check_problem_config(config)
    problem.prepare_process()
    return problem, None


def check_problem_config(config: Config) -> None:
    """Refuse what only the seed's network has: a problem's members move every parameter, by full-rank
    noise, and its fitness is its loss."""
    es = config.es
    unsupported = [
        (es.rank != 0, "es.rank: low-rank members", "es.rank=0"),
        (es.shared_first_layer, "es.shared_first_layer", "es.shared_first_layer=false"),
        (any(members.pop_size for members in es.layers()), "layer members (es.w1, es.w2, es.w3)", "es.wL.pop_size=0"),
        (es.fitness == "accuracy", "es.fitness 'accuracy'", "es.fitness=cross_entropy (the problem's loss)"),
        (bool(config.warm_start.epochs), "warm_start: a backprop warm start", "warm_start.epochs=0"),
        (bool(config.validation_size), "validation_size", "validation_size=0 (hold data out in the problem)"),
    ]
    for wrong, what, fix in unsupported:
        if wrong:
            raise ConfigError(f"{what} exists for the seed's network only, not for a Problem of your own; set {fix}")


def initial_theta(
    config: Config, init_from: Path | None, problem: Problem | None = None
) -> tuple[torch.Tensor, dict | None]:
    """The initialisation for the config's seed (the seed's network's, or ``problem``'s), or the theta
    of the checkpoint ``init_from`` (with where it came from, for run.json). Only theta is taken: the
    new run starts its own optimizer and schedules."""
    if init_from is None:
        if problem is None:
            return planning.seed_theta(config.seed), None
        return problem.init_theta(planning.init_seed(config.seed)), None
    try:
        state = checkpoint.load(init_from) if problem is None else checkpoint.load(init_from, problem.layout)
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(f"--init-from: {err}") from None
    theta = state["theta"].clone()
    digest = hashlib.sha256(theta.numpy().tobytes()).hexdigest()
    return theta, {
        "checkpoint": str(Path(init_from).resolve()),
        "generation": state["generation"],
        "theta_sha256": digest,
    }


def check_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse, before anything is loaded, a --run-dir that cannot become this run's directory."""
    try:
        _check_run_dir(run_dir, force)
    except OSError as err:  # a name too long, a loop of links: the path cannot be looked at, let alone made
        fix = "pass a shorter path" if err.errno == errno.ENAMETOOLONG else "pass another --run-dir"
        raise UsageError(f"--run-dir {shown(str(run_dir))}: {err.strerror}; {fix}") from None


def _check_run_dir(run_dir: Path, force: bool) -> None:
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


def write_config(folder: Path, config: Config) -> None:
    rundir.atomic_write(Path(folder) / CONFIG_NAME, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())


def create_run_dir(run_dir: Path, config: Config, state: dict | None, force: bool, **info) -> rundir.Lock:
    """Build the directory in a temporary sibling and rename it into place (never half-written), replacing
    an old run when ``force``; returns its lock, held."""

    def fill(folder: Path) -> None:
        write_config(folder, config)
        rundir.write_run_info(
            folder,
            **{
                "status": "created",
                "created": time.time(),
                "torch": torch.__version__,
                "config_digest": config.digest(),
                "noise_seed": planning.noise_seed(config.seed),
                **info,
            },
        )
        if state is not None:
            checkpoint.save(state, folder / CHECKPOINT_NAME)

    return rundir.create(run_dir, fill, force)


def run_info(run_dir: Path) -> dict:
    """run.json's fields; refuses a run directory whose run.json is missing or damaged."""
    info = rundir.read_run_info(run_dir)
    if info is None:
        raise UsageError(
            f"{str(run_dir / RUN_INFO_NAME)!r} is missing or damaged, and {str(run_dir)!r} cannot be "
            "continued without it: start the run again with --force"
        )
    return info


def record_stop(run_dir: Path, err: BaseException, **fields) -> None:
    """Note in run.json that the run was interrupted or failed, and why."""
    rundir.write_run_info(
        run_dir, status="interrupted" if isinstance(err, Interrupted) else "failed", error=str(err), **fields
    )


def plot(run_dir: Path) -> None:
    """Draw the run's learning curve; a failure is a warning, never the run's."""
    try:
        plot_runs([(run_dir.name, read_metrics(run_dir / METRICS_NAME))], run_dir / PLOT_NAME)
    except Exception as err:
        # stderr: stdout carries the run's JSON summary
        print(f"es-service: warning: could not draw the learning curve: {err}", file=sys.stderr, flush=True)
