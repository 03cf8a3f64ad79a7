"""Shared fixtures: real MNIST (ES_DATA_DIR in CI), a tiny config, one local Ray per session."""

from __future__ import annotations

import pytest

from es_service.config import from_dict

TINY = {
    "seed": 3,
    "generations": 4,
    "es": {"pop_size": 8, "batch_size": 64, "noise_std": 0.02, "learning_rate": 0.01},
    "noise": {"table_size": 1 << 20},
    "workers": {"executor": "local", "device": "cpu", "members_per_tile": 3},
    "eval": {"every": 2, "train_size": 500},
    "checkpoint": {"every": 2},
}


def tiny_config(*overrides: str):
    """A small valid config; overrides as in --set (``es.pop_size=4``)."""
    return from_dict(TINY, list(overrides))


@pytest.fixture(scope="session")
def mnist():
    from es_service.data import load_mnist

    return load_mnist()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the Ray layer: 4 logical CPUs so several 1-CPU actors fit on 2 cores."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
