"""Shared fixtures: real MNIST (ES_DATA_DIR in CI), a tiny config, one local Ray per session."""

from __future__ import annotations

import pytest

from es_service.config import from_dict

TINY = {
    "seed": 3,
    "generations": 4,
    "es": {"pop_size": 8, "batch_size": 64, "noise_std": 0.02, "learning_rate": 0.01},
    "noise": {"table_size": 1 << 20},
    "workers": {"executor": "local", "device": "cpu", "members_per_tile": 3, "fused": False},
    "eval": {"every": 2, "train_size": 500},
    "checkpoint": {"every": 2},
}


def tiny_config(*overrides: str):
    """A small valid config; overrides as in --set (``es.pop_size=4``)."""
    return from_dict(TINY, list(overrides))


@pytest.fixture(scope="session", autouse=True)
def mnist_folder(tmp_path_factory):
    """ES_DATA_DIR for the whole session. CI sets it; a new user's `make test` may not, so then the
    data are resolved once the way `train` does (cache, download, registry fallback; hashes checked)
    and the verified files copied to a session folder that every test and subprocess reads."""
    import gzip
    import os
    import shutil

    if os.environ.get("ES_DATA_DIR"):
        yield os.environ["ES_DATA_DIR"]
        return
    from es_service.data import SHA256, cache_dir, load_mnist

    load_mnist()
    folder = tmp_path_factory.mktemp("mnist")
    for name in SHA256:  # gzip'd, the layout CI's shared folder has
        with open(cache_dir() / "MNIST" / "raw" / name, "rb") as raw, gzip.open(folder / f"{name}.gz", "wb", 1) as out:
            shutil.copyfileobj(raw, out)
    os.environ["ES_DATA_DIR"] = str(folder)
    try:
        yield str(folder)
    finally:
        del os.environ["ES_DATA_DIR"]


@pytest.fixture(scope="session")
def mnist():
    from es_service.data import load_mnist

    return load_mnist()


@pytest.fixture(scope="session")
def ray_cluster():
    """One multi-node-capable local Ray cluster for the whole Ray layer (ray.cluster_utils.Cluster).

    The head has 3 logical CPUs so several 1-CPU actors fit on this 2-core machine; tests that add
    nodes remove them again.
    """
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 3, "include_dashboard": False})
    yield cluster
    ray.shutdown()
    cluster.shutdown()
