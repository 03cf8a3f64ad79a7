"""benchmarks/families.py: compute and accuracy read from records (pure, no training)."""

from __future__ import annotations

import json

from benchmarks.families import curve, plot


def test_compute_is_generations_times_the_median_seconds_per_generation(tmp_path):
    lines = [
        {"generation": 100, "wall_s": 1.0, "validation_accuracy": 0.9},
        {"generation": 200, "wall_s": 3.0, "validation_accuracy": 0.95},
        {"generation": 300, "wall_s": 2.0, "validation_accuracy": 0.96},
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval_metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert curve(str(tmp_path / "run")) == [(200.0, 0.9), (400.0, 0.95), (600.0, 0.96)]
    summary = {"runs": {"a": {"median_wall_s": 0.5, "validation_by_generation": {"600": 0.92, "300": 0.91}}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert curve(f"{tmp_path / 'summary.json'}:a") == [(150.0, 0.91), (300.0, 0.92)]
    plot({"family": [str(tmp_path / "run"), f"{tmp_path / 'summary.json'}:a"]}, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
