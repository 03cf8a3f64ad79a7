"""The seed's network's member kinds: one class each, owning how its members move theta (the noise
they read), how a tile of them is evaluated, and how their update estimates theta's gradient.

A generation's plan names one kind per member group (the whole members, then layer 1's, 2's and 3's
members), and every tile one kind. ``PopulationEvaluator`` (es_workers.evaluator) holds what the
kinds share: the table and the images on a device, the center's products, the member threads and the
scoring. Member math lives in es_workers.members (whole members) and es_workers.layer_members; a kind
puts it together. A kind is a small frozen value: it pickles into every tile. No Ray, no I/O.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from es_workers import layer_members, members, network, noise
from es_workers.architecture import Architecture
from es_workers.evaluator import images_key
from es_workers.layer_members import Center
from es_workers.network import SEED

OUTPUT_LAYER_CHUNK = 64  # layer-3 members per batched matmul: fixed, so a member's bits never depend on the tile
# Unit members per batched pass on CPU, at fixed places in their population (``PopulationEvaluator.chunks``);
# the fastest sizes on the 2-core development CPU (layer 1: 16, 120-140 us a member; layer 2: 32, about 50)
UNIT_CHUNK = {1: 16, 2: 32}
ACTIVITY_CHUNK = {1: 16, 2: 32, 3: 20}  # activity members per pass on CPU, likewise (layer 3: all 20)


def _joined(results: list) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate([r[k] for r in results]) for k in range(len(results[0])))


@dataclass(frozen=True)
class Kind:
    """One kind of member: ``layer`` 0 moves every parameter, 1 to 3 that layer's weight and bias, of
    the network ``arch`` (the evaluator that runs it must hold the same)."""

    layer: int = 0
    arch: Architecture = SEED
    per_image: ClassVar[bool] = False
    """Its tiles return every image's loss, and its update carries per-image slopes."""

    @property
    def param_range(self) -> tuple[int, int]:
        """[start, stop) of the parameters its members move."""
        return (0, self.arch.num_params) if self.layer == 0 else layer_members.param_range(self.layer, self.arch)

    def noise_length(self) -> int:
        """Table floats one noise slice of it reads."""
        raise NotImplementedError

    def evaluate(self, ev, theta, offsets, signs, noise_std, image_indices, first: int = 0) -> tuple:
        """(loss sums, correct counts) of its members (per-image kinds: and every image's loss) on the
        images; ``first``: the tile's first member's index in its group."""
        raise NotImplementedError

    def estimate(self, table, offsets, weights, noise_std: float, count: int, center: Center) -> torch.Tensor:
        """sum_k weights_k * (move of slice k) / (count * sigma): its block of the ascent direction."""
        raise NotImplementedError


@dataclass(frozen=True)
class Whole(Kind):
    """theta + sign * sigma * slice, one table slice of every parameter (members.member_forward)."""

    length: int | None = None
    """Its members' parameter count, theta's (None: arch's)."""

    def noise_length(self) -> int:
        return self.arch.num_params if self.length is None else self.length

    @property
    def param_range(self) -> tuple[int, int]:
        return 0, self.noise_length()

    def evaluate(self, ev, theta, offsets, signs, noise_std, image_indices, first: int = 0) -> tuple:
        theta, x, y, scales = ev.inputs(theta, signs, noise_std, image_indices)
        one = lambda j: ev.member_logits(theta, int(offsets[j]), scales[j], x)  # noqa: E731
        many = lambda part: ev.logits(theta, offsets[part], scales[part], x)  # noqa: E731
        return _whole_results(ev, one, many, offsets, x, y, 0)

    def estimate(self, table, offsets, weights, noise_std: float, count: int, center: Center) -> torch.Tensor:
        return noise.weighted_sum(table, offsets, weights, noise_std, count, self.noise_length())


def _whole_results(ev, one, many, offsets, x, y, rank: int) -> tuple:
    """CPU: single-threaded plain mm, one member per thread (intermediates stay in cache); CUDA: batched."""
    if ev.batched:
        step = ev.chunk_size(len(y), rank)
        return _joined([ev.score(many(slice(start, start + step)), y) for start in range(0, len(offsets), step)])
    first_alone = ev.first_of_shape((rank, *x.shape))
    return _joined(ev.map_members(lambda j: ev.score(one(j), y), len(offsets), first_alone=first_alone))


@dataclass(frozen=True)
class LowRank(Kind):
    """Each weight moves by A B^T / sqrt(r) and is never built (members.low_rank_forward)."""

    rank: int = 1

    def noise_length(self) -> int:
        return members.noise_length(self.rank, self.arch)

    def evaluate(self, ev, theta, offsets, signs, noise_std, image_indices, first: int = 0) -> tuple:
        theta, x, y, scales = ev.inputs(theta, signs, noise_std, image_indices)
        xw1 = ev.shared_xw1(theta, x, image_indices)
        length = self.noise_length()

        def forward(rows, member_scales):
            return members.low_rank_forward(
                x, xw1, theta, rows, member_scales, self.rank, ev.arithmetic, ev.fused, self.arch
            )

        one = lambda j: forward(ev.windows[int(offsets[j]), :length], scales[j])  # noqa: E731
        many = lambda part: forward(noise.slices(ev.table, offsets[part], length), scales[part])  # noqa: E731
        return _whole_results(ev, one, many, offsets, x, y, self.rank)

    def estimate(self, table, offsets, weights, noise_std: float, count: int, center: Center) -> torch.Tensor:
        """sum_k weights_k * members.low_rank_dense(slice_k): per layer one (fan_in, K r) @ (K r, fan_out)
        matmul of the stacked factors (the K dense perturbations are never built) and one for the biases.
        On CPU single-threaded: from 256 slices on, MKL's two-thread GEMM gave other bits than one."""
        weight_tensor = noise.weight_vector(weights, table.device)
        rows = noise.slices(table, offsets, self.noise_length())
        parts = []
        with network.single_threaded() if table.device.type == "cpu" else contextlib.nullcontext():
            for a, b, e in members.low_rank_factors(rows, self.rank, self.arch):
                number, fan_in, _ = a.shape
                stacked_a = a.permute(1, 0, 2).reshape(fan_in, number * self.rank)
                stacked_b = (b * weight_tensor[:, None, None]).permute(0, 2, 1).reshape(number * self.rank, -1)
                parts += [torch.mm(stacked_a, stacked_b).mul_(self.rank**-0.5).flatten(), torch.mv(e.T, weight_tensor)]
        return torch.cat(parts) / (count * noise_std)


@dataclass(frozen=True)
class SharedFirstLayer(Whole):
    """Full-rank members whose first layer is x W1 + scale * x E1, x W1 shared by the tile and x E1 by
    each antithetic pair (members.shared_first_layer_forward)."""

    def evaluate(self, ev, theta, offsets, signs, noise_std, image_indices, first: int = 0) -> tuple:
        """On CPU one run of members sharing a slice (an antithetic pair) per thread; on CUDA per chunk,
        one batched matmul per distinct slice."""
        theta, x, y, scales = ev.inputs(theta, signs, noise_std, image_indices)
        xw1 = ev.shared_xw1(theta, x, image_indices)
        if ev.batched:
            results = []
            step = max(1, ev.chunk_size(len(y)) // 2 * 2)  # even: chunks of whole pairs
            for start in range(0, len(offsets), step):
                part = slice(start, start + step)
                chunk = offsets[part]
                pairs = len(chunk) % 2 == 0 and np.array_equal(chunk[0::2], chunk[1::2])
                distinct, which = (chunk[0::2], None) if pairs else np.unique(chunk, return_inverse=True)
                e1 = members.first_layer_noise(noise.slices(ev.table, distinct, self.arch.w1_size), self.arch)
                xe1 = torch.matmul(x, e1)
                if pairs:
                    xe1 = xe1.unsqueeze(1)
                elif len(distinct) < len(chunk):
                    xe1 = xe1.index_select(0, torch.as_tensor(which.reshape(-1), device=ev.device))
                tail = ev.perturbed(theta, offsets[part], scales[part], start=self.arch.w1_size)
                logits = members.shared_first_layer_forward(
                    xw1, xe1, tail, scales[part], ev.arithmetic, ev.fused, self.arch
                )
                results.append(ev.score(logits, y))
            return _joined(results)
        starts = np.flatnonzero(np.diff(offsets, prepend=-1))  # runs of equal offsets, e.g. a pair
        stops = np.append(starts[1:], len(offsets))

        def run(k: int) -> list:
            xe1 = torch.mm(x, members.first_layer_noise(ev.windows[int(offsets[starts[k]])], self.arch))
            return [
                ev.score(
                    members.shared_first_layer_member(
                        xw1, xe1, theta, ev.windows[int(offsets[j])], scales[j], ev.arithmetic, ev.fused, self.arch
                    ),
                    y,
                )
                for j in range(starts[k], stops[k])
            ]

        groups = ev.map_members(run, len(starts), first_alone=ev.first_of_shape(("shared", *x.shape)))
        return _joined([r for group in groups for r in group])


@dataclass(frozen=True)
class Output(Kind):
    """Layer-3 members: a full move of W3 and b3 from the center's last hidden layer
    (members.output_layer_forward), OUTPUT_LAYER_CHUNK to a batched matmul."""

    layer: int = 3

    def noise_length(self) -> int:
        return self.arch.output_layer_size

    def evaluate(self, ev, theta, offsets, signs, noise_std, image_indices, first: int = 0) -> tuple:
        """The center's hidden layer once per theta and minibatch (kept for later tiles), then one small
        batched matmul per fixed chunk (on CPU one chunk per thread, with single-threaded ops), so no
        result depends on the thread count."""
        theta, x, y, scales = ev.inputs(theta, signs, noise_std, image_indices)
        rows = noise.slices(ev.table, offsets, self.noise_length())
        h2 = ev.center(theta, x, image_indices)[3]

        def chunk(k: int) -> tuple[np.ndarray, np.ndarray]:
            part = slice(k * OUTPUT_LAYER_CHUNK, (k + 1) * OUTPUT_LAYER_CHUNK)
            return ev.score(
                members.output_layer_forward(h2, theta, rows[part], scales[part], ev.arithmetic, ev.fused, self.arch),
                y,
            )

        chunks = -(-len(offsets) // OUTPUT_LAYER_CHUNK)
        if ev.batched:
            return _joined([chunk(k) for k in range(chunks)])
        return _joined(ev.map_members(chunk, chunks, first_alone=ev.first_of_shape(("output layer", *x.shape))))

    def estimate(self, table, offsets, weights, noise_std: float, count: int, center: Center) -> torch.Tensor:
        return noise.weighted_sum(table, offsets, weights, noise_std, count, self.noise_length())


@dataclass(frozen=True)
class LayerRank1(Kind):
    """Layer 1 or 2 moved by a rank-1 move of its weight and its bias (layer_members.first_layer_forward,
    second_layer_forward); layer 1 in a ``subspace`` of the images' principal components when > 0."""

    layer: int = 1
    subspace: int = 0
    unit: ClassVar[bool] = False

    def noise_length(self) -> int:
        return layer_members.noise_length(self.layer, self.subspace, self.unit, self.arch)

    def _shared(self, ev, theta, x, image_indices) -> tuple:
        """What a tile shares: x U (or x) and x W1 for layer 1, the center's h1 and h1 W2 for layer 2."""
        xw1, h1, z2, _, _ = ev.center(theta, x, image_indices)
        return (x @ ev.basis if self.subspace else x, xw1) if self.layer == 1 else (h1, z2)

    def _forward(self, ev, theta, shared, rows, scales, units):
        if self.layer == 1:
            return layer_members.first_layer_forward(
                *shared, theta, rows, scales, self.subspace, ev.arithmetic, ev.fused, self.arch
            )
        return layer_members.second_layer_forward(*shared, theta, rows, scales, ev.arithmetic, ev.fused, self.arch)

    def evaluate(self, ev, theta, offsets, signs, noise_std, image_indices, first: int = 0) -> tuple:
        """What the members share is computed once per theta and minibatch and kept for the generation's
        later tiles; then one member per thread on CPU, batched on CUDA."""
        theta, x, y, scales = ev.inputs(theta, signs, noise_std, image_indices)
        length, columns = self.noise_length(), 0 if ev.basis is None else ev.basis.shape[1]
        if self.subspace and self.layer == 2 and not self.unit:
            raise ValueError("layer-2 members move in a subspace only as unit members (es.w2.kind: unit)")
        if self.subspace and (columns < self.subspace or (self.layer == 1 and columns != self.subspace)):
            raise ValueError(
                f"layer-{self.layer} members in a {self.subspace}-dimensional subspace need the evaluator's basis "
                f"of {'that many' if self.layer == 1 else 'at least that many'} principal components (it has {columns})"
            )
        key = (self.unit, self.subspace, images_key(x, image_indices))
        shared = ev.kept_for(f"layer {self.layer}", theta, key, lambda: self._shared(ev, theta, x, image_indices))
        width = self.arch.units(self.layer)
        units = layer_members.unit_indices(first, len(offsets), ev.device, width) if self.unit else None
        forward = lambda rows, member_scales, member_units: self._forward(  # noqa: E731
            ev, theta, shared, rows, member_scales, member_units
        )
        if ev.batched:
            step = ev.chunk_size(len(y), rank=1)
            parts = [slice(start, start + step) for start in range(0, len(offsets), step)]
            rows = lambda part: noise.slices(ev.table, offsets[part], length)  # noqa: E731
            return _joined(
                [ev.score(forward(rows(p), scales[p], None if units is None else units[p]), y) for p in parts]
            )
        if self.unit:  # UNIT_CHUNK at a time at fixed places, their table rows gathered per chunk
            return _joined(
                ev.chunks(
                    lambda rows, member_scales, at: forward(
                        rows, member_scales, layer_members.unit_indices(at, len(rows), ev.device, width)
                    ),
                    scales,
                    first,
                    UNIT_CHUNK[self.layer],
                    y,
                    f"units {self.layer}",
                    rows=lambda low, high: noise.slices(ev.table, offsets[low:high], length),
                )
            )
        return _joined(
            ev.map_members(
                lambda j: ev.score(forward(ev.windows[int(offsets[j]), :length], scales[j], None), y),
                len(offsets),
                first_alone=ev.first_of_shape((f"layer {self.layer}", *x.shape)),
            )
        )

    def estimate(self, table, offsets, weights, noise_std: float, count: int, center: Center) -> torch.Tensor:
        rows = noise.slices(table, offsets, self.noise_length())
        weight_tensor = noise.weight_vector(weights, table.device)
        basis = center.basis
        if self.layer == 2 and self.subspace:
            w1 = network.unflatten(center.theta, arch=self.arch)[0]
            basis = layer_members.hidden_basis(w1, center.basis, self.subspace)
        layer, subspace = self.layer, self.subspace
        estimate = layer_members.weighted_moves(rows, weight_tensor, layer, subspace, basis, self.unit, self.arch)
        return estimate / (count * noise_std)


@dataclass(frozen=True)
class Unit(LayerRank1):
    """Layer 1 or 2 moved one hidden unit at a time: pair i moves unit i mod 512's incoming weights (in a
    ``subspace`` when > 0) and its bias (layer_members.unit_first_layer_forward, unit_second_layer_forward)."""

    unit: ClassVar[bool] = True

    def _shared(self, ev, theta, x, image_indices) -> tuple:
        """The center's activations up to the next layer's pre-activation: x U (or x), x W1, h1 and h1 W2
        for layer 1; h1 Q (or h1: Q is ``hidden_basis``), h1 W2, h2 and h2 W3 for layer 2."""
        xw1, h1, z2, h2, z3 = ev.center(theta, x, image_indices)
        if self.layer == 1:
            return (x @ ev.basis if self.subspace else x, xw1, h1, z2)
        return (h1 @ ev.hidden_basis(theta, self.subspace) if self.subspace else h1, z2, h2, z3)

    def _forward(self, ev, theta, shared, rows, scales, units):
        forward = layer_members.unit_first_layer_forward if self.layer == 1 else layer_members.unit_second_layer_forward
        return forward(*shared, theta, rows, units, scales, self.subspace, ev.arithmetic, ev.fused, self.arch)


@dataclass(frozen=True)
class Activity(Kind):
    """Not weight-space ES: pair i moves unit i's pre-activation of ``layer`` by +-sigma on every image
    (layer_members.activity_forward), reads no table rows, and returns every image's loss; the
    estimate is the layer's input times the per-image slopes (node perturbation)."""

    layer: int = 1
    per_image: ClassVar[bool] = True

    def noise_length(self) -> int:
        return 0

    def evaluate(self, ev, theta, offsets, signs, noise_std, image_indices, first: int = 0) -> tuple:
        """In chunks at fixed places of the population, as unit members, so a member's bits never depend
        on its tile."""
        theta, x, y, scales = ev.inputs(theta, signs, noise_std, image_indices)
        center = ev.center(theta, x, image_indices)
        units = self.arch.units(self.layer)

        def forward(member_scales, at):
            member_units = layer_members.unit_indices(at, len(member_scales), ev.device, units)
            return layer_members.activity_forward(
                self.layer, center, theta, member_units, member_scales, ev.arithmetic, ev.fused, self.arch
            )

        size = ACTIVITY_CHUNK[self.layer] if not ev.batched else max(2, ev.chunk_size(len(y), rank=1) // 2 * 2)
        return _joined(ev.chunks(forward, scales, first, size, y, f"activity {self.layer}", per_image=True))

    def estimate(self, table, offsets, weights, noise_std: float, count: int, center: Center) -> torch.Tensor:
        """``weights``: each pair's per-image slopes, (pairs x images) flat."""
        slopes = torch.as_tensor(np.asarray(weights).reshape(count // 2, -1)).to(center.theta.device)
        return layer_members.activity_estimate(center.layer_inputs[self.layer - 1], slopes.T)


def whole_kind(
    rank: int = 0, shared_first_layer: bool = False, length: int | None = None, arch: Architecture = SEED
) -> Kind:
    """The whole members' kind: with a shared first layer, else low-rank at ``rank`` > 0, else full rank
    (``length``: a problem's parameter count; None: arch's)."""
    if shared_first_layer:
        return SharedFirstLayer(length=length, arch=arch)
    return LowRank(rank=rank, arch=arch) if rank else Whole(length=length, arch=arch)


def layer_kind(layer: int, kind: str = "rank1", subspace: int = 0, arch: Architecture = SEED) -> Kind:
    """A layer's members' kind from its config: rank1 (layer 3: a full move), unit or activity."""
    if kind == "activity":
        return Activity(layer=layer, arch=arch)
    if layer == 3:
        return Output(arch=arch)
    chosen = Unit if kind == "unit" else LayerRank1
    return chosen(layer=layer, subspace=subspace, arch=arch)
