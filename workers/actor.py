"""The stateless Ray worker: caches the noise table and MNIST on its device, evaluates tiles.

"Stateless": it holds only caches (table, data, this generation's theta); any worker can take any
tile, and a replacement rebuilds everything from object-store refs. Ray is imported inside methods so
this module imports without Ray; the executor applies ``ray.remote``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from workers.evaluator import PopulationEvaluator, TileResult, TileTask, run_tile, set_process_arithmetic


def _tensor(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # object-store arrays are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class PopulationWorker:
    def __init__(self, refs: dict, arithmetic: str, threads: int, fused: bool = False):
        set_process_arithmetic(arithmetic)  # before any parallel torch op: the flag is per thread
        torch.set_num_threads(threads)
        import ray

        table, images, labels = ray.get([refs["table"], refs["images"], refs["labels"]])
        use_cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.device = "cuda" if use_cuda else "cpu"
        basis = _tensor(ray.get(refs["basis"])) if "basis" in refs else None
        self.evaluator = PopulationEvaluator(
            _tensor(table), _tensor(images), _tensor(labels), arithmetic, self.device, fused, basis=basis
        )
        self.node_id = ray.get_runtime_context().get_node_id()
        self._generation = -1
        self._theta: torch.Tensor | None = None

    def ready(self) -> dict:
        return {"node_id": self.node_id, "device": self.device, "pid": os.getpid()}

    def evaluate(self, theta_holder: list, task: TileTask) -> TileResult:
        """``theta_holder`` wraps theta's ObjectRef in a list so Ray does not fetch it per tile."""
        if task.generation != self._generation:
            import ray

            theta = ray.get(theta_holder[0])
            self._theta = _tensor(theta).to(self.evaluator.device)
            self._generation = task.generation
        return run_tile(self.evaluator, self._theta, task)
