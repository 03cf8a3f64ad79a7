"""benchmarks/peer.py: without EvoTorch it stops at once and names the fix; its rounds alternate the two
sides; its summary's medians and ratios are what they say; and, where EvoTorch is installed, a tiny
measurement of both writes every field. No assertion on how fast anything is."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import peer
from es_workers import network

ROOT = Path(__file__).resolve().parent.parent
THETA_BYTES = 4 * network.NUM_PARAMS


def test_without_the_peer_the_benchmark_exits_naming_the_fix(tmp_path):
    blocked = tmp_path / "blocked" / "evotorch"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("blocked for this test")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked.parent), str(ROOT)])}
    out = tmp_path / "peer.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.peer", "--rounds", "1", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "pip install evotorch==0.6.1" in result.stderr and ".[peer]" in result.stderr, result.stderr
    assert "blocked for this test" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_require_peer_raises_peer_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "evotorch", None)  # import evotorch now raises ImportError
    with pytest.raises(peer.PeerMissing, match="pip install evotorch==0.6.1"):
        peer.require_peer()


def test_rounds_alternate_the_sides_and_time_every_generation():
    calls = []
    times = peer.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, generations=2)
    assert calls == ["a", "a", "b", "b"] * 3
    assert set(times) == {"a", "b"}
    for side in times.values():
        assert [len(generations) for generations in side] == [2, 2, 2]  # one time recorded per generation
        assert all(isinstance(time, float) for generations in side for time in generations)


def test_summary_takes_medians_over_all_generations_and_ratios_per_round():
    evotorch = [[1.0, 3.0], [2.0, 2.0], [9.0, 9.0]]  # all: 1 2 2 3 9 9 -> median 2.5
    ours = [[0.5, 0.5], [1.0, 1.0], [1.0, 2.0]]  # all: 0.5 0.5 1 1 1 2 -> median 1
    summary = peer.summarize(evotorch, ours)
    assert summary["rounds"] == 3
    assert summary["peer_median_s"] == pytest.approx(2.5)
    assert summary["ours_median_s"] == pytest.approx(1.0)
    assert summary["ratio"] == pytest.approx(2.5)
    assert summary["ratio_per_round"] == pytest.approx([4.0, 2.0, 6.0])
    assert summary["ratio_per_round_median"] == pytest.approx(4.0)
    assert summary["ratio_per_round_range"] == pytest.approx([2.0, 6.0])


@pytest.mark.parametrize(
    ("evotorch", "ours"),
    [([], []), ([[1.0]], []), ([[1.0]], [[1.0], [1.0]]), ([[1.0]], [[]]), ([[1.0]], [[0.0]]), ([[-1.0]], [[1.0]])],
)
def test_summary_refuses_unequal_empty_or_non_positive_rounds(evotorch, ours):
    with pytest.raises(ValueError):
        peer.summarize(evotorch, ours)


@pytest.mark.ray
@pytest.mark.skipif(
    importlib.util.find_spec("evotorch") is None, reason="needs the peer extra: pip install -e '.[peer]'"
)
def test_a_tiny_measurement_writes_both_medians_their_ratio_and_the_device(ray_cluster, tmp_path):
    node = ray_cluster.add_node(num_cpus=1)  # two actors of each side, one CPU each: the head has 3
    ray_cluster.wait_for_nodes()
    out = tmp_path / "peer.json"
    try:
        peer.main(["--pop-size", "8", "--generations", "2", "--rounds", "1", "--warmup", "1", "--json", str(out)])
    finally:
        ray_cluster.remove_node(node)
    data = json.loads(out.read_text())
    assert data["benchmark"] == "peer"
    for field in ("device", "torch", "cpu", "cpu_model", "cores", "ray", "date", "commit", "command"):
        assert data[field], field
    assert data["peer"] == {
        "library": "evotorch",
        "version": peer.PEER_VERSION,
        "algorithm": "PGPE",
        "optimizer": "adam",
        "distributed": True,
    }
    setting = data["setting"]
    assert (setting["pop_size"], setting["batch_size"], setting["workers"]) == (8, 256, 2)
    assert (setting["rounds"], setting["generations_per_round"], setting["arithmetic"]) == (1, 2, "tf-ftz")
    for side in ("evotorch", "ours"):
        recorded = data[side]["times_s"]  # the record's bookkeeping, not a speed
        assert [len(generations) for generations in recorded] == [2], side
        assert data[side]["median_s"] == statistics.median(recorded[0]), side
    # EvoTorch sends each actor its center and standard deviations; ours sends theta once per worker
    assert data["evotorch"]["bytes_sent_per_generation"] >= 2 * 2 * THETA_BYTES
    assert data["ours"]["bytes_sent_per_generation"] >= THETA_BYTES
    assert data["ratio"] > 0 and data["ratio_per_round_median"] > 0
    assert data["ratio"] == pytest.approx(data["evotorch"]["median_s"] / data["ours"]["median_s"])
    assert len(data["ratio_per_round"]) == 1
