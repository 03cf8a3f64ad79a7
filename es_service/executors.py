"""Executors run a generation's tiles and hand back per-(member, shard) results.

``LocalExecutor`` runs the evaluator in the driver's process (no Ray needed: GPU machines without Ray,
tests, debugging). ``RayExecutor`` (es_service/ray_executor.py) spreads tiles over Ray actors. Both
fill the same ``GenerationOutcome``; the driver's update never knows which one ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from es_service.plan import GenerationPlan, Tile, merge_tiles
from es_workers.evaluator import TileResult, TileTask
from es_workers.problem import Problem


@dataclass
class GenerationOutcome:
    loss_sums: np.ndarray
    """(pop_size, num_shards) float64 loss sums."""
    correct: np.ndarray
    """(pop_size, num_shards) int64 correct counts."""
    layer_results: tuple[tuple[np.ndarray, np.ndarray], ...]
    """Per layer 1, 2, 3: (loss sums, correct counts) of its layer members, shaped as above."""
    workers_alive: int = 1
    tiles_reissued: int = 0
    worker_failures: int = 0
    bytes_to_workers: int = 0
    bytes_from_workers: int = 0
    bytes_to_worker_max: int = 0
    """The most bytes any one worker was sent this generation (theta or the update, and its tiles)."""
    replica_resyncs: int = 0
    """Snapshots of theta sent to workers keeping a replica (joins, and copies that drifted)."""
    replica_mismatches: int = 0
    """Tiles evaluated on a replica whose fingerprint differed from the driver's theta: discarded, reissued."""
    compute_s: float = 0.0
    """Evaluation time summed over the tiles, as the workers measured it."""
    image_losses: tuple[np.ndarray | None, ...] = (None, None, None)
    """Per layer 1, 2, 3 with activity members: (members, batch size) float32, each image's loss (nan
    until scored); None for other layers."""
    shard_bounds: tuple[tuple[int, int], ...] = ()

    @classmethod
    def empty(cls, plan: GenerationPlan) -> GenerationOutcome:
        def results(members: int) -> tuple[np.ndarray, np.ndarray]:
            shape = (members, len(plan.shard_bounds))
            return np.full(shape, np.nan), np.zeros(shape, dtype=np.int64)

        return cls(
            *results(len(plan.member_offsets)),
            tuple(results(2 * len(offsets)) for offsets in plan.layer_offsets),
            image_losses=tuple(
                np.full((2 * len(offsets), len(plan.batch_indices)), np.nan, dtype=np.float32) if activity else None
                for offsets, activity in zip(plan.layer_offsets, (kind.per_image for kind in plan.kinds[1:]))
            ),
            shard_bounds=plan.shard_bounds,
        )

    def results(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(loss sums, correct counts) of the whole members (layer 0) or of one layer's members."""
        return (self.loss_sums, self.correct) if layer == 0 else self.layer_results[layer - 1]

    def fill(self, tile: Tile, result: TileResult) -> None:
        loss_sums, correct = self.results(tile.layer)
        loss_sums[tile.member_start : tile.member_stop, tile.shard] = result.loss_sums
        correct[tile.member_start : tile.member_stop, tile.shard] = result.correct
        if result.image_losses is not None:
            start, stop = self.shard_bounds[tile.shard]
            self.image_losses[tile.layer - 1][tile.member_start : tile.member_stop, start:stop] = result.image_losses
        self.compute_s += result.compute_s


def make_task(plan: GenerationPlan, tile: Tile, batch_by_reference: bool = False) -> TileTask:
    """The tile's task; ``batch_by_reference``: the shard's range in the minibatch instead of its image
    indices (the worker holds the generation's minibatch)."""
    members = slice(tile.member_start, tile.member_stop)
    offsets, signs = plan.members(tile.layer)
    start, stop = plan.shard_bounds[tile.shard]
    return TileTask(
        generation=plan.generation,
        tile_id=tile.tile_id,
        offsets=offsets[members],
        signs=signs[members],
        noise_std=float(plan.noise_std_of(tile.layer)),
        image_indices=np.empty(0, dtype=np.int64) if batch_by_reference else plan.batch_indices[start:stop],
        batch_range=(start, stop) if batch_by_reference else None,
        kind=plan.kinds[tile.layer],
        first=tile.member_start,
    )


class LocalExecutor:
    """The problem's evaluator, in this process: one call per shard over all its members
    (``merge_tiles``), or one per planned tile."""

    def __init__(self, problem: Problem, table: torch.Tensor, device: str = "cpu", merge_tiles: bool = True):
        self.problem = problem
        self.evaluator = problem.evaluator(table, device)
        self.device = device  # where the driver's update runs too
        self.table = self.evaluator.table  # the driver's update shares this copy (on the GPU with CUDA)
        self.merge_tiles = merge_tiles

    def run_generation(
        self, theta: torch.Tensor, plan: GenerationPlan, replica=None, last_update=None
    ) -> GenerationOutcome:
        """``replica``, ``last_update``: unused here (the evaluator shares the driver's theta)."""
        outcome = GenerationOutcome.empty(plan)
        theta = theta.to(self.evaluator.device)
        for tile in merge_tiles(plan.tiles) if self.merge_tiles else plan.tiles:
            outcome.fill(tile, self.evaluator.run_tile(theta, make_task(plan, tile)))
        return outcome

    def describe(self) -> str:
        return f"local ({self.device})"

    def close(self) -> None:
        pass
