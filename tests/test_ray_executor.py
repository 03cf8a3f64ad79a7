"""The Ray layer on a real local cluster: same theta as in-process, whatever the workers do."""

from __future__ import annotations

import random
import threading

import pytest
import ray
import torch

from es_service import plan as planning
from es_service.driver import Trainer, TrainState
from es_service.ray_executor import RayExecutor
from workers import noise
from tests.conftest import tiny_config
from tests.helpers import basis_of, run_local

pytestmark = pytest.mark.ray


def make_trainer(config, mnist, run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    noise_seed = planning.noise_seed(config.seed)
    table = noise.make_table(noise_seed, config.noise.table_size)
    basis = basis_of(config, mnist)
    executor = RayExecutor(table, mnist.train_images, mnist.train_labels, config.network.arithmetic, config.workers,
                           basis=basis)
    state = TrainState(planning.seed_theta(config.seed), None, 0)
    return Trainer(config, run_dir, mnist, table, noise_seed, executor, state, basis=basis)


def run_ray(config, mnist, run_dir, during=None, wait=True):
    trainer = make_trainer(config, mnist, run_dir)
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


@pytest.mark.parametrize("sets", [("es.rank=0",), ("es.rank=1",), ("es.rank=1", "es.w3.pop_size=16"),
                                  ("es.shared_first_layer=true",),
                                  ("es.pop_size=0", "es.w1.pop_size=8", "es.w1.subspace=32", "es.w2.pop_size=8",
                                   "es.w3.pop_size=8")])
def test_ray_workers_give_the_in_process_theta(ray_cluster, mnist, tmp_path, sets):
    config = tiny_config("workers.executor=ray", "workers.count=2", *sets)
    remote = run_ray(config, mnist, tmp_path / "ray")
    local = run_local(tiny_config(*sets), mnist, tmp_path / "local")
    assert torch.equal(remote.theta, local.theta)
    record = (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"workers_alive": 2' in record


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


def test_random_worker_kills_lose_no_generation(ray_cluster, mnist, tmp_path):
    generations = 40
    overrides = [f"generations={generations}", "eval.every=100", "checkpoint.every=100"]
    config = tiny_config("workers.executor=ray", "workers.count=3", "workers.members_per_tile=2", *overrides)
    faulty = run_ray(config, mnist, tmp_path / "faulty", during=_kill_randomly)
    clean = run_local(tiny_config("workers.members_per_tile=5", *overrides), mnist, tmp_path / "clean")
    assert faulty.generation == generations
    assert torch.equal(faulty.theta, clean.theta)
    import json

    records = [json.loads(line) for line in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == list(range(1, generations + 1))
    failed_in = [r["generation"] for r in records if r["worker_failures"]]
    assert len(failed_in) >= 2, failed_in  # the killer struck repeatedly, in different generations
    assert sum(r["tiles_reissued"] for r in records) >= 1


def _records(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_until(trainer, condition, limit=300):
    """Step generations (main thread: node changes need it) until condition(record) or the limit."""
    records = []
    while len(records) < limit:
        records.append(trainer.step())
        if condition(records[-1]):
            break
    return records


ELASTIC = ["generations=1000", "eval.every=1000", "checkpoint.every=1000", "workers.count=0",
           "workers.max_count=5", "workers.members_per_tile=1"]


def test_a_node_that_joins_mid_run_gets_workers(ray_cluster, mnist, tmp_path):
    trainer = make_trainer(tiny_config("workers.executor=ray", *ELASTIC), mnist, tmp_path / "grow")
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


def test_a_node_that_leaves_mid_run_loses_nothing(ray_cluster, mnist, tmp_path):
    node = ray_cluster.add_node(num_cpus=2)
    ray_cluster.wait_for_nodes()
    trainer = make_trainer(tiny_config("workers.executor=ray", *ELASTIC), mnist, tmp_path / "shrink")
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

    config = tiny_config("workers.executor=ray", "workers.count=1", "workers.cpus_per_worker=64",
                         "workers.no_worker_timeout_s=2")
    with pytest.raises(NoWorkersError, match="no worker alive"):
        run_ray(config, mnist, tmp_path / "starved", wait=False)
    from es_service import checkpoint

    assert checkpoint.load(tmp_path / "starved" / "checkpoint.pt")["generation"] == 0
