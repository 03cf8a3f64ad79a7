"""Evaluate a tile of population members on a shard of MNIST, from noise-table offsets.

Plain torch, no Ray: the same object runs inside a Ray actor, in the driver's process (``--executor
local``), on a GPU machine without Ray, and in unit tests. Perturbed weights are built on the
evaluator's device from its cached noise table (low-rank members, ``rank`` >= 1, never build them:
see members.low_rank_forward); only scalars go back.

A member's results never depend on which other members share its tile, nor on the thread count: on
CPU each member runs with single-threaded ops (small intermediates stay in cache; docs/performance.md), one
member per thread; on CUDA a tile runs as batched matmuls. Loss sums
use exact summation (math.fsum), so a shard's sum does not depend on reduction order either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from es_workers import layer_members, members, network, noise
from es_workers.architecture import Architecture

if TYPE_CHECKING:
    from es_workers.kinds import Kind


def set_process_arithmetic(arithmetic: str) -> None:
    """Process-wide float state for a mode. Call before the first parallel torch op of the process:
    the CPU flush flag is per thread and torch's thread pool keeps the state it was created with."""
    if arithmetic == "cpu-ftz" and not torch.set_flush_denormal(True):
        raise RuntimeError("cpu-ftz: this CPU does not support flush-denormal (needs SSE3); use tf-ftz")


class PopulationEvaluator:
    """Holds the noise table and MNIST on one device; evaluates members given only offsets and signs.

    ``fused`` compiles each layer's elementwise epilogue into one kernel (bitwise equal to eager,
    see network.Epilogues). On CUDA a tile runs as batched matmuls in chunks sized from free memory.
    """

    def __init__(
        self,
        table: torch.Tensor,
        images: torch.Tensor,
        labels: torch.Tensor,
        arithmetic: str,
        device: str | torch.device = "cpu",
        fused: bool = False,
        memory_fraction: float = 0.6,
        batched: bool | None = None,
        threads: int | None = None,
        basis: torch.Tensor | None = None,
        arch: Architecture = network.SEED,
    ):
        self.device = torch.device(device)
        self.arch = arch
        if arithmetic == "cpu-ftz" and self.device.type != "cpu":
            raise ValueError("cpu-ftz is CPU only: torch.set_flush_denormal does nothing on CUDA; use tf-ftz")
        if arithmetic not in ("tf-ftz", "linear", "cpu-ftz"):
            raise ValueError(f"unknown arithmetic {arithmetic!r}; allowed: tf-ftz, linear, cpu-ftz")
        self.arithmetic = arithmetic
        self.fused = fused and arithmetic != "cpu-ftz"
        self.memory_fraction = memory_fraction
        self.batched = self.device.type != "cpu" if batched is None else batched
        self.table = table.to(self.device, dtype=torch.float32)
        self.windows = noise.windows(self.table, arch.num_params)
        self.images = images.reshape(-1, arch.inputs).to(self.device, dtype=torch.uint8)
        self.labels = labels.to(self.device, dtype=torch.int64)
        # CPU members run one per thread, each with single-threaded ops: MKL's result for one matmul
        # changes with its thread count, a member's must not (Ray workers and --executor local differ)
        self.threads = max(1, threads or torch.get_num_threads())
        self._pool: ThreadPoolExecutor | None = None
        self._compiled_for: set[tuple[int, ...]] = set()
        self._kept: dict[str, tuple] = {}  # name -> (theta, key, value): see _kept_for
        self.basis = None if basis is None else basis.to(self.device, dtype=torch.float32)
        """(784, k) principal components of the training images: layer-1 members' input subspace, and
        (its first columns) what layer-2 unit members' subspace is built from (``hidden_basis``)."""

    def run_tile(self, theta: torch.Tensor, task: TileTask) -> TileResult:
        """The tile's results: its member kind's evaluation on its shard."""
        if task.kind.arch != self.arch:
            raise ValueError(f"a tile of {task.kind.arch} for an evaluator of {self.arch}")
        started = time.perf_counter()
        results = task.kind.evaluate(
            self, theta, task.offsets, task.signs, task.noise_std, task.image_indices, task.first
        )
        image_losses = results[2] if task.kind.per_image else None
        elapsed = time.perf_counter() - started
        return TileResult(task.generation, task.tile_id, *results[:2], elapsed, image_losses=image_losses)

    def batch(self, image_indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(np.asarray(image_indices, dtype=np.int64)).to(self.device)
        return self.images.index_select(0, index).float() / 255.0, self.labels.index_select(0, index)

    def perturbed(self, theta: torch.Tensor, offsets: np.ndarray, scales: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(n, P - start) perturbed parameters for the batched path: theta + (sign * sigma) * slice
        from parameter ``start`` on, rounded in that order (as ``members.perturb``), built on this device
        from the cached table; fused, in one pass (gather, scale and add in one kernel)."""
        index = torch.as_tensor(np.asarray(offsets, dtype=np.int64)).to(self.device)
        table, theta = self.table[start:], theta[start:]
        if self.fused:
            return members.perturb_rows_fused(table, index, scales, theta)
        return noise.slices(table, index, theta.shape[0]).mul_(scales.unsqueeze(1)).add_(theta)

    def chunk_size(self, batch_size: int, rank: int = 0) -> int:
        """Members per batched pass, from the device's free memory (CUDA) or a fixed 64 (CPU)."""
        if self.device.type != "cuda":
            return 64
        free, _ = torch.cuda.mem_get_info(self.device)
        inputs, outputs, hidden = self.arch.inputs, self.arch.outputs, max(self.arch.layer_sizes[1:3])
        if rank:  # no per-member weights: the noise rows and ~6 hidden activations per image
            per_member = 4 * (
                members.noise_length(rank, self.arch) + batch_size * (6 * hidden + 2 * outputs + 3 * rank)
            )
        else:  # x may be expanded per member
            per_member = 4 * (self.arch.num_params + batch_size * (inputs + 4 * hidden + 2 * outputs))
        return max(1, int(free * self.memory_fraction // per_member))

    def logits(self, theta: torch.Tensor, offsets: np.ndarray, scales: torch.Tensor, x: torch.Tensor):
        """(n, B, 10) logits of n members from batched matmuls."""
        params = network.unflatten(self.perturbed(theta, offsets, scales), arch=self.arch)
        return network.forward(x, params, self.arithmetic, self.fused, self.arch)

    def member_logits(self, theta: torch.Tensor, offset: int, scale: torch.Tensor, x: torch.Tensor):
        """(B, 10) logits of one member from plain matmuls, its weights read straight from the table."""
        return members.member_forward(x, theta, self.windows[offset], scale, self.arithmetic, self.fused, self.arch)

    def shared_xw1(self, theta: torch.Tensor, x: torch.Tensor, image_indices: np.ndarray) -> torch.Tensor:
        """x @ W1, which every low-rank or shared-first-layer member on these images shares."""
        return self.kept_for(
            "xw1", theta, images_key(x, image_indices), lambda: torch.mm(x, network.unflatten(theta, arch=self.arch)[0])
        )

    def hidden_basis(self, theta: torch.Tensor, subspace: int) -> torch.Tensor:
        """layer_members.hidden_basis of theta's W1: what layer-2 unit members in a subspace share."""
        return self.kept_for(
            "hidden_basis",
            theta,
            subspace,
            lambda: layer_members.hidden_basis(network.unflatten(theta, arch=self.arch)[0], self.basis, subspace),
        )

    def center(self, theta: torch.Tensor, x: torch.Tensor, image_indices: np.ndarray) -> tuple:
        """The unperturbed network's products on these images, which layer members share (scaled frame):
        x W1, h1, z2 = h1 W2, h2 and z3 = h2 W3; kept like ``shared_xw1``."""

        def compute():
            _, b1, w2, b2, w3, _ = network.unflatten(theta, arch=self.arch)
            ops = network.epilogues(self.arithmetic, self.fused, self.arch)
            xw1 = self.shared_xw1(theta, x, image_indices)
            h1 = ops.hidden1(xw1, b1)
            z2 = torch.mm(h1, w2)
            h2 = ops.hidden2(z2, b2)
            return xw1, h1, z2, h2, torch.mm(h2, w3)

        return self.kept_for("center", theta, images_key(x, image_indices), compute)

    def kept_for(self, name: str, theta: torch.Tensor, key, compute):
        """``compute()``, kept for the next tile while the same theta object, unmodified (its version
        counter), comes with the same key: a generation's later tiles on this worker reuse it. The same
        ops on the same inputs either way, so no bit depends on the reuse."""
        key = (theta._version, key)
        kept = self._kept.get(name)
        if kept is not None and kept[0] is theta and kept[1] == key:
            return kept[2]
        with network.single_threaded() if not self.batched else contextlib.nullcontext():
            value = compute()
        self._kept[name] = (theta, key, value)
        return value

    def inputs(self, theta: torch.Tensor, signs: np.ndarray, noise_std: float, image_indices: np.ndarray):
        """theta, the images x, labels y and each member's sign * sigma, on this device."""
        theta = theta.to(self.device, dtype=torch.float32)
        if theta.shape != (self.arch.num_params,):
            raise ValueError(f"theta must have shape ({self.arch.num_params},), got {tuple(theta.shape)}")
        x, y = self.batch(image_indices)
        scales = torch.as_tensor(np.asarray(signs, dtype=np.float32) * np.float32(noise_std)).to(self.device)
        return theta, x, y, scales

    def chunks(self, forward, scales, begin: int, size: int, y, name: str, rows=None, per_image=False) -> list:
        """Members [begin, begin + len(scales)) of a population, ``size`` at a time, each chunk at a
        fixed place in it (members [c * size, (c + 1) * size)), a tile's part of one padded with unmoved
        members (scale 0; ``rows(low, high)``: their noise rows, zero-padded likewise). A member's row then
        sits at the same place of a same-shaped batch whatever its tile, so its bits never depend on its
        tile mates; one chunk per thread on CPU, with single-threaded ops."""
        if not len(scales):
            empty = (np.zeros(0), np.zeros(0, dtype=np.int64))
            return [(*empty, np.zeros((0, len(y)), dtype=np.float32)) if per_image else empty]
        stop = begin + len(scales)
        chunks = range(begin // size, (stop - 1) // size + 1)

        def run(k: int) -> tuple:
            first = chunks[k] * size
            low, high = max(begin, first), min(stop, first + size)
            mine = slice(low - first, high - first)
            member_scales = torch.zeros(size, device=self.device)
            member_scales[mine] = scales[low - begin : high - begin]
            if rows is None:
                logits = forward(member_scales, first)
            else:
                chunk_rows = rows(low - begin, high - begin)
                padded = torch.zeros(size, chunk_rows.shape[1], device=self.device)
                padded[mine] = chunk_rows
                logits = forward(padded, member_scales, first)
            return tuple(part[mine] for part in self.score(logits, y, per_image))

        if self.batched:
            return [run(k) for k in range(len(chunks))]
        return self.map_members(run, len(chunks), first_alone=self.first_of_shape((name, *y.shape)))

    def first_of_shape(self, key: tuple) -> bool:
        """True the first time: a new shape compiles, and must do so in one thread only."""
        first = key not in self._compiled_for
        self._compiled_for.add(key)
        return first

    def map_members(self, fn, count: int, first_alone: bool = False) -> list:
        """``[fn(0), ..., fn(count - 1)]`` the CPU way: single-threaded torch ops, over ``self.threads``
        threads (``first_alone``: fn(0) runs before the others start)."""
        with network.single_threaded():
            if self.threads == 1:
                return [fn(j) for j in range(count)]
            first = [fn(0)] if first_alone and count else []
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.threads,
                    thread_name_prefix="member",
                    initializer=_member_thread_init,
                    initargs=(self.arithmetic,),
                )
            return first + list(self._pool.map(fn, range(len(first), count)))

    def score(self, logits: torch.Tensor, y: torch.Tensor, per_image: bool = False) -> tuple[np.ndarray, ...]:
        """(loss sums, correct counts) per member; ``per_image``: and every image's loss, (m, B) float32."""
        if logits.dim() == 2:
            logits = logits.unsqueeze(0)
        members, batch = logits.shape[0], logits.shape[1]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(members * batch, -1), y.repeat(members), reduction="none"
        )
        losses = losses.reshape(members, batch).double()
        correct = (logits.argmax(dim=-1) == y).sum(dim=1).cpu().numpy().astype(np.int64)
        if self.device.type == "cpu":  # exact sums: independent of any reduction order (bitwise tests)
            loss_sums = np.array([math.fsum(row) for row in losses.numpy()], dtype=np.float64)
        else:  # an fsum over P x B values on the host would cost more than the forward pass
            loss_sums = losses.sum(dim=1).cpu().numpy()
        if per_image:
            return loss_sums, correct, losses.float().cpu().numpy()
        return loss_sums, correct


def _member_thread_init(arithmetic: str) -> None:
    """Per-thread state of a member thread: one op thread (OpenMP and MKL counts are per thread) and,
    for cpu-ftz, the flush-denormal flag (also per thread)."""
    torch.set_num_threads(1)
    set_process_arithmetic(arithmetic)


@dataclass(frozen=True)
class TileTask:
    """What a worker needs for one tile; scalars and indices only (asserted at the boundary)."""

    generation: int
    tile_id: int
    offsets: np.ndarray
    signs: np.ndarray
    noise_std: float
    image_indices: np.ndarray
    kind: Kind
    """What the members are (es_workers.kinds, or a problem's own): how they move theta and are scored."""
    first: int = 0
    """The tile's first member's index in its member group (unit and activity members: the unit it moves)."""
    batch_range: tuple[int, int] | None = None
    """Set where the generation's minibatch travels once per worker instead of with every tile (Ray):
    the shard's [start, stop) in it, and ``image_indices`` is empty until ``with_batch``."""

    def with_batch(self, batch_indices: np.ndarray) -> TileTask:
        """This task with its shard's image indices taken from the generation's minibatch."""
        start, stop = self.batch_range
        return dataclasses.replace(self, image_indices=batch_indices[start:stop], batch_range=None)

    def __post_init__(self):
        assert self.offsets.dtype == np.int64 and self.offsets.ndim == 1, self.offsets.dtype
        assert self.signs.dtype == np.float32 and self.signs.shape == self.offsets.shape, self.signs.dtype
        assert self.image_indices.dtype == np.int64 and self.image_indices.ndim == 1, self.image_indices.dtype

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.signs.nbytes + self.image_indices.nbytes + 32


@dataclass(frozen=True)
class TileResult:
    generation: int
    tile_id: int
    loss_sums: np.ndarray
    correct: np.ndarray
    compute_s: float = 0.0
    image_losses: np.ndarray | None = None
    """Activity members: (members, images) float32, each image's loss (O(members x images) scalars)."""
    fingerprint: int | None = None
    """With a replica of theta (``workers.theta_sync: replay``): its fingerprint, which the driver checks
    against its own theta's; None from a replica not at the tile's generation."""

    @property
    def nbytes(self) -> int:
        extra = 0 if self.image_losses is None else self.image_losses.nbytes
        return self.loss_sums.nbytes + self.correct.nbytes + extra + 32


def accuracy(
    theta: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    arithmetic: str,
    chunk: int = 2000,
    fused: bool = False,
    arch: Architecture = network.SEED,
) -> float:
    """Accuracy of the unperturbed network ``theta`` on uint8 ``images`` (computed on their device)."""
    params = network.unflatten(theta.to(images.device, dtype=torch.float32), arch=arch)
    images = images.reshape(-1, arch.inputs)
    correct = 0
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].float() / 255.0
        predicted = network.forward(x, params, arithmetic, fused, arch).argmax(dim=-1)
        correct += int((predicted == labels[start : start + chunk].to(images.device)).sum())
    return correct / images.shape[0]


def images_key(x: torch.Tensor, image_indices: np.ndarray) -> tuple:
    """What identifies a minibatch for ``PopulationEvaluator._kept_for``: its shape and image indices."""
    return x.shape, np.asarray(image_indices, dtype=np.int64).tobytes()


def center_accuracies(
    theta: torch.Tensor,
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    arithmetic: str,
    fused: bool = False,
    arch: Architecture = network.SEED,
) -> dict[str, float]:
    """``{name}_accuracy`` of ``theta`` on each (images, labels) set, and for a flushing arithmetic
    ``test_accuracy_unflushed``: the same theta on ``sets["test"]`` with denormals kept. Where that
    matches ``test_accuracy``, the flushes no longer matter and the net has gone linear."""
    result = {
        f"{name}_accuracy": accuracy(theta, images, labels, arithmetic, fused=fused, arch=arch)
        for name, (images, labels) in sets.items()
    }
    if arithmetic != "linear":
        result["test_accuracy_unflushed"] = accuracy(theta, *sets["test"], "linear", fused=fused, arch=arch)
    return result
