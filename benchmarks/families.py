"""Accuracy against compute for each family of forward-only estimators, from run records.

A record is a directory with ``run.json`` and ``eval_metrics.jsonl`` (the evaluation lines of a run's
metrics.jsonl), or a ``summary.json`` entry (``validation_by_generation`` and ``median_wall_s``), as
docs/results keeps them. Compute is measured seconds on the machine that ran it: generations times the
run's median seconds per generation (resumes and evaluations left out). Each point is the center's
validation accuracy at an evaluation.

    python -m benchmarks.families record RUN_DIR docs/results/DATE/NAME    # adds NAME to DATE/summary.json
    python -m benchmarks.families plot --out docs/results/DATE/families.png \\
        "activity perturbation (forward-only)=docs/results/2026-12-07-cpu-per-image/activity_2000_seed0_val" \\
        "ES, weight space (the seed's method)=docs/results/2026-12-01-cpu-es/summary.json:unit_members_4096_4096_1024_k32_6000gen"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path

from es_service import checkpoint


def curve(source: str) -> list[tuple[float, float]]:
    """(compute seconds, validation accuracy) at each evaluation of one record: ``DIR`` or
    ``summary.json:RUN``."""
    if ":" in source:
        path, run = source.rsplit(":", 1)
        entry = json.loads(Path(path).read_text())["runs"][run]
        seconds = entry["median_wall_s"]
        return [
            (int(g) * seconds, v) for g, v in sorted(entry["validation_by_generation"].items(), key=lambda i: int(i[0]))
        ]
    lines = [json.loads(line) for line in (Path(source) / "eval_metrics.jsonl").read_text().splitlines() if line]
    seconds = statistics.median(line["wall_s"] for line in lines)
    return [
        (line["generation"] * seconds, line["validation_accuracy"]) for line in lines if "validation_accuracy" in line
    ]


def make_record(run_dir: Path, out: Path) -> dict:
    """Copy a finished run's config, run.json and evaluation lines into ``out``; returns its summary
    (final accuracies, θ's SHA-256, wall time, median seconds per generation)."""
    out.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in records if "test_accuracy" in r]
    (out / "eval_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    for name in ("config.yaml", "run.json", "learning_curve.png"):
        if (run_dir / name).exists():
            (out / name).write_bytes((run_dir / name).read_bytes())
    run = json.loads((run_dir / "run.json").read_text())
    theta = checkpoint.load(run_dir / "checkpoint.pt")["theta"]
    return {
        "generation": run.get("generation"),
        "final": run.get("final"),
        "theta_sha256": hashlib.sha256(theta.numpy().tobytes()).hexdigest(),
        "cpu": cpu_name(),
        "wall_s_total": run.get("wall_s_total"),
        "median_wall_s": statistics.median(r["wall_s"] for r in records),
        "validation_by_generation": {
            str(r["generation"]): r["validation_accuracy"] for r in evals if "validation_accuracy" in r
        },
    }


def cpu_name() -> str:
    """The CPU's model name and its widest vector extension (theta's bits follow the kernels it picks)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return f"{name or 'unknown CPU'} ({'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'})"


def plot(families: dict[str, list[str]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    for color, (family, sources) in zip(("C0", "C1", "C2", "C3"), families.items()):
        ends = []
        for source in sources:  # each run's curve, thin; its end (a whole schedule) marked
            points = curve(source)
            axes.plot([p[0] for p in points], [100 * p[1] for p in points], "-", color=color, alpha=0.35, lw=1)
            ends.append(points[-1])
        ends.sort()
        axes.plot(
            [p[0] for p in ends],
            [100 * p[1] for p in ends],
            "o--",
            color=color,
            label=f"{family} (end of each schedule)",
        )
    axes.set_xscale("log", base=2)
    axes.set_xlabel("compute: seconds on the 2-core CPU (generations x median s per generation)")
    axes.set_ylabel("validation accuracy (%)")
    axes.axhline(96.7, color="grey", linestyle=":", label="the seed's ES (test)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plotting = commands.add_parser("plot", help="accuracy against compute, one colour per family")
    plotting.add_argument("families", nargs="+", help="FAMILY=SOURCE[,SOURCE...]")
    plotting.add_argument("--out", required=True)
    recording = commands.add_parser("record", help="copy a finished run into a record and add it to summary.json")
    recording.add_argument("run_dir", type=Path)
    recording.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        summary_path = args.out.parent / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"runs": {}}
        summary["runs"][args.out.name] = make_record(args.run_dir, args.out)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary["runs"][args.out.name], indent=1))
        return
    families: dict[str, list[str]] = {}
    for item in args.families:
        family, sources = item.split("=", 1)
        families.setdefault(family, []).extend(sources.split(","))
    plot(families, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
