"""What ES runs and backprop runs share: their errors, data, problem and starting theta.

A run directory's life (checking, creating, status, resuming) is es_service/lifecycle.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from es_service import checkpoint
from es_service import plan as planning
from es_service.config import Config, ConfigError
from es_service.data import Mnist, load_mnist
from es_workers.evaluator import set_process_arithmetic
from es_workers.ftz_mnist import FtzMnist
from es_workers.problem import Problem, checked_theta
from es_workers.problem import check as problem_check


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
    network = config.network
    return FtzMnist(
        data.train_images,
        data.train_labels,
        network.arithmetic,
        config.workers.fused,
        basis,
        eval_sets,
        network.architecture(),
    )


def prepared_problem(config: Config, problem: Problem | None) -> tuple[Problem, Mnist | None]:
    """The run's problem, set up in this process: ``problem``, or the seed's network on MNIST when
    None (with the data, which a backprop warm start trains on)."""
    if problem is None:
        set_process_arithmetic(config.network.arithmetic)
        data = load_data(config)
        return seed_problem(config, data), data
    check_problem(config, problem)
    problem.prepare_process()
    return problem, None


def check_problem(config: Config, problem: Problem) -> None:
    """Refuse a problem of one's own the config cannot run (es_workers.problem.check), and what only the
    seed's network has: a problem's members move every parameter, by full-rank noise, and its fitness
    is its loss."""
    problem_check(problem, config.noise.table_size)
    es = config.es
    unsupported = [
        (es.rank != 0, "es.rank: low-rank members", "es.rank=0"),
        (es.shared_first_layer, "es.shared_first_layer", "es.shared_first_layer=false"),
        (any(members.pop_size for members in es.layers()), "layer members (es.w1, es.w2, es.w3)", "es.wL.pop_size=0"),
        (es.fitness == "accuracy", "es.fitness 'accuracy'", "es.fitness=cross_entropy (the problem's loss)"),
        (bool(config.warm_start.epochs), "warm_start: a backprop warm start", "warm_start.epochs=0"),
        (bool(config.validation_size), "validation_size", "validation_size=0 (hold data out in the problem)"),
        (es.weight_norm_cap is not None, "es.weight_norm_cap (it caps W1, W2 and W3)", "es.weight_norm_cap=null"),
        (any(members.step_scale != 1 for members in es.layers()), "es.wL.step_scale", "es.wL.step_scale=1"),
    ]
    for wrong, what, fix in unsupported:
        if wrong:
            raise ConfigError(f"{what} exists for the seed's network only, not for a Problem of your own; set {fix}")


def initial_theta(
    config: Config, init_from: Path | None, problem: Problem | None = None
) -> tuple[torch.Tensor, dict | None]:
    """The initialisation for the config's seed (the seed's network's, or ``problem``'s), or the theta
    of the checkpoint ``init_from`` (with where it came from, for run.json). Only theta is taken: the
    new run starts its own optimizer and schedules. ``problem`` has been through prepared_problem."""
    if init_from is None:
        if problem is None:
            return planning.seed_theta(config.seed, config.network.architecture()), None
        return checked_theta(problem, planning.init_seed(config.seed)), None
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
