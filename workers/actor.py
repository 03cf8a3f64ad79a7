"""The stateless Ray worker: holds the noise table and one problem on its device, evaluates tiles.

"Stateless": it holds only caches (table, data, this generation's theta); any worker can take any
tile, and a replacement rebuilds everything from object-store refs (the table and the pickled problem). theta comes one of two ways
(``workers.theta_sync``): fetched from the object store each generation (``evaluate``), or kept as a
replica that replays each generation's update from O(P) scalars and is reloaded from a snapshot when
it joins late or drifts (``evaluate_replay``). The replica is the driver's own object (an
``es_service.replica.Replica``), handed over in the snapshot, so this module never imports the driver
side. Ray is imported inside methods so this module imports without Ray; the executor applies
``ray.remote``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from es_workers.evaluator import TileResult, TileTask
from es_workers.problem import shared_tensor


class PopulationWorker:
    """``refs``: the object-store refs of the noise table (a float32 array) and of the problem (a pickled
    es_workers.problem.Problem, whose arrays the node's workers share)."""

    def __init__(self, refs: dict, threads: int):
        import ray

        problem = ray.get(refs["problem"])
        problem.prepare_process()  # before any parallel torch op: e.g. the flush flag is per thread
        torch.set_num_threads(threads)
        table = shared_tensor(ray.get(refs["table"]))
        use_cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.device = "cuda" if use_cuda else "cpu"
        self.evaluator = problem.evaluator(table, self.device)
        self._cpu_table, self._problem = table, problem  # a replica's update runs on the CPU
        self.node_id = ray.get_runtime_context().get_node_id()
        self._generation = -1
        self._theta: torch.Tensor | None = None
        self._replica = None
        self._batch: tuple[int, np.ndarray] | None = None  # (generation, its minibatch's image indices)

    def ready(self) -> dict:
        return {"node_id": self.node_id, "device": self.device, "pid": os.getpid()}

    def _with_batch(self, batch_holder: list, task: TileTask) -> TileTask:
        """The task with its image indices, from the generation's minibatch (fetched once per generation)."""
        if task.batch_range is None:
            return task
        if self._batch is None or self._batch[0] != task.generation:
            import ray

            self._batch = (task.generation, ray.get(batch_holder[0]))
        return task.with_batch(self._batch[1])

    def evaluate(self, theta_holder: list, batch_holder: list, task: TileTask) -> TileResult:
        """``theta_holder`` and ``batch_holder`` wrap theta's and the minibatch's ObjectRefs in lists so
        Ray does not fetch them for every tile."""
        if task.generation != self._generation:
            import ray

            theta = ray.get(theta_holder[0])
            self._theta = shared_tensor(theta).to(self.evaluator.device)
            self._generation = task.generation
        return self.evaluator.run_tile(self._theta, self._with_batch(batch_holder, task))

    def evaluate_replay(self, sync_holder: list, batch_holder: list, task: TileTask) -> TileResult:
        """``sync_holder``: [the previous generation's update, a snapshot] (ObjectRefs or None, in a list
        so Ray fetches neither unless needed) and the driver's fingerprint of this generation's theta.
        A snapshot replaces the replica; else a replica one generation behind applies the update. The
        result carries the replica's fingerprint. A replica still not at the tile's generation returns
        no scores and no fingerprint; one whose fingerprint is not the driver's (it drifted) returns
        its fingerprint and no scores, which the driver would discard."""
        import ray

        update_ref, snapshot_ref, expected = sync_holder
        if snapshot_ref is not None:
            self._replica = ray.get(snapshot_ref).attach(self._cpu_table, self._problem)
            self._generation = -1
        elif update_ref is not None and self._replica is not None and self._replica.generation == task.generation - 1:
            self._replica.apply(ray.get(update_ref))
        if self._replica is None or self._replica.generation != task.generation:
            return _no_scores(task, None)
        if self._replica.fingerprint() != expected:
            return _no_scores(task, self._replica.fingerprint())
        if task.generation != self._generation:
            self._theta = self._replica.theta.to(self.evaluator.device)
            self._generation = task.generation
        result = self.evaluator.run_tile(self._theta, self._with_batch(batch_holder, task))
        return dataclasses.replace(result, fingerprint=self._replica.fingerprint())


def _no_scores(task: TileTask, fingerprint: int | None) -> TileResult:
    return TileResult(task.generation, task.tile_id, np.empty(0), np.empty(0, dtype=np.int64), fingerprint=fingerprint)
