"""Whole-generation wall time of the ES service and where it goes, Ray pools against in-process.

    python -m benchmarks.generation [--pop-size 64] [--batch-size 256] [--generations 12] [--workers 1,2]
        [--members-per-tile 8] [--fused/--no-fused] [--set KEY=VALUE ...] [--json out.json]

Builds what `es-service train` builds (config, noise table, MNIST, executor, Trainer in a temporary run
directory) and times `Trainer.step()`: for each Ray worker count on one private local Ray, and for the
LocalExecutor (the `workers=0` row, no Ray). Each row starts from the same theta, waits for its pool,
runs warm-up generations (torch.compile, caches), then reports medians over the timed generations.
Ray overhead = eval_s - worker_compute_s / workers (the critical path if tiles split evenly).
The comparison with a peer library (EvoTorch) is `python -m benchmarks.peer`, which measures both in one
run, in alternating rounds; docs/performance.md has its figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import device_facts, write_json
from es_service import plan as planning
from es_service.config import from_dict
from es_service.data import load_mnist
from es_service.driver import Trainer, TrainState
from es_service.executors import LocalExecutor
from es_service.runs import resolve, seed_problem
from es_workers import noise
from es_workers.evaluator import set_process_arithmetic

REFERENCE = {  # this project's targets for one generation at this setting
    "setting": {"pop_size": 64, "batch_size": 256, "workers": 2},
    "target_wall_s": 0.20,
    "target_mb_sent": 3.0,
}
PARTS = ("plan_s", "overhead_s", "compute_s", "grad_s", "adam_s", "other_s")
MB = 1e6


def make_config(args, workers: int):
    data = {
        "generations": args.warmup + args.generations + 1,  # +1: the last generation evaluates the center
        "es": {"pop_size": args.pop_size, "batch_size": args.batch_size},
        "eval": {"every": 10**9},
        "workers": {
            "executor": "ray" if workers else "local",
            "count": workers,
            "device": "cpu",
            "members_per_tile": args.members_per_tile,
            "fused": args.fused,
        },
    }
    return from_dict(data, args.overrides)


def build_executor(config, table, data, workers: int):
    if not workers:
        arithmetic = config.network.arithmetic
        device = (
            "cpu"
            if arithmetic == "cpu-ftz"
            else resolve(config.workers.device, "workers.device", "use 'auto' or 'cpu'")
        )
        return LocalExecutor(seed_problem(config, data), table, device)
    from es_service.ray_executor import RayExecutor

    executor = RayExecutor(seed_problem(config, data), table, config.workers, autoscale=False)
    alive = executor.wait_until_ready()
    if alive < workers:
        executor.close()
        raise RuntimeError(f"only {alive} of {workers} workers became ready in time")
    return executor


def split(record: dict, workers: int) -> dict:
    """One generation's wall time split into the parts (seconds) plus bytes."""
    critical = record["worker_compute_s"] / max(workers, 1)
    parts = {
        "plan_s": record["plan_s"],
        "overhead_s": record["eval_s"] - critical,
        "compute_s": critical,
        "grad_s": record["grad_s"],
        "adam_s": record["adam_s"],
    }
    parts["other_s"] = record["wall_s"] - sum(parts.values())
    return {
        "wall_s": record["wall_s"],
        **parts,
        "eval_share": record["eval_s"] / record["wall_s"],
        "worker_compute_sum_s": record["worker_compute_s"],
        "bytes_to_workers": record["bytes_to_workers"],
        "bytes_to_worker_max": record["bytes_to_worker_max"],
        "bytes_from_workers": record["bytes_from_workers"],
        "replica_resyncs": record["replica_resyncs"],
    }


def bench_row(args, workers: int, table, data, theta0) -> dict:
    config = make_config(args, workers)
    load_before = os.getloadavg()[0]  # a shared machine: other processes' load skews a row
    started = time.perf_counter()
    executor = build_executor(config, table, data, workers)
    ready_s = time.perf_counter() - started
    try:
        with tempfile.TemporaryDirectory(prefix="es-bench-") as run_dir:
            state = TrainState(theta0.clone(), None, 0)
            trainer = Trainer(config, Path(run_dir), executor.problem, table, 0, executor, state, "cpu")
            started = time.perf_counter()
            for _ in range(args.warmup):
                trainer.step()
            warmup_s = time.perf_counter() - started
            records = [split(trainer.step(), workers) for _ in range(args.generations)]
            theta = trainer.theta.clone()
    finally:
        executor.close()
    medians = {key: statistics.median(r[key] for r in records) for key in records[0]}
    return {
        "workers": workers,
        "executor": "ray" if workers else "local",
        "ready_s": ready_s,
        "warmup_s": warmup_s,
        "loadavg_1m": [load_before, os.getloadavg()[0]],
        "median": medians,
        "generations": records,
        "theta": theta,
    }


def print_table(rows: list[dict], args) -> None:
    ref = REFERENCE
    print(
        f"\nP={args.pop_size}  B={args.batch_size}  tile={args.members_per_tile} members  fused={args.fused}  "
        f"{args.generations} timed generations after {args.warmup} warm-up; medians, ms unless noted"
    )
    head = (
        f"{'workers':>8} {'wall':>7} {'plan':>6} {'ray ovh':>8} {'compute':>8} {'grad':>6} {'adam':>6} "
        f"{'other':>6} {'eval %':>7} {'MB to':>6} {'MB from':>8} {'us/target':>10}"
    )
    print(head)
    for row in rows:
        m = row["median"]
        label = f"{row['workers']}" + ("" if row["workers"] else " local")
        print(
            f"{label:>8} {m['wall_s'] * 1e3:7.1f} "
            + " ".join(f"{m[k] * 1e3:{w}.1f}" for k, w in zip(PARTS, (6, 8, 8, 6, 6, 6)))
            + f" {m['eval_share'] * 100:7.1f} {m['bytes_to_workers'] / MB:6.2f}"
            f" {m['bytes_from_workers'] / MB:8.4f} {m['wall_s'] / ref['target_wall_s']:9.2f}x"
        )
    print(f"{'target':>8} {ref['target_wall_s'] * 1e3:7.1f} {'':>53} {ref['target_mb_sent']:6.2f}")
    s = ref["setting"]
    if (args.pop_size, args.batch_size) != (s["pop_size"], s["batch_size"]):
        print("note: the targets are for P=64, B=256; ratios to them here are only indicative")
    print(
        "ray ovh = eval_s - worker_compute_s/workers; compute = that critical-path share of eval_s; "
        "MB to = theta once + tile tasks (each worker fetches theta once per generation)"
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pop-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--generations", type=int, default=12, help="timed generations per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed generations per row (compile, caches)")
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts (0: local only)")
    parser.add_argument("--no-local", action="store_true", help="skip the in-process LocalExecutor row")
    parser.add_argument("--members-per-tile", type=int, default=8)
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field as in es-service train --set (repeatable)",
    )
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    counts = ([] if args.no_local else [0]) + [n for n in counts if n > 0]
    base = make_config(args, max(counts))
    set_process_arithmetic(base.network.arithmetic)
    data = load_mnist(base.data_dir)
    table = noise.make_table(planning.noise_seed(base.seed), base.noise.table_size)
    theta0 = planning.seed_theta(base.seed)
    ray = None
    rows = []
    try:
        for workers in counts:  # the local row first, before Ray's processes exist
            if workers and ray is None:
                import ray

                ray.init(address="local", num_cpus=max(counts), include_dashboard=False, logging_level="WARNING")
            row = bench_row(args, workers, table, data, theta0)
            print(
                f"workers={workers}: ready in {row['ready_s']:.1f} s, warm-up {row['warmup_s']:.1f} s, "
                f"median wall {row['median']['wall_s'] * 1e3:.1f} ms, load avg {row['loadavg_1m'][0]:.2f} -> "
                f"{row['loadavg_1m'][1]:.2f}",
                flush=True,
            )
            rows.append(row)
    finally:
        if ray is not None:
            ray.shutdown()
    same = all(torch.equal(row["theta"], rows[0]["theta"]) for row in rows)
    print_table(rows, args)
    print(f"theta after {args.warmup + args.generations} generations identical across rows: {same}")
    for row in rows:
        del row["theta"]
    payload = {
        "benchmark": "generation",
        **device_facts(torch.device("cpu")),
        "config": base.to_dict(),
        "worker_counts": counts,
        "warmup": args.warmup,
        "reference": REFERENCE,
        "theta_identical_across_rows": same,
        "rows": rows,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
