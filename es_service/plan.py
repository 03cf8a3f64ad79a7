"""What one generation evaluates, as a pure function of (config, seed, generation).

All seeding lives here. Deriving every generation's randomness from (seed, generation) rather than
carrying a live RNG makes resumes, worker deaths and re-dispatched tiles unable to change theta's path.
No Ray, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from es_service.config import Config
from es_workers import kinds, layer_members, network, noise
from es_workers.kinds import Kind

STREAM_INIT, STREAM_NOISE, STREAM_GENERATION = 1, 2, 3
LAYER_STREAMS = {3: 4, 1: 5, 2: 6}  # 4 first: runs made when only layer 3 could have members keep their draws


def derive_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for one purpose (init, noise table, generations, each layer's members)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(2, dtype=np.uint64)[0] >> 1)


def init_seed(seed: int) -> int:
    """The seed a problem's initialisation gets in a run whose config says ``seed``."""
    return derive_seed(seed, STREAM_INIT)


def seed_theta(seed: int, arch: network.Architecture = network.SEED) -> torch.Tensor:
    """The seed's network's initialisation (of shape ``arch``) for a run whose config says ``seed``:
    every run, ES or backprop, starts here."""
    return network.init_theta(init_seed(seed), arch)


def noise_seed(seed: int) -> int:
    """The noise table's seed for a run whose config says ``seed`` (checkpoints record it)."""
    return derive_seed(seed, STREAM_NOISE)


@dataclass(frozen=True)
class Tile:
    """The unit of work: members [member_start, member_stop) on one shard of the minibatch, of the whole
    members (``layer`` 0) or of one layer's members (1, 2 or 3: es_workers.layer_members)."""

    tile_id: int
    member_start: int
    member_stop: int
    shard: int
    layer: int = 0


@dataclass(frozen=True)
class GenerationPlan:
    generation: int
    noise_std: float
    learning_rate: float
    slice_offsets: np.ndarray
    """One table offset per noise slice (per antithetic pair, or per member)."""
    member_offsets: np.ndarray
    member_signs: np.ndarray
    """+1 or -1 per member: theta_i = theta + sign_i * sigma * slice_i."""
    batch_indices: np.ndarray
    kinds: tuple[Kind, Kind, Kind, Kind]
    """Per member group (the whole members, then layer 1's, 2's and 3's): its kind (es_workers.kinds)."""
    shard_bounds: tuple[tuple[int, int], ...]
    tiles: tuple[Tile, ...]
    layer_offsets: tuple[np.ndarray, np.ndarray, np.ndarray]
    """Per layer 1, 2, 3: one table offset per antithetic pair of its layer members (es.wL.pop_size / 2)."""
    layer_noise_stds: tuple[float, float, float]
    """Per layer: its members' sigma (the scheduled sigma times es.wL.noise_scale)."""

    def members(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, signs) of the whole members (layer 0) or of one layer's members, each of whose
        offsets is at +sigma, then at -sigma."""
        if layer == 0:
            return self.member_offsets, self.member_signs
        return antithetic_members(self.layer_offsets[layer - 1])

    def noise_std_of(self, layer: int) -> float:
        return self.noise_std if layer == 0 else self.layer_noise_stds[layer - 1]


def antithetic_members(slice_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, signs) of the members of antithetic pairs: each slice at +sigma, then at -sigma."""
    return np.repeat(slice_offsets, 2), np.tile(np.array([1.0, -1.0], dtype=np.float32), len(slice_offsets))


def batch_size_at(config: Config, generation: int) -> int:
    es = config.es
    if es.batch_size_final is None:
        return es.batch_size
    progress = generation / max(1, config.generations - 1)
    size = es.batch_size + (es.batch_size_final - es.batch_size) * progress
    if es.shard_size:
        size = round(size / es.shard_size) * es.shard_size
    return int(min(60000, max(1, round(size))))


def shard_bounds(batch_size: int, shard_size: int) -> tuple[tuple[int, int], ...]:
    step = shard_size or batch_size
    return tuple((start, min(start + step, batch_size)) for start in range(0, batch_size, step))


def make_tiles(
    pop_size: int, members_per_tile: int, num_shards: int, layer_pop_sizes: tuple[int, int, int] = (0, 0, 0)
) -> tuple[Tile, ...]:
    """Tiles of at most members_per_tile members per shard, for the whole members, then layer 1's and
    layer 2's; then, per shard, one tile of all of layer 3's members (they are cheap, and one fixed
    tile keeps their batched matmul's shape fixed)."""
    tiles = []
    for layer, size in enumerate((pop_size, *layer_pop_sizes[:2])):
        for member_start in range(0, size, members_per_tile):
            for shard in range(num_shards):
                stop = min(member_start + members_per_tile, size)
                tiles.append(Tile(len(tiles), member_start, stop, shard, layer))
    if layer_pop_sizes[2]:
        tiles += [Tile(len(tiles) + shard, 0, layer_pop_sizes[2], shard, layer=3) for shard in range(num_shards)]
    return tuple(tiles)


def merge_tiles(tiles: tuple[Tile, ...]) -> tuple[Tile, ...]:
    """One tile per (layer, shard) spanning all of its members. A member's result never depends on its
    tile mates, so in one process fewer, larger tiles change no bit and save each call's overhead (the
    batch gather, the member threads' start and end)."""
    spans: dict[tuple[int, int], tuple[int, int]] = {}
    for tile in tiles:
        start, stop = spans.get((tile.layer, tile.shard), (tile.member_start, tile.member_stop))
        spans[(tile.layer, tile.shard)] = (min(start, tile.member_start), max(stop, tile.member_stop))
    return tuple(Tile(k, start, stop, shard, layer) for k, ((layer, shard), (start, stop)) in enumerate(spans.items()))


def scheduled(start: float, final: float | None, progress: float, schedule: str) -> float:
    """Value at ``progress`` in [0, 1] moving from ``start`` to ``final`` (None: stays at start)."""
    if final is None or schedule == "constant":
        return start
    if schedule == "linear":
        return start + (final - start) * progress
    if schedule == "cosine":
        return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def make_plan(config: Config, generation: int, num_train: int, num_params: int | None = None) -> GenerationPlan:
    """The plan of ``generation``: ``num_train`` examples to draw its minibatch from, ``num_params``
    floats in a member's noise slice (theta's length; None: the config's network's)."""
    es, arch = config.es, config.network.architecture()
    num_params = num_params or arch.num_params
    rng = np.random.default_rng([derive_seed(config.seed, STREAM_GENERATION), generation])
    num_slices = es.pop_size // 2 if es.antithetic else es.pop_size
    slice_offsets = rng.integers(0, noise.max_offset(config.noise.table_size, num_params) + 1, size=num_slices)
    if es.antithetic:
        member_offsets, member_signs = antithetic_members(slice_offsets)
    else:
        member_offsets = slice_offsets.copy()
        member_signs = np.ones(num_slices, dtype=np.float32)
    batch_size = min(batch_size_at(config, generation), num_train)
    batch_indices = rng.choice(num_train, size=batch_size, replace=False).astype(np.int64)
    bounds = shard_bounds(batch_size, es.shard_size)
    progress = generation / max(1, config.generations - 1)
    noise_std = scheduled(es.noise_std, es.noise_std_final, progress, es.schedule)
    layers = es.layers()
    # a stream per layer: runs without layer members keep every draw they had before
    layer_offsets = tuple(
        np.random.default_rng([derive_seed(config.seed, LAYER_STREAMS[layer]), generation])
        .integers(0, noise.max_offset(config.noise.table_size, num_params) + 1, size=members.pop_size // 2)
        .astype(np.int64)
        for layer, members in zip((1, 2, 3), layers)
    )
    return GenerationPlan(
        generation=generation,
        noise_std=noise_std,
        learning_rate=scheduled(es.learning_rate, es.learning_rate_final, progress, es.schedule),
        slice_offsets=slice_offsets.astype(np.int64),
        member_offsets=member_offsets.astype(np.int64),
        member_signs=member_signs,
        batch_indices=batch_indices,
        kinds=(
            kinds.whole_kind(es.rank, es.shared_first_layer, num_params, arch),
            *(
                kinds.layer_kind(layer, members.kind, members.subspace if layer < 3 else 0, arch)
                for layer, members in zip((1, 2, 3), layers)
            ),
        ),
        shard_bounds=bounds,
        tiles=make_tiles(
            es.pop_size, config.workers.members_per_tile, len(bounds), tuple(members.pop_size for members in layers)
        ),
        layer_offsets=layer_offsets,
        layer_noise_stds=tuple(noise_std * members.noise_scale for members in layers),
    )


def member_fitness(loss_sums: np.ndarray, correct: np.ndarray, batch_size: int, kind: str) -> np.ndarray:
    """Combine per-(member, shard) results, shards summed in their fixed order, into one fitness each."""
    if kind == "accuracy":
        return correct.sum(axis=1) / batch_size
    total = np.zeros(loss_sums.shape[0], dtype=np.float64)
    for shard in range(loss_sums.shape[1]):
        total = total + loss_sums[:, shard]
    return -total / batch_size


def layer1_basis(config: Config, train_images: torch.Tensor) -> torch.Tensor | None:
    """Layer-1 members' search basis (es_workers.layer_members.image_basis with es.w1's subspace and
    subspace_power), from the run's training images, never validation or test; None without them."""
    w1 = config.es.w1
    if not (w1.pop_size and w1.subspace):
        return None
    return layer_members.image_basis(train_images, w1.subspace, w1.subspace_power)
