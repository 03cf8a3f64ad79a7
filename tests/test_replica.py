"""es_service/replica.py: an update is O(P) scalars, and a replica that replays it keeps the driver's bits."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from es_service import plan as planning
from es_service.executors import GenerationOutcome
from es_service.replica import Replica
from es_service.strategy import Update, shaped_update
from es_workers import layer_members, noise
from es_workers.ftz_mnist import FtzMnist
from tests.helpers import tiny_config

NUM_TRAIN = 1000
LAYER_MEMBERS = ("es.pop_size=0", "es.w1.pop_size=8", "es.w1.subspace=32", "es.w2.pop_size=8", "es.w3.pop_size=8")


def scored(config, generation: int, rng: np.random.Generator) -> tuple[planning.GenerationPlan, GenerationOutcome]:
    """A generation's plan and an outcome with random loss sums (the replica's math does not care how
    they were scored)."""
    plan = planning.make_plan(config, generation, NUM_TRAIN)
    outcome = GenerationOutcome.empty(plan)
    for group in range(4):
        loss_sums, correct = outcome.results(group)
        loss_sums[:] = rng.uniform(50.0, 80.0, size=loss_sums.shape)
        correct[:] = rng.integers(0, len(plan.batch_indices), size=correct.shape)
    return plan, outcome


def problem_of(mnist, basis=None) -> FtzMnist:
    return FtzMnist(mnist.train_images[:NUM_TRAIN], mnist.train_labels[:NUM_TRAIN], basis=basis)


def replica_of(config, table, problem) -> Replica:
    return Replica(config, planning.seed_theta(config.seed), 0, table=table, problem=problem)


@pytest.mark.parametrize(
    "sets",
    [
        ("es.rank=0",),
        ("es.rank=1", "es.w3.pop_size=16"),
        LAYER_MEMBERS,
        (*LAYER_MEMBERS, "es.w1.kind=unit", "es.w2.kind=unit"),
    ],
)
def test_a_replica_from_a_snapshot_follows_the_driver_bit_for_bit(mnist, sets):
    config = tiny_config(*sets)
    table = noise.make_table(planning.noise_seed(config.seed), config.noise.table_size)
    basis = layer_members.image_basis(mnist.train_images, 32) if config.es.w1.subspace else None
    problem = problem_of(mnist, basis)
    driver, rng = replica_of(config, table, problem), np.random.default_rng(0)
    driver.apply(shaped_update(config, *scored(config, 0, rng))[0])
    worker = pickle.loads(pickle.dumps(driver)).attach(
        table, pickle.loads(pickle.dumps(problem))
    )  # a snapshot, as a late joiner gets it
    assert worker.generation == 1 and worker.fingerprint() == driver.fingerprint()
    for generation in range(1, 4):
        plan, outcome = scored(config, generation, rng)
        update = shaped_update(config, plan, outcome)[0]
        driver.apply(update, plan)
        worker.apply(pickle.loads(pickle.dumps(update)))  # the worker derives its own plan
        assert torch.equal(worker.theta, driver.theta)
    assert worker.fingerprint() == driver.fingerprint()
    for mine, theirs in zip(
        worker.adam.state_dict()["state"][0].values(), driver.adam.state_dict()["state"][0].values()
    ):
        assert torch.equal(torch.as_tensor(mine), torch.as_tensor(theirs))


def test_the_fingerprint_sees_one_changed_bit():
    config = tiny_config()
    replica = replica_of(config, None, None)
    before = replica.fingerprint()
    bits = replica.theta.view(torch.int32)
    bits[12345] ^= 1
    replica._fingerprint = None
    assert replica.fingerprint() != before


def test_an_update_of_another_generation_is_refused():
    config = tiny_config()
    replica = replica_of(config, noise.make_table(1, config.noise.table_size), None)
    stale = Update(1, tuple(np.zeros(0, dtype=np.float32) for _ in range(4)))
    with pytest.raises(ValueError, match="update of generation 1 for a replica at 0"):
        replica.apply(stale)


def test_a_skipped_update_moves_the_generation_not_theta(mnist):
    config = tiny_config()
    replica = replica_of(config, noise.make_table(1, config.noise.table_size), problem_of(mnist))
    plan = planning.make_plan(config, 0, NUM_TRAIN)
    update, fitness = shaped_update(config, plan, GenerationOutcome.empty(plan))  # nobody scored
    assert update.skipped and not np.isfinite(fitness).any()
    before = replica.theta.clone()
    replica.apply(update, plan)
    assert replica.generation == 1 and torch.equal(replica.theta, before)


def test_an_update_is_one_float_per_noise_slice():
    """8192 antithetic members: 4096 slices of 4 bytes, well inside 64 kB (theta is 2.68 MB)."""
    config = tiny_config("es.pop_size=8192", "es.rank=1", "es.w3.pop_size=512")
    update = shaped_update(config, *scored(config, 0, np.random.default_rng(1)))[0]
    assert [len(weights) for weights in update.weights] == [4096, 0, 0, 256]
    assert all(weights.dtype == np.float32 for weights in update.weights)
    assert update.nbytes == 4 * (4096 + 256) + 9 and len(pickle.dumps(update)) < 64_000
