"""Shared fixtures: real MNIST (ES_DATA_DIR in CI), one local Ray per session, and a guard on the memory
each test adds to the pytest process. The tiny config and other plain functions are in tests/helpers.py."""

from __future__ import annotations

import os
import resource
import sys

import pytest


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


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A CLI subprocess's environment with one MNIST cache per module (the first run fills it)."""
    from tests.helpers import cli_env, mnist_dir

    mnist_dir()
    return cli_env(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(scope="module")
def beside(env, tmp_path_factory):
    """A finished tiny run that no command names: each must leave it byte for byte as it is."""
    from tests.helpers import finished_run

    return finished_run(tmp_path_factory.mktemp("beside"), env, "generations=2")


@pytest.fixture(scope="session")
def ray_cluster():
    """One multi-node-capable local Ray cluster for the whole Ray layer (ray.cluster_utils.Cluster).

    The head has 3 logical CPUs so several 1-CPU actors fit on this 2-core machine; tests that add
    nodes remove them again.
    """
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


RSS_GROWTH_LIMIT_MB = float(os.environ.get("ES_TEST_RSS_GROWTH_LIMIT_MB", 3 * 1024))
"""Most a single test may raise the pytest process's peak resident memory (MB). The suite shares a
24 GB machine with other work: a test that materialises gigabytes fails where it is written instead of
pushing the whole run towards the OOM killer. Subprocesses (the CLI, Ray workers) are not counted."""


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux), in MB; None where there is no such file."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux: "5" to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@pytest.fixture(autouse=True)
def memory_guard(request):
    """Fail a test that raises the process's resident memory by more than RSS_GROWTH_LIMIT_MB at its peak.

    On Linux the peak is reset as the test starts, so the test's own peak above its starting RSS is
    measured, whatever earlier tests or imports reached. Elsewhere the lifetime peak is the fallback
    (a test that stays under an earlier peak passes whatever it allocates)."""
    exact = _reset_peak() and _status_mb("VmHWM") is not None
    before = _status_mb("VmRSS") if exact else peak_rss_mb()
    yield
    grown = (_status_mb("VmHWM") if exact else peak_rss_mb()) - before
    if grown > RSS_GROWTH_LIMIT_MB:
        pytest.fail(
            f"{request.node.nodeid} raised the test process's peak RSS by {grown:,.0f} MB "
            f"(limit {RSS_GROWTH_LIMIT_MB:,.0f} MB, ES_TEST_RSS_GROWTH_LIMIT_MB): reduce on the fly "
            "instead of stacking large tensors",
            pytrace=False,
        )


def pytest_terminal_summary(terminalreporter):
    """How many generated inputs the fuzz tests tried, and how many of those tests failed."""
    from tests.helpers import FUZZ_EXAMPLES

    if not FUZZ_EXAMPLES:
        return
    failed = sum("test_fuzz_inputs" in report.nodeid for report in terminalreporter.stats.get("failed", []))
    tried = ", ".join(f"{count} {outcome}" for outcome, count in sorted(FUZZ_EXAMPLES.items(), reverse=True))
    terminalreporter.write_line(f"fuzz: {sum(FUZZ_EXAMPLES.values())} examples tried ({tried}); {failed} failed tests")
