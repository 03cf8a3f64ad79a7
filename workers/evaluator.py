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

import numpy as np
import torch

from es_workers import layer_members, members, network, noise

OUTPUT_LAYER_CHUNK = (
    64  # layer-3 members per batched matmul: fixed, so a layer-3 member's bits never depend on the tile
)
# Unit members per batched pass on CPU, at fixed places in their population (see _unit_chunks); the
# fastest sizes on the 2-core development CPU (layer 1: 16, 120-140 us a member; layer 2: 32, about 50)
UNIT_CHUNK = {1: 16, 2: 32}
ACTIVITY_CHUNK = {1: 16, 2: 32, 3: 20}  # activity members per pass on CPU, likewise (layer 3: all 20)


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
    ):
        self.device = torch.device(device)
        if arithmetic == "cpu-ftz" and self.device.type != "cpu":
            raise ValueError("cpu-ftz is CPU only: torch.set_flush_denormal does nothing on CUDA; use tf-ftz")
        if arithmetic not in ("tf-ftz", "linear", "cpu-ftz"):
            raise ValueError(f"unknown arithmetic {arithmetic!r}; allowed: tf-ftz, linear, cpu-ftz")
        self.arithmetic = arithmetic
        self.fused = fused and arithmetic != "cpu-ftz"
        self.memory_fraction = memory_fraction
        self.batched = self.device.type != "cpu" if batched is None else batched
        self.table = table.to(self.device, dtype=torch.float32)
        self.windows = noise.windows(self.table)
        self.images = images.reshape(-1, 784).to(self.device, dtype=torch.uint8)
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
        started = time.perf_counter()
        if task.activity:
            loss_sums, correct, image_losses = self.evaluate_activity(
                theta, task.layer, task.signs, task.noise_std, task.image_indices, task.unit_from
            )
            return TileResult(
                task.generation,
                task.tile_id,
                loss_sums,
                correct,
                time.perf_counter() - started,
                image_losses=image_losses,
            )
        if task.layer:
            loss_sums, correct = self.evaluate_layer(
                theta,
                task.layer,
                task.offsets,
                task.signs,
                task.noise_std,
                task.image_indices,
                task.subspace,
                task.unit_from,
            )
        else:
            loss_sums, correct = self.evaluate(
                theta, task.offsets, task.signs, task.noise_std, task.image_indices, task.rank, task.shared_first_layer
            )
        return TileResult(task.generation, task.tile_id, loss_sums, correct, time.perf_counter() - started)

    def batch(self, image_indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(np.asarray(image_indices, dtype=np.int64)).to(self.device)
        return self.images.index_select(0, index).float() / 255.0, self.labels.index_select(0, index)

    def perturbed(self, theta: torch.Tensor, offsets: np.ndarray, scales: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(n, NUM_PARAMS - start) perturbed parameters for the batched path: theta + (sign * sigma) * slice
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
        if rank:  # no per-member weights: the noise rows and ~6 activations of 512 per image
            per_member = 4 * (members.noise_length(rank) + batch_size * (6 * 512 + 2 * 10 + 3 * rank))
        else:  # x may be expanded per member
            per_member = 4 * (network.NUM_PARAMS + batch_size * (784 + 4 * 512 + 2 * 10))
        return max(1, int(free * self.memory_fraction // per_member))

    def logits(self, theta: torch.Tensor, offsets: np.ndarray, scales: torch.Tensor, x: torch.Tensor):
        """(n, B, 10) logits of n members from batched matmuls."""
        params = network.unflatten(self.perturbed(theta, offsets, scales))
        return network.forward(x, params, self.arithmetic, self.fused)

    def member_logits(self, theta: torch.Tensor, offset: int, scale: torch.Tensor, x: torch.Tensor):
        """(B, 10) logits of one member from plain matmuls, its weights read straight from the table."""
        return members.member_forward(x, theta, self.windows[offset], scale, self.arithmetic, self.fused)

    def evaluate(
        self,
        theta: torch.Tensor,
        offsets: np.ndarray,
        signs: np.ndarray,
        noise_std: float,
        image_indices: np.ndarray,
        rank: int = 0,
        shared_first_layer: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Loss sums (float64) and correct counts (int64) of each member on the given images; ``rank``
        r >= 1 makes the members low-rank (members.low_rank_forward); ``shared_first_layer`` computes
        full-rank members' first layer from shared products (members.shared_first_layer_forward)."""
        theta, x, y, scales = self._inputs(theta, signs, noise_std, image_indices)
        if shared_first_layer or rank:
            xw1 = self.shared_xw1(theta, x, image_indices)
        if shared_first_layer:
            return self._evaluate_shared_first_layer(theta, offsets, scales, x, y, xw1)
        if rank:
            one, many = self._low_rank_forwards(theta, offsets, scales, x, rank, xw1)
        else:
            one = lambda j: self.member_logits(theta, int(offsets[j]), scales[j], x)  # noqa: E731
            many = lambda part: self.logits(theta, offsets[part], scales[part], x)  # noqa: E731
        # CPU: single-threaded plain mm, one member per thread (intermediates stay in cache); CUDA: batched.
        if self.batched:
            step = self.chunk_size(len(y), rank)
            results = [self._score(many(slice(start, start + step)), y) for start in range(0, len(offsets), step)]
        else:
            results = self.map_members(
                lambda j: self._score(one(j), y), len(offsets), first_alone=self._first_of_shape((rank, *x.shape))
            )
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    def shared_xw1(self, theta: torch.Tensor, x: torch.Tensor, image_indices: np.ndarray) -> torch.Tensor:
        """x @ W1, which every low-rank or shared-first-layer member on these images shares."""
        return self._kept_for(
            "xw1", theta, images_key(x, image_indices), lambda: torch.mm(x, network.unflatten(theta)[0])
        )

    def hidden_basis(self, theta: torch.Tensor, subspace: int) -> torch.Tensor:
        """layer_members.hidden_basis of theta's W1: what layer-2 unit members in a subspace share."""
        return self._kept_for(
            "hidden_basis",
            theta,
            subspace,
            lambda: layer_members.hidden_basis(network.unflatten(theta)[0], self.basis, subspace),
        )

    def center(self, theta: torch.Tensor, x: torch.Tensor, image_indices: np.ndarray) -> tuple:
        """The unperturbed network's products on these images, which layer members share (scaled frame):
        x W1, h1, z2 = h1 W2, h2 and z3 = h2 W3; kept like ``shared_xw1``."""

        def compute():
            _, b1, w2, b2, w3, _ = network.unflatten(theta)
            ops = network.epilogues(self.arithmetic, self.fused)
            xw1 = self.shared_xw1(theta, x, image_indices)
            h1 = ops.hidden1(xw1, b1)
            z2 = torch.mm(h1, w2)
            h2 = ops.hidden2(z2, b2)
            return xw1, h1, z2, h2, torch.mm(h2, w3)

        return self._kept_for("center", theta, images_key(x, image_indices), compute)

    def _layer_shared(self, theta, x, image_indices, layer: int, unit: bool, subspace: int) -> tuple:
        """What a tile of layer members shares, for ``evaluate_layer``: x U (or x) and x W1 for layer 1,
        the center's h1 and h1 W2 for layer 2; unit members add the center's activations up to the next
        layer's pre-activation (h1 and h1 W2 for layer 1; h2 and h2 W3 for layer 2, whose h1 is then
        taken in layer 2's subspace when it has one)."""
        xw1, h1, z2, h2, z3 = self.center(theta, x, image_indices)
        if layer == 1:
            shared = (x @ self.basis if subspace else x, xw1)
            return (*shared, h1, z2) if unit else shared
        if not unit:
            return (h1, z2)
        return (h1 @ self.hidden_basis(theta, subspace) if subspace else h1, z2, h2, z3)

    def _kept_for(self, name: str, theta: torch.Tensor, key, compute):
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

    def _evaluate_shared_first_layer(self, theta, offsets: np.ndarray, scales: torch.Tensor, x, y, xw1):
        """``evaluate`` with x W1 given and x E1 computed once per run of members sharing a slice (an
        antithetic pair): on CPU one run per thread; on CUDA per chunk, one batched matmul per distinct slice."""
        if self.batched:
            results = []
            step = max(1, self.chunk_size(len(y)) // 2 * 2)  # even: chunks of whole pairs
            for start in range(0, len(offsets), step):
                part = slice(start, start + step)
                chunk = offsets[part]
                pairs = len(chunk) % 2 == 0 and np.array_equal(chunk[0::2], chunk[1::2])
                distinct, which = (chunk[0::2], None) if pairs else np.unique(chunk, return_inverse=True)
                xe1 = torch.matmul(x, members.first_layer_noise(noise.slices(self.table, distinct, network.W1_SIZE)))
                if pairs:
                    xe1 = xe1.unsqueeze(1)
                elif len(distinct) < len(chunk):
                    xe1 = xe1.index_select(0, torch.as_tensor(which.reshape(-1), device=self.device))
                tail = self.perturbed(theta, offsets[part], scales[part], start=network.W1_SIZE)
                results.append(
                    self._score(
                        members.shared_first_layer_forward(xw1, xe1, tail, scales[part], self.arithmetic, self.fused), y
                    )
                )
        else:
            starts = np.flatnonzero(np.diff(offsets, prepend=-1))  # runs of equal offsets, e.g. a pair
            stops = np.append(starts[1:], len(offsets))

            def run(k: int) -> list:
                xe1 = torch.mm(x, members.first_layer_noise(self.windows[int(offsets[starts[k]])]))
                return [
                    self._score(
                        members.shared_first_layer_member(
                            xw1, xe1, theta, self.windows[int(offsets[j])], scales[j], self.arithmetic, self.fused
                        ),
                        y,
                    )
                    for j in range(starts[k], stops[k])
                ]

            results = [
                r
                for group in self.map_members(run, len(starts), first_alone=self._first_of_shape(("shared", *x.shape)))
                for r in group
            ]
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    def _inputs(self, theta: torch.Tensor, signs: np.ndarray, noise_std: float, image_indices: np.ndarray):
        """theta, the images x, labels y and each member's sign * sigma, on this device."""
        theta = theta.to(self.device, dtype=torch.float32)
        if theta.shape != (network.NUM_PARAMS,):
            raise ValueError(f"theta must have shape ({network.NUM_PARAMS},), got {tuple(theta.shape)}")
        x, y = self.batch(image_indices)
        scales = torch.as_tensor(np.asarray(signs, dtype=np.float32) * np.float32(noise_std)).to(self.device)
        return theta, x, y, scales

    def evaluate_output_layer(
        self, theta: torch.Tensor, offsets: np.ndarray, signs: np.ndarray, noise_std: float, image_indices: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``evaluate`` for layer-3 members (members.output_layer_forward): the center's hidden layer once per
        theta and minibatch (``center``, kept for later tiles), then one small batched matmul per
        fixed chunk of OUTPUT_LAYER_CHUNK members (on CPU one chunk per thread, with single-threaded ops, like
        members), so no result depends on the thread count."""
        theta, x, y, scales = self._inputs(theta, signs, noise_std, image_indices)
        rows = noise.slices(self.table, offsets, network.OUTPUT_LAYER_SIZE)
        h2 = self.center(theta, x, image_indices)[3]

        def chunk(k: int) -> tuple[np.ndarray, np.ndarray]:
            part = slice(k * OUTPUT_LAYER_CHUNK, (k + 1) * OUTPUT_LAYER_CHUNK)
            return self._score(
                members.output_layer_forward(h2, theta, rows[part], scales[part], self.arithmetic, self.fused), y
            )

        chunks = -(-len(offsets) // OUTPUT_LAYER_CHUNK)
        results = (
            [chunk(k) for k in range(chunks)]
            if self.batched
            else self.map_members(chunk, chunks, first_alone=self._first_of_shape(("output layer", *x.shape)))
        )
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    def evaluate_layer(
        self,
        theta: torch.Tensor,
        layer: int,
        offsets: np.ndarray,
        signs: np.ndarray,
        noise_std: float,
        image_indices: np.ndarray,
        subspace: int = 0,
        unit_from: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``evaluate`` for layer members (es_workers.layer_members), which move layer 1, 2 or 3 only;
        ``unit_from``: they are unit members, and the first is that member of its layer's population.
        What the members share (``_layer_shared``) is computed once per theta and minibatch and kept for
        the generation's later tiles; then one member per thread on CPU, batched on CUDA."""
        if layer == 3:
            return self.evaluate_output_layer(theta, offsets, signs, noise_std, image_indices)
        theta, x, y, scales = self._inputs(theta, signs, noise_std, image_indices)
        unit = unit_from is not None
        length = layer_members.noise_length(layer, subspace, unit)
        units = layer_members.unit_indices(unit_from, len(offsets), self.device) if unit else None
        columns = 0 if self.basis is None else self.basis.shape[1]
        if subspace and layer == 2 and not unit:
            raise ValueError("layer-2 members move in a subspace only as unit members (es.w2.kind: unit)")
        if subspace and (columns < subspace or (layer == 1 and columns != subspace)):
            raise ValueError(
                f"layer-{layer} members in a {subspace}-dimensional subspace need the evaluator's basis of "
                f"{'that many' if layer == 1 else 'at least that many'} principal components (it has {columns})"
            )
        shared = self._kept_for(
            f"layer {layer}",
            theta,
            (unit, subspace, images_key(x, image_indices)),
            lambda: self._layer_shared(theta, x, image_indices, layer, unit, subspace),
        )

        def forward(rows, member_scales, member_units):
            if unit:
                if layer == 1:
                    return layer_members.unit_first_layer_forward(
                        *shared, theta, rows, member_units, member_scales, subspace, self.arithmetic, self.fused
                    )
                return layer_members.unit_second_layer_forward(
                    *shared, theta, rows, member_units, member_scales, subspace, self.arithmetic, self.fused
                )
            if layer == 1:
                return layer_members.first_layer_forward(
                    *shared, theta, rows, member_scales, subspace, self.arithmetic, self.fused
                )
            return layer_members.second_layer_forward(*shared, theta, rows, member_scales, self.arithmetic, self.fused)

        if self.batched:
            step = self.chunk_size(len(y), rank=1)
            results = [
                self._score(
                    forward(
                        noise.slices(self.table, offsets[start : start + step], length),
                        scales[start : start + step],
                        None if units is None else units[start : start + step],
                    ),
                    y,
                )
                for start in range(0, len(offsets), step)
            ]
        elif unit:
            results = self._unit_chunks(forward, offsets, scales, length, unit_from, y, layer)
        else:
            results = self.map_members(
                lambda j: self._score(forward(self.windows[int(offsets[j]), :length], scales[j], None), y),
                len(offsets),
                first_alone=self._first_of_shape((f"layer {layer}", *x.shape)),
            )
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    def evaluate_activity(
        self,
        theta: torch.Tensor,
        layer: int,
        signs: np.ndarray,
        noise_std: float,
        image_indices: np.ndarray,
        unit_from: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(loss sums, correct counts, per-image losses (m, B) float32) of activity members of ``layer``
        (layer_members.activity_forward), members ``unit_from`` on of the layer's population: pair i moves
        unit i's pre-activation by +sigma, then by -sigma. Every image's loss goes back, not only their
        sum: the estimate reads each image's slope. In chunks at fixed places of the population, as unit
        members (``_unit_chunks``), so a member's bits never depend on its tile."""
        theta, x, y, scales = self._inputs(theta, signs, noise_std, image_indices)
        center = self.center(theta, x, image_indices)
        units = layer_members.UNITS[layer]

        def forward(member_scales, first):
            member_units = layer_members.unit_indices(first, len(member_scales), self.device, units)
            return layer_members.activity_forward(
                layer, center, theta, member_units, member_scales, self.arithmetic, self.fused
            )

        size = ACTIVITY_CHUNK[layer] if not self.batched else max(2, self.chunk_size(len(y), rank=1) // 2 * 2)
        results = self._chunks(forward, scales, unit_from, size, y, f"activity {layer}", per_image=True)
        return tuple(np.concatenate([r[k] for r in results]) for k in range(3))

    def _chunks(self, forward, scales, unit_from: int, size: int, y, name: str, rows=None, per_image=False) -> list:
        """Members [unit_from, unit_from + len(scales)) of a population, ``size`` at a time, each chunk at a
        fixed place in it (members [c * size, (c + 1) * size)), a tile's part of one padded with unmoved
        members (scale 0; ``rows(low, high)``: their noise rows, zero-padded likewise). A member's row then
        sits at the same place of a same-shaped batch whatever its tile, so its bits never depend on its
        tile mates; one chunk per thread on CPU, with single-threaded ops."""
        if not len(scales):
            empty = (np.zeros(0), np.zeros(0, dtype=np.int64))
            return [(*empty, np.zeros((0, len(y)), dtype=np.float32)) if per_image else empty]
        stop = unit_from + len(scales)
        chunks = range(unit_from // size, (stop - 1) // size + 1)

        def run(k: int) -> tuple:
            first = chunks[k] * size
            low, high = max(unit_from, first), min(stop, first + size)
            mine = slice(low - first, high - first)
            member_scales = torch.zeros(size, device=self.device)
            member_scales[mine] = scales[low - unit_from : high - unit_from]
            if rows is None:
                logits = forward(member_scales, first)
            else:
                chunk_rows = rows(low - unit_from, high - unit_from)
                padded = torch.zeros(size, chunk_rows.shape[1], device=self.device)
                padded[mine] = chunk_rows
                logits = forward(padded, member_scales, first)
            return tuple(part[mine] for part in self._score(logits, y, per_image))

        if self.batched:
            return [run(k) for k in range(len(chunks))]
        return self.map_members(run, len(chunks), first_alone=self._first_of_shape((name, *y.shape)))

    def _unit_chunks(self, forward, offsets, scales, length: int, unit_from: int, y, layer: int) -> list:
        """CPU unit members: UNIT_CHUNK[layer] at a time at fixed places (``_chunks``), their table rows
        gathered per chunk."""
        return self._chunks(
            lambda rows, member_scales, first: forward(
                rows, member_scales, layer_members.unit_indices(first, len(rows), self.device)
            ),
            scales,
            unit_from,
            UNIT_CHUNK[layer],
            y,
            f"units {layer}",
            rows=lambda low, high: noise.slices(self.table, offsets[low:high], length),
        )

    def _first_of_shape(self, key: tuple) -> bool:
        """True the first time: a new shape compiles, and must do so in one thread only."""
        first = key not in self._compiled_for
        self._compiled_for.add(key)
        return first

    def _low_rank_forwards(self, theta, offsets, scales, x, rank: int, xw1: torch.Tensor):
        """(one member j's logits, the logits of members[part]) for low-rank members sharing x W1."""
        length = members.noise_length(rank)

        def forward(rows, member_scales):
            return members.low_rank_forward(x, xw1, theta, rows, member_scales, rank, self.arithmetic, self.fused)

        return (
            lambda j: forward(self.windows[int(offsets[j]), :length], scales[j]),
            lambda part: forward(noise.slices(self.table, offsets[part], length), scales[part]),
        )

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

    def _score(self, logits: torch.Tensor, y: torch.Tensor, per_image: bool = False) -> tuple[np.ndarray, ...]:
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
    rank: int = 0
    shared_first_layer: bool = False
    layer: int = 0
    """0: whole members; 1, 2 or 3: layer members, which move that layer only (es_workers.layer_members);
    ``rank`` and ``shared_first_layer`` do not apply to them."""
    subspace: int = 0
    """Layer members' input subspace (layer 1: the images' principal components; layer-2 unit members:
    their image in the first hidden layer); 0: none."""
    unit_from: int | None = None
    """Unit members of layer 1 or 2 (es_workers.layer_members): the tile's first member's index in its
    layer's population, which says the unit each member moves; None: not unit members."""
    activity: bool = False
    """Activity members of ``layer`` (es_workers.layer_members.activity_forward), from ``unit_from`` on;
    their result carries every image's loss."""
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
) -> float:
    """Accuracy of the unperturbed network ``theta`` on uint8 ``images`` (computed on their device)."""
    params = network.unflatten(theta.to(images.device, dtype=torch.float32))
    images = images.reshape(-1, 784)
    correct = 0
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].float() / 255.0
        predicted = network.forward(x, params, arithmetic, fused).argmax(dim=-1)
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
) -> dict[str, float]:
    """``{name}_accuracy`` of ``theta`` on each (images, labels) set, and for a flushing arithmetic
    ``test_accuracy_unflushed``: the same theta on ``sets["test"]`` with denormals kept. Where that
    matches ``test_accuracy``, the flushes no longer matter and the net has gone linear."""
    result = {
        f"{name}_accuracy": accuracy(theta, images, labels, arithmetic, fused=fused)
        for name, (images, labels) in sets.items()
    }
    if arithmetic != "linear":
        result["test_accuracy_unflushed"] = accuracy(theta, *sets["test"], "linear", fused=fused)
    return result
