"""Generation plans: a pure function of (config, generation); tiles cover every (member, shard) once."""

from __future__ import annotations

import numpy as np
import pytest

from es_service import plan as planning
from es_workers import network
from tests.helpers import TINY, tiny_config


def test_plan_is_a_pure_function_of_seed_and_generation():
    config = tiny_config()
    a, b = planning.make_plan(config, 5, 60000), planning.make_plan(config, 5, 60000)
    assert np.array_equal(a.member_offsets, b.member_offsets) and np.array_equal(a.batch_indices, b.batch_indices)
    c = planning.make_plan(config, 6, 60000)
    assert not np.array_equal(a.batch_indices, c.batch_indices)
    d = planning.make_plan(tiny_config("seed=4"), 5, 60000)
    assert not np.array_equal(a.member_offsets, d.member_offsets)


def test_antithetic_members_share_offsets_with_opposite_signs():
    plan = planning.make_plan(tiny_config(), 0, 60000)
    assert np.array_equal(plan.member_offsets[0::2], plan.member_offsets[1::2])
    assert plan.member_signs.tolist() == [1.0, -1.0] * 4
    assert plan.member_offsets.max() <= planning.noise.max_offset(1 << 20, network.NUM_PARAMS)
    plain = planning.make_plan(tiny_config("es.antithetic=false"), 0, 60000)
    assert (plain.member_signs == 1).all() and len(plain.slice_offsets) == 8


def test_batch_has_no_repeats_and_tiles_cover_each_member_shard_once():
    plan = planning.make_plan(tiny_config("es.batch_size=100", "es.shard_size=30"), 0, 60000)
    assert len(np.unique(plan.batch_indices)) == 100
    assert plan.shard_bounds == ((0, 30), (30, 60), (60, 90), (90, 100))
    covered = [(m, t.shard) for t in plan.tiles for m in range(t.member_start, t.member_stop)]
    assert sorted(covered) == [(m, s) for m in range(8) for s in range(4)]


def test_tile_size_does_not_change_anything_but_tiles():
    a = planning.make_plan(tiny_config("workers.members_per_tile=1"), 2, 60000)
    b = planning.make_plan(tiny_config("workers.members_per_tile=5"), 2, 60000)
    assert np.array_equal(a.member_offsets, b.member_offsets) and np.array_equal(a.batch_indices, b.batch_indices)
    assert len(a.tiles) == 8 and len(b.tiles) == 2


def test_merged_tiles_cover_each_shard_and_layer_group_once():
    plan = planning.make_plan(
        tiny_config(
            "workers.members_per_tile=3",
            "es.batch_size=100",
            "es.shard_size=50",
            "es.w3.pop_size=12",
            "es.w2.pop_size=4",
        ),
        1,
        60000,
    )
    merged = planning.merge_tiles(plan.tiles)
    assert len(plan.tiles) == 3 * 2 + 2 * 2 + 2 and len(merged) == 6
    assert sorted((t.layer, t.shard, t.member_start, t.member_stop) for t in merged) == [
        (0, 0, 0, 8),
        (0, 1, 0, 8),
        (2, 0, 0, 4),
        (2, 1, 0, 4),
        (3, 0, 0, 12),
        (3, 1, 0, 12),
    ]
    assert [t.tile_id for t in merged] == list(range(6))


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_layer_members_draw_from_their_own_stream(layer):
    """Each layer's members draw from a stream of their own: runs without them keep every other draw,
    and their offsets come in antithetic pairs. Layer 3's members get one tile per shard; layers 1 and 2
    are split by members_per_tile like whole members."""
    sets = ("es.batch_size=100", "es.shard_size=50", "workers.members_per_tile=5")
    plain = planning.make_plan(tiny_config(*sets), 3, 60000)
    moved = planning.make_plan(tiny_config(*sets, f"es.w{layer}.pop_size=12", f"es.w{layer}.noise_scale=0.5"), 3, 60000)
    for field in ("member_offsets", "member_signs", "batch_indices"):
        assert np.array_equal(getattr(plain, field), getattr(moved, field))
    assert moved.tiles[: len(plain.tiles)] == plain.tiles
    offsets = moved.layer_offsets[layer - 1]
    assert len(offsets) == 6 and len(np.unique(offsets)) == 6
    assert all(len(other) == 0 for k, other in enumerate(moved.layer_offsets, start=1) if k != layer)
    member_offsets, signs = moved.members(layer)
    assert signs.tolist() == [1.0, -1.0] * 6 and np.array_equal(member_offsets[0::2], offsets)
    assert moved.noise_std_of(layer) == pytest.approx(0.5 * moved.noise_std)
    spans = [(t.member_start, t.member_stop, t.shard) for t in moved.tiles if t.layer == layer]
    if layer == 3:
        assert spans == [(0, 12, 0), (0, 12, 1)]
    else:
        assert spans == [(0, 5, 0), (0, 5, 1), (5, 10, 0), (5, 10, 1), (10, 12, 0), (10, 12, 1)]
    streams = [
        planning.make_plan(tiny_config(f"es.w{k}.pop_size=12"), 3, 60000).layer_offsets[k - 1] for k in (1, 2, 3)
    ]
    assert not np.array_equal(streams[0], streams[1]) and not np.array_equal(streams[1], streams[2])
    later = planning.make_plan(tiny_config(f"es.w{layer}.pop_size=12"), 4, 60000)
    assert not np.array_equal(later.layer_offsets[layer - 1], streams[layer - 1])


def test_old_head_members_are_layer_three_members():
    """A config or checkpoint written with es.head_pop_size loads as es.w3.pop_size, with the same draws."""
    from es_service.config import from_dict

    old = {**TINY, "es": {**TINY["es"], "head_pop_size": 12}}
    config = from_dict(old)
    assert config.es.w3.pop_size == 12
    assert np.array_equal(
        planning.make_plan(config, 2, 60000).layer_offsets[2],
        planning.make_plan(tiny_config("es.w3.pop_size=12"), 2, 60000).layer_offsets[2],
    )


def test_member_fitness_combines_shards():
    loss_sums = np.array([[1.0, 2.0], [3.0, np.inf]])
    correct = np.array([[4, 5], [0, 1]])
    assert planning.member_fitness(loss_sums, correct, 10, "cross_entropy")[0] == pytest.approx(-0.3)
    assert not np.isfinite(planning.member_fitness(loss_sums, correct, 10, "cross_entropy")[1])
    assert planning.member_fitness(loss_sums, correct, 10, "accuracy").tolist() == [0.9, 0.1]


def test_batch_size_schedule_grows_in_shard_multiples():
    config = tiny_config("generations=11", "es.batch_size=100", "es.batch_size_final=1000", "es.shard_size=100")
    sizes = [planning.batch_size_at(config, g) for g in range(11)]
    assert sizes[0] == 100 and sizes[-1] == 1000
    assert all(s % 100 == 0 for s in sizes) and sizes == sorted(sizes)


def test_derived_seeds_are_distinct_and_stable():
    seeds = {planning.derive_seed(0, s) for s in (1, 2, 3)}
    assert len(seeds) == 3 and planning.derive_seed(0, 1) == planning.derive_seed(0, 1)
