"""The driver loop with the in-process executor (no Ray): determinism, invariance, robustness."""

from __future__ import annotations

import pytest
import torch

from es_service import plan as planning
from es_service.driver import TrainState
from es_workers import layer_members, network
from tests.helpers import ACTIVITY, run_local, tiny_config


def test_same_config_and_seed_give_bitwise_same_theta(mnist, tmp_path):
    a = run_local(tiny_config(), mnist, tmp_path / "a")
    b = run_local(tiny_config(), mnist, tmp_path / "b")
    assert torch.equal(a.theta, b.theta) and a.generation == 4
    c = run_local(tiny_config("seed=4"), mnist, tmp_path / "c")
    assert not torch.equal(a.theta, c.theta)


@pytest.mark.parametrize("rank", ["es.rank=0", "es.rank=1", "es.shared_first_layer=true"])
def test_tile_size_does_not_change_theta(mnist, tmp_path, rank):
    """members_per_tile 1 splits every antithetic pair: a shared first layer's members score the same alone.
    The local executor's merged call (one per shard) gives the same theta as its planned tiles."""
    a = run_local(tiny_config("workers.members_per_tile=1", rank), mnist, tmp_path / "a", merge_tiles=False)
    b = run_local(tiny_config("workers.members_per_tile=8", rank), mnist, tmp_path / "b", merge_tiles=False)
    merged = run_local(tiny_config("workers.members_per_tile=1", rank), mnist, tmp_path / "merged")
    assert torch.equal(a.theta, b.theta) and torch.equal(a.theta, merged.theta)


@pytest.mark.parametrize("variant", [("es.rank=2",), ("es.shared_first_layer=true", "es.fitness_shaping=normalized")])
def test_other_evaluations_are_deterministic_and_differ_from_full_rank(mnist, tmp_path, variant):
    """A shared first layer changes only the losses' last bits: under centered ranks the members' order,
    and so theta, usually stays the same; z-scores carry the difference into theta."""
    a = run_local(tiny_config(*variant), mnist, tmp_path / "a")
    b = run_local(tiny_config(*variant), mnist, tmp_path / "b")
    full = run_local(tiny_config(*variant[1:]), mnist, tmp_path / "full")
    assert torch.equal(a.theta, b.theta) and not torch.equal(a.theta, full.theta)


LAYER_SETS = {
    1: ("es.w1.pop_size=16", "es.w1.subspace=32"),
    2: ("es.w2.pop_size=16",),
    3: ("es.w3.pop_size=64",),
    "unit 1": ("es.w1.pop_size=16", "es.w1.subspace=32", "es.w1.kind=unit"),
    "unit 2": ("es.w2.pop_size=16", "es.w2.kind=unit"),
    "activity 1": ("es.w1.pop_size=1024", "es.w1.kind=activity", "es.noise_std=0.3"),
    "activity 2": ("es.w2.pop_size=1024", "es.w2.kind=activity", "es.noise_std=0.3"),
    "activity 3": ("es.w3.pop_size=20", "es.w3.kind=activity", "es.noise_std=0.3"),
}


@pytest.mark.parametrize("name", list(LAYER_SETS))
def test_layer_members_move_only_their_layers_estimate(mnist, tmp_path, name):
    """A layer's members change that layer's estimate and nothing else: Adam is per coordinate, so after
    one generation every other parameter is bitwise what it is without them (later generations differ
    everywhere, since the members then start from another theta). Tile size and shards never matter."""
    layer = int(str(name)[-1])
    start, stop = layer_members.param_range(layer)
    inside = torch.zeros(network.NUM_PARAMS, dtype=torch.bool)
    inside[start:stop] = True
    sigma = [setting for setting in LAYER_SETS[name] if setting.startswith("es.noise_std")]  # the whole members' too
    plain = run_local(tiny_config("es.rank=1", *sigma), mnist, tmp_path / "plain", generations=1)
    one = run_local(tiny_config("es.rank=1", *LAYER_SETS[name]), mnist, tmp_path / "one", generations=1)
    assert torch.equal(one.theta[~inside], plain.theta[~inside]) and not torch.equal(
        one.theta[inside], plain.theta[inside]
    )
    tile = 100 if str(name).startswith("activity") else 1  # 1024 one-member tiles of activity members: slow, no news
    b = run_local(
        tiny_config("es.rank=1", *LAYER_SETS[name], f"workers.members_per_tile={tile}", "es.shard_size=16"),
        mnist,
        tmp_path / "b",
        merge_tiles=False,
    )
    sharded = run_local(tiny_config("es.rank=1", *LAYER_SETS[name], "es.shard_size=16"), mnist, tmp_path / "s")
    assert torch.equal(b.theta, sharded.theta)


def test_layer_members_alone_train_every_layer_deterministically(mnist, tmp_path):
    """With no whole members, each layer learns from its own members only: every layer moves, the same
    config gives the same theta bit for bit, and another subspace gives another."""
    sets = ("es.pop_size=0", "es.w1.pop_size=8", "es.w1.subspace=32", "es.w2.pop_size=8", "es.w3.pop_size=8")
    a = run_local(tiny_config(*sets), mnist, tmp_path / "a")
    b = run_local(tiny_config(*sets), mnist, tmp_path / "b")
    assert torch.equal(a.theta, b.theta)
    start = planning.seed_theta(3)
    for layer in layer_members.LAYERS:
        low, high = layer_members.param_range(layer)
        assert not torch.equal(a.theta[low:high], start[low:high]), layer
    other = run_local(tiny_config(*sets[:2], "es.w1.subspace=16", *sets[3:]), mnist, tmp_path / "other")
    assert not torch.equal(a.theta, other.theta)
    units = run_local(tiny_config(*sets, "es.w1.kind=unit", "es.w2.kind=unit"), mnist, tmp_path / "units")
    again = run_local(tiny_config(*sets, "es.w1.kind=unit", "es.w2.kind=unit"), mnist, tmp_path / "again")
    assert torch.equal(units.theta, again.theta) and not torch.equal(units.theta, a.theta)


def test_theta_moves_and_metrics_are_recorded(mnist, tmp_path):
    trainer = run_local(tiny_config(), mnist, tmp_path)
    assert not torch.equal(trainer.theta, planning.seed_theta(3))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert '"test_accuracy"' in lines[1] and '"test_accuracy"' not in lines[0]  # eval.every = 2


def test_nonfinite_fitness_never_poisons_theta(mnist, tmp_path):
    base = tiny_config("generations=2")  # a sigma past validate()'s bound, so that members overflow
    config = base.model_copy(update={"es": base.es.model_copy(update={"noise_std": 1e12})})
    trainer = run_local(config, mnist, tmp_path)
    records = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any('"nonfinite": 0' not in line for line in records)  # some members overflowed
    assert torch.isfinite(trainer.theta).all()


UNITS = (
    "es.rank=1",
    "es.w1.pop_size=8",
    "es.w1.subspace=32",
    "es.w1.kind=unit",
    "es.w2.pop_size=8",
    "es.w2.kind=unit",
    "es.w2.subspace=16",
)


def test_unit_members_in_subspaces_do_not_depend_on_tiles_or_shards(mnist, tmp_path):
    """Layer-2 members' subspace follows W1 (hidden_basis): every tile and the estimate rebuild it from
    the same theta, so one member per tile over two shards gives the merged run's theta bit for bit."""
    tiny = run_local(
        tiny_config(*UNITS, "workers.members_per_tile=1", "es.shard_size=16"), mnist, tmp_path / "t", merge_tiles=False
    )
    assert torch.equal(tiny.theta, run_local(tiny_config(*UNITS, "es.shard_size=16"), mnist, tmp_path / "m").theta)


def test_activity_members_do_not_depend_on_tiles_or_shards_and_train_every_layer(mnist, tmp_path):
    """Activity members read every image's loss: tiles of 100 members (no chunk boundary) over four
    shards give the merged run's theta bit for bit, the same config gives the same theta, and every
    layer moves."""
    split = run_local(
        tiny_config(*ACTIVITY, "workers.members_per_tile=100", "es.shard_size=16"),
        mnist,
        tmp_path / "split",
        merge_tiles=False,
    )
    merged = run_local(tiny_config(*ACTIVITY, "es.shard_size=16"), mnist, tmp_path / "merged")
    again = run_local(tiny_config(*ACTIVITY), mnist, tmp_path / "again")
    assert torch.equal(split.theta, merged.theta) and torch.equal(merged.theta, again.theta)
    start = planning.seed_theta(3)
    for layer in layer_members.LAYERS:
        low, high = layer_members.param_range(layer)
        assert not torch.equal(again.theta[low:high], start[low:high]), layer
    assert not torch.equal(again.theta, run_local(tiny_config(*ACTIVITY, "seed=4"), mnist, tmp_path / "s4").theta)


@pytest.mark.parametrize("sets", [(), UNITS, ACTIVITY], ids=["whole members", "unit members", "activity members"])
def test_checkpoint_then_continue_equals_uninterrupted(mnist, tmp_path, sets):
    from es_service import checkpoint

    full = run_local(tiny_config(*sets), mnist, tmp_path / "full")
    run_local(tiny_config(*sets), mnist, tmp_path / "part", generations=2)
    state = checkpoint.load(tmp_path / "part" / "checkpoint.pt")
    assert state["generation"] == 2
    resumed = run_local(
        tiny_config(*sets),
        mnist,
        tmp_path / "part",
        state=TrainState(state["theta"], state["optimizer"], state["generation"]),
    )
    assert torch.equal(resumed.theta, full.theta)


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard reads back from a run directory's event files, as (step, value) lists."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_metrics_go_to_tensorboard_and_a_resume_drops_what_came_after_its_checkpoint(mnist, tmp_path):
    """The event files hold every numeric metric of every generation, as metrics.jsonl does; a run
    resumed from generation 2 after generations 3 and 4 were logged leaves one value per step."""
    pytest.importorskip("tensorboard")
    import json

    from es_service import checkpoint

    run_local(tiny_config(), mnist, tmp_path, generations=2)
    kept = checkpoint.load(tmp_path / "checkpoint.pt")
    for _ in range(2):  # generations 3 and 4, then again from the checkpoint at 2
        run_local(tiny_config(), mnist, tmp_path, state=TrainState(kept["theta"], kept["optimizer"], 2))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(tmp_path)
    assert [step for step, _ in scalars["fitness_mean"]] == [1, 2, 3, 4]
    for name in ("fitness_mean", "theta_norm", "step_norm"):
        assert [step for step, _ in scalars[name]] == [r["generation"] for r in records]
        assert [value for _, value in scalars[name]] == pytest.approx([r[name] for r in records], rel=1e-6)
    assert [step for step, _ in scalars["test_accuracy"]] == [2, 4]
