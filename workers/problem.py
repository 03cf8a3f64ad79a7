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

import numpy as np
import torch

from es_workers import noise
from es_workers.evaluator import TileResult, TileTask
from es_workers.kinds import Whole
from es_workers.network import single_threaded


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
        """What member kinds' estimates read at the center beyond the noise (es_workers.kinds.Center);
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


class WholeMembers:
    """Runs tiles of whole members (theta + sign * sigma * slice) of any ``Problem``, one member at a
    time with single-threaded ops, so a member's loss never depends on its tile mates or on the
    process's thread count (a Ray worker's differs from the driver's). Loss sums are exact (math.fsum)."""

    def __init__(self, problem: Problem, table: torch.Tensor, device: str | torch.device):
        self.problem = problem
        self.device = torch.device(device)
        self.table = table.to(self.device, dtype=torch.float32)
        self.windows = noise.windows(self.table, problem.num_params)
        self.basis = None

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
                loss_sums[j] = math.fsum(losses.reshape(-1).double().cpu().tolist())
        correct = np.zeros(len(task.offsets), dtype=np.int64)
        return TileResult(task.generation, task.tile_id, loss_sums, correct, time.perf_counter() - started)
