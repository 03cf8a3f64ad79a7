"""What a population is evaluated on: the ``Problem`` interface, and the evaluator of whole members.

A problem is a flat float32 parameter vector theta, an initialisation per seed, and a loss per training
example. The service owns everything else: the noise table, the plan of a generation, the executors
(in-process or Ray actors), the update, checkpoints and resume. The seed's network is one problem
(es_workers.ftz_mnist); a user's own is a subclass of ``Problem`` (the repository's examples/ has one).

A problem travels to Ray workers by pickling (once, through the object store): keep its data in
tensors or numpy arrays, and build device copies lazily. No Ray and no I/O here.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch

from es_workers import noise
from es_workers.evaluator import TileResult, TileTask
from es_workers.kinds import Whole
from es_workers.network import single_threaded


def shared_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor over ``value`` without a copy: object-store arrays are read-only, and nothing here writes
    to them (torch's warning about that is silenced)."""
    if isinstance(value, torch.Tensor):
        return value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(value)


class ProblemError(ValueError):
    """A problem the service cannot run, with what is wrong and what to do."""


class Problem:
    """A fitness to maximise: minus the mean loss over a minibatch of training examples.

    Subclasses set ``num_params`` and ``num_examples`` and implement ``init_theta`` and ``losses``;
    ``metrics`` (what is logged of the center theta) is optional. The members of a generation are
    antithetic (or plain) Gaussian moves of every parameter, read from the shared noise table.
    """

    num_params: int
    """Length of theta."""
    num_examples: int
    """Training examples: each generation's minibatch is drawn from indices 0 .. num_examples - 1."""
    counts_correct: bool = False
    """Its evaluator counts each member's correct predictions (the seed's network does); without them
    a generation's record has no batch accuracy."""

    def init_theta(self, seed: int) -> torch.Tensor:
        """theta at generation 0 for a 63-bit ``seed``: (num_params,) float32 on the CPU."""
        raise NotImplementedError

    def losses(self, params: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(n, B) losses of n parameter vectors ``params`` (n, num_params) on the training examples
        ``indices`` (B,), on ``params``'s device. A member's row must not depend on the other rows
        (the service evaluates a member alone, or with others, and expects the same bits)."""
        raise NotImplementedError

    def metrics(self, theta: torch.Tensor) -> dict[str, float]:
        """What is logged of the center theta every eval.every generations (e.g. a test accuracy)."""
        return {}

    def center(self, theta: torch.Tensor, batch_indices: np.ndarray):
        """What member kinds' estimates read at the center beyond the noise (es_workers.layer_members.Center);
        whole members read nothing."""
        return None

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """theta's named blocks, which checkpoints record and check on loading."""
        return [("theta", (self.num_params,))]

    def prepare_process(self) -> None:
        """Process-wide state, set before the first parallel torch op of a process that evaluates."""

    def evaluator(self, table: torch.Tensor, device: str, threads: int | None = None) -> WholeMembers:
        """What runs tiles of this problem's members on ``device``."""
        return WholeMembers(self, table, device)


def check(problem: Problem, table_size: int) -> None:
    """Refuse, before anything runs, a problem whose sizes the service cannot use."""
    name = type(problem).__name__
    for field in ("num_params", "num_examples"):
        value = getattr(problem, field, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProblemError(f"{name}.{field} is {value!r}; set it to a positive integer")
    if table_size <= problem.num_params:
        raise ProblemError(
            f"noise.table_size {table_size} is not larger than {name}'s {problem.num_params} parameters; "
            f"set noise.table_size to at least {2 * problem.num_params} (a slice of theta's length starts anywhere in it)"
        )


def checked_theta(problem: Problem, seed: int) -> torch.Tensor:
    """``problem.init_theta(seed)``, refused unless a finite float32 vector of num_params entries."""
    theta = problem.init_theta(seed)
    expected = (problem.num_params,)
    if not isinstance(theta, torch.Tensor) or theta.dtype != torch.float32 or tuple(theta.shape) != expected:
        got = f"{theta.dtype} {tuple(theta.shape)}" if isinstance(theta, torch.Tensor) else type(theta).__name__
        raise ProblemError(
            f"{type(problem).__name__}.init_theta returned {got}; return a float32 tensor of shape {expected}"
        )
    if not bool(torch.isfinite(theta).all()):
        raise ProblemError(f"{type(problem).__name__}.init_theta returned inf or nan; return finite values")
    return theta.detach().cpu()


class WholeMembers:
    """Runs tiles of whole members (theta + sign * sigma * slice) of any ``Problem``, one member at a
    time with single-threaded ops, so a member's loss never depends on its tile mates or on the
    process's thread count (a Ray worker's differs from the driver's). Loss sums are exact (math.fsum)."""

    def __init__(self, problem: Problem, table: torch.Tensor, device: str | torch.device):
        self.problem = problem
        self.device = torch.device(device)
        self.table = table.to(self.device, dtype=torch.float32)
        self.windows = noise.windows(self.table, problem.num_params)

    def run_tile(self, theta: torch.Tensor, task: TileTask) -> TileResult:
        if type(task.kind) is not Whole:
            raise ValueError(f"a Problem's members move every parameter by full-rank noise, not {task.kind}")
        started = time.perf_counter()
        theta = theta.to(self.device)
        indices = torch.as_tensor(task.image_indices).to(self.device)
        loss_sums = np.empty(len(task.offsets), dtype=np.float64)
        with torch.no_grad(), single_threaded():  # a member's bits must not depend on the thread count
            for j, (offset, sign) in enumerate(zip(task.offsets, task.signs)):
                scale = torch.tensor(float(sign) * task.noise_std, device=self.device)
                params = theta + scale * self.windows[int(offset)]
                losses = self.problem.losses(params.unsqueeze(0), indices)
                if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (1, len(indices)):
                    shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                    raise ProblemError(
                        f"{type(self.problem).__name__}.losses returned {shape} for 1 member on {len(indices)} "
                        f"examples; return a tensor of shape (members, examples), one loss per example"
                    )
                loss_sums[j] = math.fsum(losses.reshape(-1).double().cpu().tolist())
        correct = np.zeros(len(task.offsets), dtype=np.int64)
        return TileResult(task.generation, task.tile_id, loss_sums, correct, time.perf_counter() - started)
