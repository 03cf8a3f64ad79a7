"""The ES driver: one generation = plan -> dispatch/collect (executor) -> update -> record.

Keeps the central theta and torch's Adam on the driver (Salimans et al. 2017; RLlib ES's loop). The
executor returns only per-member scalars; the update reads the noise slices from the driver's own copy
of the table. Fitness is maximised (see strategy.py for the sign convention).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from es_service import checkpoint
from es_service import plan as planning
from es_service.config import Config
from es_service.metrics import MetricsLog
from es_service.replica import Replica
from es_service.rundir import CHECKPOINT_NAME
from es_service.stopping import Interrupted, StopSignals
from es_service.strategy import OpenES
from es_workers import layer_members, noise
from es_workers.problem import Problem


class Diverged(RuntimeError):
    """theta turned inf or nan; the last finite checkpoint stays."""


@dataclass
class TrainState:
    theta: torch.Tensor
    optimizer_state: dict | None
    generation: int


class Trainer:
    def __init__(
        self,
        config: Config,
        run_dir: Path,
        problem: Problem,
        table: torch.Tensor,
        noise_seed: int,
        executor,
        state: TrainState,
        device: str = "cpu",
        progress=None,
    ):
        """``table``: the driver's copy of the noise table, on ``device``, where the update runs."""
        self.config = config
        self.run_dir = Path(run_dir)
        self.problem = problem
        self.noise_seed = noise_seed
        self.executor = executor
        self.progress = progress
        self.saved_generation = state.generation  # the checkpoint on disk: run.json never claims more
        self.strategy = OpenES(config, problem)
        self.replica = Replica(config, state.theta.to(device), state.generation, state.optimizer_state, table, problem)
        self.last_update = None
        """The previous generation's update, which workers that keep a replica of theta replay."""
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.metrics.truncate_after(self.generation)
        self.last_accuracy: dict[str, float] = {}

    @classmethod
    def in_process(
        cls, config: Config, run_dir: Path, problem: Problem, state: TrainState | None = None, merge_tiles: bool = True
    ) -> Trainer:
        """A trainer with this process's executor on the CPU (``merge_tiles``: one call per shard), from
        the config's initialisation unless ``state``: for tests, benchmarks and notebooks."""
        from es_service.executors import LocalExecutor

        noise_seed = planning.noise_seed(config.seed)
        executor = LocalExecutor(
            problem, noise.make_table(noise_seed, config.noise.table_size), merge_tiles=merge_tiles
        )
        state = state or TrainState(problem.init_theta(planning.init_seed(config.seed)), None, 0)
        return cls(config, run_dir, problem, executor.table, noise_seed, executor, state)

    @property
    def theta(self) -> torch.Tensor:
        return self.replica.theta

    @property
    def generation(self) -> int:
        """Generations done: theta is the start of this one."""
        return self.replica.generation

    def checkpoint(self) -> None:
        state = checkpoint.build(
            self.config,
            self.theta,
            self.replica.adam.state_dict(),
            self.generation,
            self.noise_seed,
            self.problem.layout,
        )
        checkpoint.save(state, self.run_dir / CHECKPOINT_NAME)
        self.saved_generation = self.generation

    def evaluate_center(self) -> dict[str, float]:
        self.last_accuracy = self.problem.metrics(self.theta)
        return self.last_accuracy

    def step(self, evaluate: bool = False) -> dict:
        """Run one generation; returns its metrics record (with the center's accuracy when
        ``evaluate``, every eval.every generations, and at the last generation)."""
        started = time.perf_counter()
        plan = self.strategy.ask(self.generation)
        planned = time.perf_counter()
        outcome = self.executor.run_generation(self.theta, plan, self.replica, self.last_update)
        evaluated = time.perf_counter()
        # no member scored: the update is skipped, since Adam's momentum would still move theta
        update, fitness = self.strategy.tell(plan, outcome)
        applied = self.replica.apply(update, plan)
        self.last_update = update
        self._check_finite(plan)
        finite = np.isfinite(fitness)
        correct = np.concatenate([outcome.results(layer)[1] for layer in (0, *layer_members.LAYERS)])
        batch_accuracy = correct.sum(axis=1) / len(plan.batch_indices)
        record = {
            "generation": self.generation,
            "wall_s": time.perf_counter() - started,
            "plan_s": planned - started,
            "eval_s": evaluated - planned,
            "worker_compute_s": outcome.compute_s,
            "grad_s": applied["grad_s"],
            "adam_s": applied["adam_s"],
            "fitness_max": float(fitness[finite].max()) if finite.any() else None,
            "fitness_mean": float(fitness[finite].mean()) if finite.any() else None,
            "fitness_min": float(fitness[finite].min()) if finite.any() else None,
            "batch_accuracy_mean": float(batch_accuracy.mean()) if self.problem.counts_correct else None,
            "batch_size": len(plan.batch_indices),
            "noise_std": plan.noise_std,
            "learning_rate": plan.learning_rate,
            "step_norm": applied["step_norm"],
            "theta_norm": float(torch.linalg.vector_norm(self.theta)),
            "nonfinite": int((~finite).sum()),
            "step_skipped": update.skipped,
            "workers_alive": outcome.workers_alive,
            "tiles_reissued": outcome.tiles_reissued,
            "worker_failures": outcome.worker_failures,
            "bytes_to_workers": outcome.bytes_to_workers,
            "bytes_from_workers": outcome.bytes_from_workers,
            "bytes_to_worker_max": outcome.bytes_to_worker_max,
            "replica_resyncs": outcome.replica_resyncs,
            "replica_mismatches": outcome.replica_mismatches,
        }
        if evaluate or self.generation % self.config.eval.every == 0 or self.generation == self.config.generations:
            record.update(self.evaluate_center())
        record["time"] = time.time()
        return record

    def _check_finite(self, plan) -> None:
        if not bool(torch.isfinite(self.theta).all()):
            raise Diverged(
                f"theta has inf or nan after generation {self.generation} (sigma {plan.noise_std:g}, learning "
                f"rate {plan.learning_rate:g}): too small a sigma or too large a learning rate (or weight decay); "
                f"the checkpoint of generation {self.saved_generation} is kept: start a new run with other values"
            )

    def run(self, stop_after: int | None = None, time_budget_s: float | None = None) -> dict:
        """Train to config.generations (or stop_after more generations, or the time budget)."""
        started = time.monotonic()
        last_record: dict = {}
        target = self.config.generations
        if stop_after is not None:
            target = min(target, self.generation + stop_after)
        with StopSignals() as stop:
            try:
                while self.generation < target:
                    elapsed = time.monotonic() - started
                    out_of_time = (
                        time_budget_s is not None and elapsed + last_record.get("wall_s", 0.0) >= time_budget_s
                    )
                    last = out_of_time or self.generation + 1 >= target
                    last_record = self.step(evaluate=last)
                    self.metrics.append(last_record)
                    if self.progress:
                        self.progress.update(last_record, self.last_accuracy)
                    if self.generation % self.config.checkpoint.every == 0 or stop.signum is not None:
                        self.checkpoint()
                    stop.raise_if_stopped(f"at generation {self.generation}; checkpoint written")
                    if out_of_time:
                        break
                self.checkpoint()
            except (Interrupted, Diverged):
                raise
            except Exception:
                self.checkpoint()  # theta only changes at a generation's end, so this state is consistent
                raise
            finally:
                self.metrics.close()
        return last_record
