"""benchmarks/scale.py in its quick mode: every section of the JSON is there, every figure finite, every
time positive, and the byte counts add up; --reuse recomputes bytes and projection without measuring.
No assertion on how fast anything is."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import scale
from es_service.config import from_dict


def numbers(node, path=""):
    """(path, value) of every number in a JSON tree, booleans left out."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from numbers(value, f"{path}[{index}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


@pytest.mark.ray
def test_quick_mode_writes_every_constant_and_the_projection(ray_cluster, tmp_path):
    out = tmp_path / "scale.json"
    scale.main(["--quick", "--repeats", "1", "--json", str(out)], cluster=ray_cluster)
    data = json.loads(out.read_text())
    for field in ("cpu_model", "cores", "torch", "ray", "date", "commit", "command"):
        assert data[field], field
    assert data["quick"] is True

    for rank in ("rank0", "rank1"):
        rows = data["driver"][rank]["rows"]
        assert [row["pop_size"] for row in rows] == scale.QUICK["pop_sizes"]
        for row in rows:
            assert min(row["plan_s"], row["shape_s"], row["estimate_s"]) > 0
        assert set(data["driver"][rank]["fits"]) == {"plan_s", "shape_s", "estimate_s"}
    assert data["driver"]["adam_s"] > 0

    dispatch = data["dispatch"]
    assert [row["actors"] for row in dispatch["rows"]] == scale.QUICK["actors"]
    for row in dispatch["rows"]:
        tile_counts = [k * row["actors"] for k in scale.QUICK["tiles_per_actor"]]
        assert [point["tiles"] for point in row["points"]] == tile_counts
        assert all(point["generation_s"] > 0 and point["driver_cpu_s"] > 0 for point in row["points"])
        assert row["actor_uss_mb"] > 0 and row["nodes_used"] >= 1
    assert set(dispatch["driver_cpu_s_fit"]) == {"intercept", "per_actor", "per_tile"}

    sizes = data["bytes"]
    assert sizes["theta_bytes"] == 2_678_824 and sizes["snapshot_bytes"] == 3 * 2_678_824
    for row in sizes["rows"]:
        assert row["replay_update_bytes"] == 4 * (row["pop_size"] // 2) + 9  # Update.nbytes
        assert row["batch_bytes"] == 8 * row["batch_size"]
        assert row["task_bytes_total"] == 12 * row["pop_size"] + 32 * row["tiles"]  # no image indices
        for workers, per_worker in row["per_worker"].items():
            shared = row["batch_bytes"] + row["task_bytes_total"] / int(workers)
            assert per_worker["broadcast"] == pytest.approx(2_678_824 + shared)
            assert per_worker["replay"] == pytest.approx(row["replay_update_bytes"] + shared)

    projection = data["projection"]
    assert {row["mode"] for row in projection["rows"]} == set(scale.MODES)
    assert {row["workers"] for row in projection["rows"]} == set(scale.WORKER_COUNTS)
    for row in projection["rows"]:
        assert row["generation_s"] > 0 and 0 < row["gpu_efficiency"] <= 1
    assert "| 8,192 |" in scale.projection_table(projection, large_tiles=True)

    for path, value in numbers(data):
        assert math.isfinite(value), path


def test_replay_sends_each_worker_kilobytes_and_broadcast_theta():
    per_worker = scale.bytes_row(from_dict({"es": {"pop_size": 8192}}), [8])["per_worker"]["8"]
    assert per_worker["replay"] <= 64_000
    assert per_worker["broadcast"] >= scale.THETA_BYTES


def measured_run() -> dict:
    """A scale.json as a measurement left it: lines for the driver's times, a dispatch fit, stale rest."""

    def driver_rank(estimate_per_member_s: float) -> dict:
        slopes = {"plan_s": 1e-6, "shape_s": 5e-7, "estimate_s": estimate_per_member_s}
        return {
            "rows": [{"pop_size": 16000, "estimate_extrapolated": False}],
            "fits": {name: {"intercept": 0.0, "slope": slope} for name, slope in slopes.items()},
        }

    return {
        "benchmark": "scale",
        "date": "2000-01-01",
        "commit": "0" * 40,
        "command": "measured",
        "driver": {"adam_s": 0.005, "rank0": driver_rank(1e-3), "rank1": driver_rank(3e-5)},
        "dispatch": {
            "rows": [{"actors": 16}],
            "driver_cpu_s_fit": {"intercept": -0.01, "per_actor": 1e-3, "per_tile": 1e-3},
        },
        "bytes": "stale",
        "projection": "stale",
    }


def test_reuse_keeps_the_measured_constants_and_recomputes_bytes_and_projection(tmp_path):
    measured = measured_run()
    path = tmp_path / "scale.json"
    path.write_text(json.dumps(measured))
    scale.main(["--reuse", str(path)])
    data = json.loads(path.read_text())
    for field in ("date", "commit", "command", "driver", "dispatch"):
        assert data[field] == measured[field], field
    assert data["recomputed"]["sections"] == ["bytes", "projection"] and len(data["recomputed"]["commit"]) == 40
    assert [row["pop_size"] for row in data["bytes"]["rows"]] == scale.BYTES_POP_SIZES
    assert {row["mode"] for row in data["projection"]["rows"]} == set(scale.MODES)
    for row in data["projection"]["rows"]:
        assert row["generation_s"] > 0 and 0 < row["gpu_efficiency"] <= 1
        assert (row["worker_update_s"] > 0) == (row["sync"] == "replay")
