"""A replica of theta that applies updates (es_service.strategy.Update): the same code on the driver and,
with ``workers.theta_sync: replay``, on every worker, so workers never receive theta itself.

An update is O(P) scalars; everything else the step needs (offsets, sigma, learning rate) the plan
derives from (config, generation). A ``Replica`` holds theta, Adam's state and the generation, and
steps with ``OpenES`` (its estimate and step); two replicas that apply the same updates stay bitwise equal on
one kind of CPU, and ``fingerprint`` (64 bits of theta) tells when one has not. No Ray, no I/O.
"""

from __future__ import annotations

import hashlib
import time

import torch

from es_service import plan as planning
from es_service.config import Config
from es_service.strategy import OpenES, Update
from es_workers.problem import Problem


def fingerprint(theta: torch.Tensor) -> int:
    """64 bits of theta's bytes (BLAKE2b): equal fingerprints mean, in practice, equal bits."""
    data = theta.detach().cpu().contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class Replica:
    """theta, Adam's state and the generation, stepping on ``Update``s.

    Pickles without the noise table and the problem (a worker already holds them): ``attach`` them after
    unpickling. What is pickled is a snapshot: a worker that joins late, or whose copy drifted, loads one
    and follows updates from there.
    """

    def __init__(
        self,
        config: Config,
        theta: torch.Tensor,
        generation: int,
        optimizer_state: dict | None = None,
        table: torch.Tensor | None = None,
        problem: Problem | None = None,
    ):
        self.config = config
        self.generation = generation
        self.attach(table, problem)
        self.adam = self.strategy.optimizer(theta, optimizer_state)
        self._fingerprint: int | None = None

    @property
    def theta(self) -> torch.Tensor:
        return self.adam.theta.detach()

    def attach(self, table: torch.Tensor | None, problem: Problem | None) -> Replica:
        self.table, self.strategy = table, OpenES(self.config, problem)
        return self

    def apply(self, update: Update, plan: planning.GenerationPlan | None = None) -> dict[str, float]:
        """Step on ``update`` (it must be this replica's generation's); returns the step's norm and the
        seconds of the estimate and of Adam. ``plan``: the generation's plan where the caller has it."""
        if update.generation != self.generation:
            raise ValueError(f"update of generation {update.generation} for a replica at {self.generation}")
        started = time.perf_counter()
        plan = plan or self.strategy.ask(self.generation)
        grad = self.strategy.estimate(self.table, plan, update, self.theta)
        if grad.is_cuda:
            torch.cuda.synchronize()
        estimated = time.perf_counter()
        step_norm = self.strategy.step(self.adam, grad, plan, update)
        self.generation += 1
        self._fingerprint = None
        return {"step_norm": step_norm, "grad_s": estimated - started, "adam_s": time.perf_counter() - estimated}

    def fingerprint(self) -> int:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.theta)
        return self._fingerprint

    def __getstate__(self) -> dict:
        return {
            "config": self.config,
            "generation": self.generation,
            "theta": self.theta.cpu().clone(),
            "optimizer_state": self.adam.state_dict(),
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"], state["theta"], state["generation"], state["optimizer_state"])
