"""This folder's records, from the repository root: `python docs/results/2026-12-07-cpu-exponent/records.py RUNS NAME...`.

For each finished run RUNS/NAME it copies the config, run.json and learning curve into NAME/, keeps the
evaluation lines of metrics.jsonl (eval_metrics.jsonl), and adds the run to summary.json (final accuracies,
wall time, theta's SHA-256, validation by generation) and to flush_gap.json (the final theta's validation
accuracy in the run's arithmetic and in the `linear` one). Runs already recorded keep their entries.
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

from es_service import checkpoint
from es_service.config import load
from es_service.runs import load_data
from es_workers.evaluator import accuracy

HERE = Path(__file__).parent


def record(run: Path) -> tuple[dict, dict]:
    info = json.loads((run / "run.json").read_text())
    out = HERE / run.name
    out.mkdir(exist_ok=True)
    for name in ("config.yaml", "run.json", "learning_curve.png"):
        if (run / name).exists():
            shutil.copy(run / name, out / name)
    evaluations = [r for r in map(json.loads, (run / "metrics.jsonl").open()) if "validation_accuracy" in r]
    (out / "eval_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluations))
    theta = checkpoint.load(run / "checkpoint.pt")["theta"]
    summary = {
        "status": info["status"],
        "generation": info.get("generation"),
        "final": info.get("final"),
        "theta_sha256": hashlib.sha256(theta.numpy().tobytes()).hexdigest(),
        "wall_s_total": info.get("wall_s_total"),
        "device": info.get("device"),
        "cpu": "AMD EPYC (AVX-512), 2 cores",
        "validation_by_generation": {str(r["generation"]): r["validation_accuracy"] for r in evaluations},
    }
    config = load(run / "config.yaml")
    images, labels = load_data(config).eval_sets("cpu", config.eval.train_size)["validation"]
    arch = config.network.architecture()
    gap = {
        "validation_flushed": accuracy(theta, images, labels, config.network.arithmetic, arch=arch),
        "validation_unflushed": accuracy(theta, images, labels, "linear", arch=arch),
    }
    return summary, gap


def main(runs: Path, names: list[str]) -> None:
    summary = json.loads((HERE / "summary.json").read_text())
    gaps = json.loads((HERE / "flush_gap.json").read_text())
    for name in names:
        summary["runs"][name], gaps[name] = record(runs / name)
        print(name, summary["runs"][name]["final"], summary["runs"][name]["theta_sha256"][:8], gaps[name])
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (HERE / "flush_gap.json").write_text(json.dumps(gaps, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
