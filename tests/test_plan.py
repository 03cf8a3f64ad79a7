"""Generation plans: a pure function of (config, generation); tiles cover every (member, shard) once."""

from __future__ import annotations

import numpy as np
import pytest

from es_service import plan as planning
from tests.conftest import tiny_config


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
    assert plan.member_offsets.max() <= planning.noise.max_offset(1 << 20)
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


def test_merged_tiles_cover_each_shard_and_head_group_once():
    plan = planning.make_plan(tiny_config("workers.members_per_tile=3", "es.batch_size=100", "es.shard_size=50",
                                          "es.head_pop_size=12"), 1, 60000)
    merged = planning.merge_tiles(plan.tiles)
    assert len(plan.tiles) == 3 * 2 + 2 and len(merged) == 4
    assert sorted((t.head, t.shard, t.member_start, t.member_stop) for t in merged) == [
        (False, 0, 0, 8), (False, 1, 0, 8), (True, 0, 0, 12), (True, 1, 0, 12)]
    assert [t.tile_id for t in merged] == [0, 1, 2, 3]


def test_head_members_draw_from_their_own_stream_and_get_one_tile_per_shard():
    plain = planning.make_plan(tiny_config("es.batch_size=100", "es.shard_size=50"), 3, 60000)
    head = planning.make_plan(tiny_config("es.batch_size=100", "es.shard_size=50", "es.head_pop_size=12"), 3, 60000)
    for field in ("member_offsets", "member_signs", "batch_indices"):  # runs without head members are unchanged
        assert np.array_equal(getattr(plain, field), getattr(head, field))
    assert len(plain.head_offsets) == 0 and head.tiles[: len(plain.tiles)] == plain.tiles
    assert len(head.head_offsets) == 6 and len(np.unique(head.head_offsets)) == 6
    head_offsets, head_signs = head.head_members
    assert head_signs.tolist() == [1.0, -1.0] * 6
    assert np.array_equal(head_offsets[0::2], head.head_offsets)
    assert [(t.member_start, t.member_stop, t.shard) for t in head.tiles if t.head] == [(0, 12, 0), (0, 12, 1)]
    later = planning.make_plan(tiny_config("es.head_pop_size=12"), 4, 60000)
    assert not np.array_equal(later.head_offsets, planning.make_plan(tiny_config("es.head_pop_size=12"), 3, 60000).head_offsets)


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
