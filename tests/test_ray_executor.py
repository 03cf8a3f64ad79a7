"""The Ray layer on a real local cluster: same theta as in-process, whatever the workers do."""

from __future__ import annotations

import random
import threading
import time

import pytest
import ray
import torch

from es_service import network, noise, plan as planning
from es_service.driver import Trainer, TrainState
from es_service.ray_executor import RayExecutor
from tests.conftest import tiny_config
from tests.test_driver import run_local

pytestmark = pytest.mark.ray


def run_ray(config, mnist, run_dir, during=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    noise_seed = planning.derive_seed(config.seed, planning.STREAM_NOISE)
    table = noise.make_table(noise_seed, config.noise.table_size)
    executor = RayExecutor(table, mnist.train_images, mnist.train_labels, config.network.arithmetic, config.workers)
    state = TrainState(network.init_theta(planning.derive_seed(config.seed, planning.STREAM_INIT)), None, 0)
    trainer = Trainer(config, run_dir, mnist, table, noise_seed, executor, state)
    stop = threading.Event()
    thread = threading.Thread(target=during, args=(executor, stop), daemon=True) if during else None
    if thread:
        thread.start()
    try:
        trainer.run()
    finally:
        stop.set()
        if thread:
            thread.join()
        executor.close()
    return trainer


def test_ray_workers_give_the_in_process_theta(ray_cluster, mnist, tmp_path):
    config = tiny_config("workers.executor=ray", "workers.count=2")
    remote = run_ray(config, mnist, tmp_path / "ray")
    local = run_local(tiny_config(), mnist, tmp_path / "local")
    assert torch.equal(remote.theta, local.theta)
    record = (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"workers_alive": 2' in record


def _kill_randomly(executor, stop):
    rng = random.Random(0)
    while not stop.wait(0.4):
        ready = [w for w in list(executor.workers.values()) if w.ready]
        if ready:
            ray.kill(rng.choice(ready).handle, no_restart=True)


def test_random_worker_kills_lose_no_generation(ray_cluster, mnist, tmp_path):
    generations = 30
    overrides = [f"generations={generations}", "eval.every=100", "checkpoint.every=100"]
    config = tiny_config("workers.executor=ray", "workers.count=3", "workers.members_per_tile=2", *overrides)
    faulty = run_ray(config, mnist, tmp_path / "faulty", during=_kill_randomly)
    clean = run_local(tiny_config("workers.members_per_tile=5", *overrides), mnist, tmp_path / "clean")
    assert faulty.generation == generations
    assert torch.equal(faulty.theta, clean.theta)
    import json

    records = [json.loads(line) for line in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == list(range(1, generations + 1))
    assert sum(r["worker_failures"] for r in records) >= 3  # the killer really did its work
    assert sum(r["tiles_reissued"] for r in records) >= 1
