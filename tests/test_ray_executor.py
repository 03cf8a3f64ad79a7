"""The Ray layer on a real local cluster: same theta as in-process, whatever the workers do."""

from __future__ import annotations

import json
import random
import sys
import threading

import pytest
import ray
import torch

from es_service import plan as planning
from es_service.driver import Trainer, TrainState
from es_service.ray_executor import RayExecutor
from es_service.runs import seed_problem
from es_workers import network, noise
from es_workers.actor import PopulationWorker
from tests.helpers import ACTIVITY, run_local, tiny_config

pytestmark = pytest.mark.ray


def make_trainer(config, mnist, run_dir, worker_class=PopulationWorker):
    run_dir.mkdir(parents=True, exist_ok=True)
    noise_seed = planning.noise_seed(config.seed)
    table = noise.make_table(noise_seed, config.noise.table_size)
    problem = seed_problem(config, mnist)
    executor = RayExecutor(problem, table, config.workers, worker_class=worker_class)
    state = TrainState(planning.seed_theta(config.seed), None, 0)
    return Trainer(config, run_dir, problem, table, noise_seed, executor, state)


def run_ray(config, mnist, run_dir, during=None, wait=True, worker_class=PopulationWorker):
    trainer = make_trainer(config, mnist, run_dir, worker_class)
    executor = trainer.executor
    if wait:
        executor.wait_until_ready()
    # the trainer runs in a thread so that ``during`` (node changes need the main thread) can act meanwhile
    stop, failure = threading.Event(), []

    def train():
        try:
            trainer.run()
        except BaseException as err:
            failure.append(err)
        finally:
            stop.set()

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    try:
        if during:
            during(trainer, stop)
        thread.join()
    finally:
        stop.set()
        thread.join()
        executor.close()
    if failure:
        raise failure[0]
    return trainer


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


LAYER_MEMBERS = ("es.pop_size=0", "es.w1.pop_size=8", "es.w1.subspace=32", "es.w2.pop_size=8", "es.w3.pop_size=8")
SYNCS = ["broadcast", "replay"]


@pytest.mark.parametrize(
    "sets",
    [
        ("es.rank=0",),
        ("es.rank=1",),
        ("es.rank=1", "es.w3.pop_size=16"),
        ("es.shared_first_layer=true",),
        LAYER_MEMBERS,
        ("workers.theta_sync=replay", "es.rank=0"),
        ("workers.theta_sync=replay", "es.rank=1", "es.w3.pop_size=16"),
        ("workers.theta_sync=replay", *LAYER_MEMBERS),
        ("workers.theta_sync=replay", *LAYER_MEMBERS, "es.w1.kind=unit", "es.w2.kind=unit", "es.w2.subspace=16"),
        ("workers.members_per_tile=300", *ACTIVITY),
        ("workers.theta_sync=replay", "workers.members_per_tile=300", "es.shard_size=32", *ACTIVITY),
    ],
)
def test_ray_workers_give_the_in_process_theta(ray_cluster, mnist, tmp_path, sets):
    config = tiny_config("workers.executor=ray", "workers.count=2", *sets)
    remote = run_ray(config, mnist, tmp_path / "ray")
    local = run_local(tiny_config(*sets), mnist, tmp_path / "local")
    assert torch.equal(remote.theta, local.theta)
    records = _records(tmp_path / "ray")
    assert records[-1]["workers_alive"] == 2
    assert sum(r["replica_mismatches"] for r in records) == 0  # one machine: replicas keep the driver's bits


def _kill_randomly(trainer, stop):
    """Kill a random ready worker every 0.25 s, but only once the run has finished a generation since
    the last kill: on a slow or busy machine a fixed kill rate could outpace worker start-up for ever."""
    rng = random.Random(0)
    last_kill_at = -1
    while not stop.wait(0.25):
        ready = [w for w in list(trainer.executor.workers.values()) if w.ready]
        if ready and trainer.generation > last_kill_at:
            ray.kill(rng.choice(ready).handle, no_restart=True)
            last_kill_at = trainer.generation


@pytest.mark.parametrize("sync", SYNCS)
def test_random_worker_kills_lose_no_generation(ray_cluster, mnist, tmp_path, sync):
    generations = 50
    overrides = [f"generations={generations}", "eval.every=100", "checkpoint.every=100"]
    config = tiny_config(
        "workers.executor=ray",
        "workers.count=3",
        "workers.members_per_tile=2",
        f"workers.theta_sync={sync}",
        *overrides,
    )
    faulty = run_ray(config, mnist, tmp_path / "faulty", during=_kill_randomly)
    clean = run_local(tiny_config("workers.members_per_tile=5", *overrides), mnist, tmp_path / "clean")
    assert faulty.generation == generations
    assert torch.equal(faulty.theta, clean.theta)
    records = _records(tmp_path / "faulty")
    assert [r["generation"] for r in records] == list(range(1, generations + 1))
    failed_in = [r["generation"] for r in records if r["worker_failures"]]
    assert len(failed_in) >= 2, failed_in  # the killer struck repeatedly, in different generations
    assert sum(r["tiles_reissued"] for r in records) >= 1
    if sync == "replay":  # each replacement joined from a snapshot; no replica ever scored on other bits
        assert sum(r["replica_resyncs"] for r in records) >= 4  # the first three, then replacements
        assert sum(r["replica_mismatches"] for r in records) == 0


def step_until(trainer, condition, limit=300):
    """Step generations (main thread: node changes need it) until condition(record) or the limit."""
    records = []
    while len(records) < limit:
        records.append(trainer.step())
        if condition(records[-1]):
            break
    return records


ELASTIC = [
    "generations=1000",
    "eval.every=1000",
    "checkpoint.every=1000",
    "workers.count=0",
    "workers.max_count=5",
    "workers.members_per_tile=1",
]


@pytest.mark.parametrize("sync", SYNCS)
def test_a_node_that_joins_mid_run_gets_workers(ray_cluster, mnist, tmp_path, sync):
    config = tiny_config("workers.executor=ray", f"workers.theta_sync={sync}", *ELASTIC)
    trainer = make_trainer(config, mnist, tmp_path / "grow")
    try:
        trainer.executor.wait_until_ready()
        before = step_until(trainer, lambda r: False, limit=3)
        node = ray_cluster.add_node(num_cpus=2)
        after = step_until(trainer, lambda r: r["workers_alive"] > 3)
        assert before[-1]["workers_alive"] == 3 and after[-1]["workers_alive"] > 3  # the new node is used
        local = run_local(tiny_config(f"generations={trainer.generation}"), mnist, tmp_path / "local")
        assert torch.equal(trainer.theta, local.theta)
    finally:
        trainer.executor.close()
        ray_cluster.remove_node(node)


@pytest.mark.parametrize("sync", SYNCS)
def test_a_node_that_leaves_mid_run_loses_nothing(ray_cluster, mnist, tmp_path, sync):
    node = ray_cluster.add_node(num_cpus=2)
    ray_cluster.wait_for_nodes()
    config = tiny_config("workers.executor=ray", f"workers.theta_sync={sync}", *ELASTIC)
    trainer = make_trainer(config, mnist, tmp_path / "shrink")
    try:
        full = step_until(trainer, lambda r: r["workers_alive"] == 5)
        assert full[-1]["workers_alive"] == 5  # workers run on the head and on the node
        ray_cluster.remove_node(node)
        after = step_until(trainer, lambda r: False, limit=10)
        assert after[-1]["workers_alive"] <= 3
        assert sum(r["worker_failures"] for r in after) >= 1
        local = run_local(tiny_config(f"generations={trainer.generation}"), mnist, tmp_path / "local")
        assert torch.equal(trainer.theta, local.theta)
    finally:
        trainer.executor.close()


def test_no_live_worker_checkpoints_and_fails(ray_cluster, mnist, tmp_path):
    from es_service.ray_executor import NoWorkersError

    config = tiny_config(
        "workers.executor=ray", "workers.count=1", "workers.cpus_per_worker=64", "workers.no_worker_timeout_s=2"
    )
    with pytest.raises(NoWorkersError, match="no worker alive"):
        run_ray(config, mnist, tmp_path / "starved", wait=False)
    from es_service import checkpoint

    assert checkpoint.load(tmp_path / "starved" / "checkpoint.pt")["generation"] == 0


DRIFT_AT = 4


class DriftingWorker(PopulationWorker):
    """A worker whose replica goes wrong once: it nudges one weight before replaying generation
    DRIFT_AT - 1's update, as a worker with other kernels (or a bad memory bit) might."""

    def evaluate_replay(self, sync_holder, batch_holder, task):
        replica = self._replica
        if task.generation == DRIFT_AT and sync_holder[1] is None and replica and replica.generation == DRIFT_AT - 1:
            replica.theta[0] += 1e-3
        result = super().evaluate_replay(sync_holder, batch_holder, task)
        if result.fingerprint != sync_holder[2]:  # drifted: no time spent scoring what will be discarded
            assert result.loss_sums.size == 0 and result.correct.size == 0, "a drifted replica scored a tile"
        return result


def test_a_drifted_replica_is_caught_within_its_generation_and_changes_nothing(ray_cluster, mnist, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests
    overrides = ["generations=8", "eval.every=100", "checkpoint.every=100"]
    config = tiny_config("workers.executor=ray", "workers.count=2", "workers.theta_sync=replay", *overrides)
    drifting = run_ray(config, mnist, tmp_path / "drift", worker_class=DriftingWorker)
    clean = run_local(tiny_config(*overrides), mnist, tmp_path / "clean")
    assert torch.equal(drifting.theta, clean.theta)
    records = _records(tmp_path / "drift")
    mismatches = [r["replica_mismatches"] for r in records]
    # record g holds generation g - 1's evaluation: the workers drift there, and only there (each tile
    # they scored before their snapshot arrived is counted and scored again)
    assert mismatches[DRIFT_AT] >= 1 and sum(mismatches) == mismatches[DRIFT_AT], mismatches
    assert records[DRIFT_AT]["replica_resyncs"] >= 1
    assert records[DRIFT_AT]["tiles_reissued"] == mismatches[DRIFT_AT]
    # a worker caught drifting gets one snapshot, with its next tile: that may be the next generation's
    # (when the others finished this one's tiles first). Its other drifted tiles need no second one.
    resyncs = [r["replica_resyncs"] for r in records]
    assert 1 <= resyncs[DRIFT_AT] + resyncs[DRIFT_AT + 1] <= 2, (resyncs, mismatches)
    assert resyncs[DRIFT_AT + 2 :] == [0] * (len(records) - DRIFT_AT - 2), resyncs


def test_replay_sends_each_worker_scalars_not_theta(ray_cluster, mnist, tmp_path):
    """P = 8192 rank-1 members on 3 workers: after the first generation's snapshots, each worker is sent
    its tiles (12 bytes a member), the minibatch and the previous update (16 kB), at most 64 kB, where
    broadcast sends theta's 2.68 MB."""
    sets = [
        "workers.executor=ray",
        "workers.count=3",
        "es.pop_size=8192",
        "es.rank=1",
        "es.batch_size=8",
        "workers.members_per_tile=512",
        "generations=3",
        "eval.every=100",
        "checkpoint.every=100",
    ]
    sent = {}
    for sync in SYNCS:
        run_ray(tiny_config(*sets, f"workers.theta_sync={sync}"), mnist, tmp_path / sync)
        sent[sync] = [r["bytes_to_worker_max"] for r in _records(tmp_path / sync)]
    theta_bytes = 4 * network.NUM_PARAMS
    assert all(theta_bytes < sent_ <= theta_bytes + 64_000 for sent_ in sent["broadcast"]), sent
    assert sent["replay"][0] > 3 * theta_bytes  # the first generation: a snapshot each
    assert all(sent_ <= 64_000 for sent_ in sent["replay"][1:]), sent
