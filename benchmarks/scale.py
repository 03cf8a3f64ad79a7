"""The constants that decide how a generation's time scales with the population and the worker count.

    python -m benchmarks.scale [--quick] [--repeats 3] [--threads N] [--max-call-s 60]
        [--json docs/scaling/scale.json]
    python -m benchmarks.scale --reuse docs/scaling/scale.json [--json OUT]

driver: per generation, plan.make_plan, fitness shaping with slice weights, the whole kind's estimate (es_workers.kinds) with
the arguments driver.estimate passes, and AdamES.step, for P = 1k to 100k members, full rank and rank 1,
on the config's default noise table with random fitness. A size whose estimate the measured sizes
predict to take longer than --max-call-s is not run: its time comes from a least-squares line in P
through the measured sizes (marked "extrapolated").
dispatch: RayExecutor.run_generation on a local ray.cluster_utils.Cluster of several nodes with
virtual CPUs, tiles so cheap (one rank-1 member on 8 random images) that scheduling dominates, 2 to 32
tiles per actor; per actor count, time per generation = a + b * tiles, in wall time and in the driver
process's CPU time, and over all points together intercept + per_actor * actors + per_tile * tiles.
bytes: what each worker receives per generation as the Ray executor sends it: theta (broadcast) or
the update (replay, Update.nbytes), the generation's minibatch once, and its share of the tile tasks
(TileTask.nbytes of make_task(..., batch_by_reference=True)).
projection: generation time and GPU efficiency for 8 to 1,000 GPU workers (docs/scaling.md).
--reuse JSON: no measurement; the driver and dispatch constants of an earlier run's JSON, bytes and
projection recomputed with the current code, written back to JSON (or to --json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import device_facts, median_time, write_json
from es_service import plan as planning
from es_service import strategy
from es_service.config import from_dict
from es_service.executors import GenerationOutcome, make_task
from es_service.strategy import shaped_update
from es_workers import network, noise

# 16 actors at most: an actor process holds ~310 MB of its own (importing torch alone is ~280 MB)
FULL = {
    "pop_sizes": [1000, 4000, 16000, 64000, 100000],
    "actors": [4, 8, 16],
    "tiles_per_actor": [2, 8, 32],
    "nodes": 4,
}
QUICK = {"pop_sizes": [64, 256], "actors": [2, 4], "tiles_per_actor": [2, 4], "nodes": 2}
BYTES_POP_SIZES = [1000, 8192, 65536]
WORKER_COUNTS = [8, 64, 256, 1000]
PROJECTION_POP_SIZES = [8192, 65536]
NUM_TRAIN = 60000
THETA_BYTES = 4 * network.NUM_PARAMS
NETWORK_BYTES_PER_S = 25e9 / 8  # 25 Gbit/s out of the driver's node
GPU = {  # docs/performance.md, docs/results/2026-11-26-h100/device_check.json
    "source": "docs/results/2026-11-26-h100/device_check.json (python -m benchmarks.device_check)",
    "device": "NVIDIA H100 80GB HBM3",
    "date": "2026-11-26",
    "batch_size": 1024,
    "member_s": 0.07606064599999485 / 2048,  # fused evaluator, 2048 members x 1024 images
    "estimate_per_slice_s": 0.004005829500002278 / 1024,  # the whole kind's estimate from 1024 slices on the GPU
    "adam_s": 0.0002962889999977847,
}


def git(*args: str) -> str:
    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout.strip()


def code_facts(argv) -> dict:
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join(["python -m benchmarks.scale", *argv]),
    }


def machine_facts(threads: int, argv) -> dict:
    cpu_model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            None,
        )
        if Path("/proc/cpuinfo").exists()
        else None
    )
    import ray

    facts = code_facts(argv)
    return {
        **device_facts(torch.device("cpu")),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "threads": threads,
        "ray": ray.__version__,
        "commit": facts["commit"],
        "uncommitted_changes": facts["uncommitted_changes"],
        "loadavg_1m_start": os.getloadavg()[0],
        "command": facts["command"],
    }


def linear_fit(xs, ys) -> dict:
    """Least-squares y = intercept + slope * x (a proportional line through one point)."""
    if len(xs) == 1:
        return {"intercept": 0.0, "slope": ys[0] / xs[0]}
    slope, intercept = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return {"intercept": float(intercept), "slope": float(slope)}


def at(fit: dict, x: float) -> float:
    return fit["intercept"] + fit["slope"] * x


# -- driver ------------------------------------------------------------------------------------------
def driver_row(config, table, repeats: int, rng, with_estimate: bool) -> dict:
    es, cpu = config.es, torch.device("cpu")
    plan = planning.make_plan(config, 0, NUM_TRAIN)
    pop_size, batch_size = len(plan.member_offsets), len(plan.batch_indices)
    loss_sums = rng.uniform(0.5, 3.0, (pop_size, 1)) * batch_size
    correct = rng.integers(0, batch_size, (pop_size, 1))

    def shape():  # driver.estimate's slice_weights
        fitness = planning.member_fitness(loss_sums, correct, batch_size, es.fitness)
        return strategy.slice_weights(strategy.shape_fitness(fitness, es.fitness_shaping), es.antithetic)

    row = {
        "pop_size": pop_size,
        "rank": es.rank,
        "tiles": len(plan.tiles),
        "plan_s": median_time(lambda: planning.make_plan(config, 1, NUM_TRAIN), cpu, repeats),
        "shape_s": median_time(shape, cpu, repeats),
    }
    if with_estimate:
        weights = shape()

        def estimate():  # as the strategy's estimate calls it
            return plan.kinds[0].estimate(table, plan.slice_offsets, weights, plan.noise_std, pop_size, None)

        # no warm-up calls: at large P one call takes seconds, and the median drops a cold first call
        row["estimate_s"] = float(np.median([median_time(estimate, cpu, 1, warmup=0) for _ in range(max(repeats, 1))]))
    return row


def measure_driver(pop_sizes, repeats: int, max_call_s: float) -> dict:
    base = from_dict({})
    table = noise.make_table(planning.noise_seed(base.seed), base.noise.table_size)
    rng = np.random.default_rng(0)
    result = {
        "table_size": base.noise.table_size,
        "batch_size": base.es.batch_size,
        "max_call_s": max_call_s,
        "threads": torch.get_num_threads(),
        "loadavg_1m_start": os.getloadavg()[0],
    }
    for rank in (0, 1):
        rows = []
        for pop_size in pop_sizes:
            config = from_dict({"es": {"pop_size": pop_size, "rank": rank}})
            measured = [r for r in rows if not r["estimate_extrapolated"]]
            fit = (
                linear_fit([r["pop_size"] for r in measured], [r["estimate_s"] for r in measured]) if measured else None
            )
            run_estimate = fit is None or at(fit, pop_size) <= max_call_s
            row = driver_row(config, table, repeats, rng, run_estimate)
            row["estimate_extrapolated"] = not run_estimate
            if not run_estimate:
                row["estimate_s"] = at(fit, pop_size)
            rows.append(row)
            print(
                f"driver rank {rank} P={pop_size}: "
                + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row.items() if k.endswith("_s"))
                + (" (estimate extrapolated)" if not run_estimate else ""),
                flush=True,
            )
        measured = [r for r in rows if not r["estimate_extrapolated"]]
        fits = {
            name: linear_fit(
                [r["pop_size"] for r in (measured if name == "estimate_s" else rows)],
                [r[name] for r in (measured if name == "estimate_s" else rows)],
            )
            for name in ("plan_s", "shape_s", "estimate_s")
        }
        result[f"rank{rank}"] = {"rows": rows, "fits": fits}
    adam = strategy.AdamES.from_config(planning.seed_theta(base.seed), base.es)
    grad = torch.randn(network.NUM_PARAMS, generator=torch.Generator().manual_seed(0))
    result["adam_s"] = median_time(lambda: adam.step(grad, base.es.learning_rate), torch.device("cpu"), max(repeats, 5))
    print(f"driver Adam step {result['adam_s'] * 1e3:.1f} ms", flush=True)
    return result


# -- dispatch ----------------------------------------------------------------------------------------
DISPATCH = {"batch_size": 8, "members_per_tile": 1, "rank": 1, "table_size": 1 << 20, "images": 1024}


def dispatch_config(actors: int, tiles: int):
    return from_dict(
        {
            "es": {
                "pop_size": tiles * DISPATCH["members_per_tile"],
                "batch_size": DISPATCH["batch_size"],
                "rank": DISPATCH["rank"],
            },
            "noise": {"table_size": DISPATCH["table_size"]},
            "workers": {
                "executor": "ray",
                "count": actors,
                "members_per_tile": DISPATCH["members_per_tile"],
                "fused": False,
            },
        }
    )


def process_memory_mb(pid: int) -> dict:
    """Resident (RSS), proportional (PSS) and private (USS: what the process adds) memory of a local
    process, MB (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
            fields[name] = int(value.split()[0]) / 1024
    private = fields["Private_Clean"] + fields["Private_Dirty"]
    return {"rss_mb": fields["Rss"], "pss_mb": fields["Pss"], "uss_mb": private}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a local process so far (Linux /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dispatch_row(actors: int, tile_counts, repeats: int) -> dict:
    """Time per generation of RayExecutor.run_generation for each tile count, tile counts taking turns
    in every round so that the machine's drift hits them alike; then a + b * tiles by least squares."""
    import ray

    from es_service.ray_executor import RayExecutor
    from es_workers.ftz_mnist import FtzMnist

    rng = np.random.default_rng(actors)
    images = torch.from_numpy(rng.integers(0, 256, (DISPATCH["images"], 784), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, DISPATCH["images"]).astype(np.int64))
    configs = {tiles: dispatch_config(actors, tiles) for tiles in tile_counts}
    table = noise.make_table(planning.noise_seed(0), DISPATCH["table_size"])
    executor = RayExecutor(FtzMnist(images, labels), table, configs[tile_counts[0]].workers)
    try:
        alive = executor.wait_until_ready(timeout_s=300)
        if alive < actors:
            raise RuntimeError(f"only {alive} of {actors} actors became ready; lower the actor counts")
        infos = ray.get([w.handle.ready.remote() for w in executor.workers.values()])
        theta, generation = planning.seed_theta(0), 0
        times: dict[int, list[tuple[float, float, float]]] = {tiles: [] for tiles in tile_counts}
        for round_ in range(repeats + 1):  # round 0 warms up (theta fetches, first calls)
            if round_ == 1:
                actor_cpu_before = sum(process_cpu_s(info["pid"]) for info in infos)
            for tiles, config in configs.items():
                plan = planning.make_plan(config, generation, DISPATCH["images"])
                generation += 1
                started, cpu_started = time.perf_counter(), time.process_time()
                outcome = executor.run_generation(theta, plan)
                if round_:
                    times[tiles].append(
                        (time.perf_counter() - started, time.process_time() - cpu_started, outcome.compute_s)
                    )
        actor_cpu_s = sum(process_cpu_s(info["pid"]) for info in infos) - actor_cpu_before
        memory = [process_memory_mb(info["pid"]) for info in infos]
    finally:
        executor.close()
    points = [
        {
            "tiles": tiles,
            **{
                name: float(np.median([t[k] for t in times[tiles]]))
                for k, name in enumerate(("generation_s", "driver_cpu_s", "worker_compute_s"))
            },
        }
        for tiles in tile_counts
    ]
    wall = linear_fit(tile_counts, [p["generation_s"] for p in points])
    cpu = linear_fit(tile_counts, [p["driver_cpu_s"] for p in points])
    row = {
        "actors": actors,
        "nodes_used": len({info["node_id"] for info in infos}),
        "points": points,
        "a_s": wall["intercept"],
        "per_tile_s": wall["slope"],
        "driver_cpu_a_s": cpu["intercept"],
        "driver_cpu_per_tile_s": cpu["slope"],
        "worker_compute_per_tile_s": sum(p["worker_compute_s"] for p in points) / sum(tile_counts),
        "actor_cpu_per_tile_s": actor_cpu_s / (repeats * sum(tile_counts)),
        **{f"actor_{k}": float(np.median([m[k] for m in memory])) for k in memory[0]},
    }
    ms = {name: row[name] * 1e3 for name in ("a_s", "per_tile_s", "driver_cpu_per_tile_s", "actor_cpu_per_tile_s")}
    print(
        f"dispatch {actors} actors on {row['nodes_used']} nodes: wall a {ms['a_s']:.1f} ms + {ms['per_tile_s']:.2f} "
        f"ms per tile; per tile CPU: driver {ms['driver_cpu_per_tile_s']:.2f} ms, actors "
        f"{ms['actor_cpu_per_tile_s']:.2f} ms; actor USS {row['actor_uss_mb']:.0f} MB",
        flush=True,
    )
    return row


def pooled_fit(rows: list[dict], name: str) -> dict:
    """``name`` = intercept + per_actor * actors + per_tile * tiles, least squares over every point."""
    points = [(row["actors"], point["tiles"], point[name]) for row in rows for point in row["points"]]
    design = np.array([[1.0, actors, tiles] for actors, tiles, _ in points])
    coefficients = np.linalg.lstsq(design, np.array([value for *_, value in points]), rcond=None)[0]
    return dict(zip(("intercept", "per_actor", "per_tile"), map(float, coefficients)))


def measure_dispatch(actor_counts, tiles_per_actor, repeats: int, nodes: int, cluster=None) -> dict:
    """On ``cluster`` (a connected ray.cluster_utils.Cluster) with nodes added for the run, or on a
    private one of ``nodes`` nodes; either way each node has max(actors) / nodes virtual CPUs."""
    import ray
    from ray.cluster_utils import Cluster

    cpus = math.ceil(max(actor_counts) / nodes)
    node_args = {"num_cpus": cpus, "object_store_memory": 200 << 20}
    own = cluster is None
    added = []
    if own:
        cluster = Cluster(initialize_head=True, connect=True, head_node_args={**node_args, "include_dashboard": False})
    try:
        have = int(ray.cluster_resources().get("CPU", 0))
        while have < max(actor_counts):
            added.append(cluster.add_node(**node_args))
            have += cpus
        cluster.wait_for_nodes()
        load = os.getloadavg()[0]  # other processes' load shows in every figure here
        rows = [dispatch_row(actors, [k * actors for k in tiles_per_actor], repeats) for actors in actor_counts]
        total_nodes = len([n for n in ray.nodes() if n["Alive"]])
    finally:
        for node in added:
            cluster.remove_node(node)
        if own:
            ray.shutdown()
            cluster.shutdown()
    return {
        **DISPATCH,
        "nodes": total_nodes,
        "cpus_per_added_node": cpus,
        "repeats": repeats,
        "loadavg_1m_start": load,
        "loadavg_1m_end": os.getloadavg()[0],
        "rows": rows,
        "generation_s_fit": pooled_fit(rows, "generation_s"),
        "driver_cpu_s_fit": pooled_fit(rows, "driver_cpu_s"),
    }


# -- bytes -------------------------------------------------------------------------------------------
SNAPSHOT_BYTES = 3 * THETA_BYTES  # replay: a replica (theta and Adam's two moments) to a worker that joins


def replay_update_bytes(config) -> int:
    """Bytes of one generation's update in replay mode (``Update.nbytes``: a float32 weight per noise
    slice of each member group, the generation and a flag)."""
    plan = planning.make_plan(config, 0, NUM_TRAIN)
    return shaped_update(config, plan, GenerationOutcome.empty(plan))[0].nbytes


def bytes_row(config, worker_counts) -> dict:
    """Bytes each worker receives per generation from the Ray executor: theta (broadcast) or the update
    (replay), the generation's minibatch once (its image indices; tasks carry only their shard's
    range), and its share of the tile tasks (the mean: total / workers). A worker that joins under
    replay receives a snapshot (SNAPSHOT_BYTES) once instead of the update."""
    plan = planning.make_plan(config, 0, NUM_TRAIN)
    task_bytes = sum(make_task(plan, tile, batch_by_reference=True).nbytes for tile in plan.tiles)
    batch_bytes = plan.batch_indices.nbytes
    update_bytes = replay_update_bytes(config)
    return {
        "pop_size": config.es.pop_size,
        "batch_size": config.es.batch_size,
        "members_per_tile": config.workers.members_per_tile,
        "tiles": len(plan.tiles),
        "task_bytes_total": task_bytes,
        "batch_bytes": batch_bytes,
        "theta_bytes": THETA_BYTES,
        "replay_update_bytes": update_bytes,
        "snapshot_bytes": SNAPSHOT_BYTES,
        "per_worker": {
            str(workers): {
                "broadcast": THETA_BYTES + batch_bytes + task_bytes / workers,
                "replay": update_bytes + batch_bytes + task_bytes / workers,
            }
            for workers in worker_counts
        },
    }


def measure_bytes(pop_sizes, worker_counts) -> dict:
    rows = [bytes_row(from_dict({"es": {"pop_size": pop_size}}), worker_counts) for pop_size in pop_sizes]
    return {
        "theta_bytes": THETA_BYTES,
        "snapshot_bytes": SNAPSHOT_BYTES,
        "worker_counts": list(worker_counts),
        "rows": rows,
    }


# -- projection --------------------------------------------------------------------------------------
MODES = {  # name: (what goes to every worker, member rank, where the estimate and Adam step run)
    "broadcast, full rank, update on the driver's CPU": ("broadcast", 0, "cpu"),
    "broadcast, rank 1, update on the driver's CPU": ("broadcast", 1, "cpu"),
    "replay, full rank, update on every worker's CPU": ("replay", 0, "cpu"),
    "replay, rank 1, update on every worker's CPU": ("replay", 1, "cpu"),
    "not implemented: broadcast, full rank, update on a driver GPU": ("broadcast", 0, "gpu"),
    "not implemented: replay, full rank, update on every worker's GPU": ("replay", 0, "gpu"),
}
"""What the code does: the driver's update runs on its CPU, and under replay every worker's replica also
applies it on its CPU with the driver's code (only the same kind of device gives the same bits). The
GPU modes would need the driver and every replica to run the update on the same GPU model."""


FORMULA = (
    "generation_s = plan_s(P) + (workers * (sync_bytes + batch_bytes) + task_bytes) / 25 Gbit/s "
    "+ max(worker_update_s + ceil(tiles / workers) * members_per_tile * member_s, dispatch_s) + update_s(P); "
    "update_s = the driver's shaping, estimate and Adam step; worker_update_s = 0 (broadcast) or a "
    "replica's plan, estimate and Adam step before its first tile (replay); gpu_efficiency = P * member_s "
    "/ workers / generation_s; dispatch_s = c0 + c1 * workers + b * tiles, the driver's CPU time to "
    "dispatch and collect"
)


def dispatch_s(dispatch: dict, workers: int, tiles: int) -> float:
    """The driver's CPU seconds to dispatch and collect one generation (driver_cpu_s_fit); a negative
    term, the machine's noise, counts as 0."""
    fit = dispatch["driver_cpu_s_fit"]
    return max(0.0, fit["intercept"]) + max(0.0, fit["per_actor"]) * workers + max(0.0, fit["per_tile"]) * tiles


def project_row(driver: dict, dispatch: dict, pop_size: int, workers: int, members_per_tile: int) -> list[dict]:
    """One row per mode of FORMULA. The dispatch constants are the driver's CPU time: on a cluster
    the actors' own CPU time is spent on other machines. The CPU update times are this machine's (the
    driver table); a worker's CPU is taken to be as fast."""
    config = from_dict(
        {
            "es": {"pop_size": pop_size, "batch_size": GPU["batch_size"]},
            "workers": {"members_per_tile": members_per_tile},
        }
    )
    sizes = bytes_row(config, [workers])  # the same for both ranks: offsets, signs and slice weights
    tiles = sizes["tiles"]
    compute_s = pop_size * GPU["member_s"] / workers
    busiest_s = math.ceil(tiles / workers) * members_per_tile * GPU["member_s"]
    driver_dispatch_s = dispatch_s(dispatch, workers, tiles)
    gpu_update_s = (pop_size // 2) * GPU["estimate_per_slice_s"] + GPU["adam_s"]
    # plan and shaping do not depend on the rank: the full-rank runs' lines serve both. A line through
    # few noisy sizes can fall below 0 far from them: that counts as 0
    plan_s, shape_s = (max(0.0, at(driver["rank0"]["fits"][name], pop_size)) for name in ("plan_s", "shape_s"))
    rows = []
    for mode, (sync, rank, device) in MODES.items():
        estimate_s = max(0.0, at(driver[f"rank{rank}"]["fits"]["estimate_s"], pop_size))
        step_s = estimate_s + driver["adam_s"] if device == "cpu" else gpu_update_s
        update_s = shape_s + step_s
        worker_update_s = plan_s + step_s if sync == "replay" else 0.0
        per_worker = (THETA_BYTES if sync == "broadcast" else sizes["replay_update_bytes"]) + sizes["batch_bytes"]
        network_s = (workers * per_worker + sizes["task_bytes_total"]) / NETWORK_BYTES_PER_S
        generation_s = plan_s + network_s + max(worker_update_s + busiest_s, driver_dispatch_s) + update_s
        rows.append(
            {
                "pop_size": pop_size,
                "workers": workers,
                "members_per_tile": members_per_tile,
                "tiles": tiles,
                "mode": mode,
                "sync": sync,
                "rank": rank,
                "update_device": device,
                "plan_s": plan_s,
                "network_s": network_s,
                "compute_s": compute_s,
                "busiest_worker_s": busiest_s,
                "dispatch_s": driver_dispatch_s,
                "update_s": update_s,
                "worker_update_s": worker_update_s,
                "generation_s": generation_s,
                "gpu_efficiency": compute_s / generation_s,
            }
        )
    return rows


def project(driver: dict, dispatch: dict) -> dict:
    rows = []
    for pop_size in PROJECTION_POP_SIZES:
        for workers in WORKER_COUNTS:
            for members_per_tile in sorted({8, max(1, math.ceil(pop_size / (2 * workers)))}):
                rows += project_row(driver, dispatch, pop_size, workers, members_per_tile)
    measured = [r["actors"] for r in dispatch["rows"]]
    return {
        "gpu": GPU,
        "network_bytes_per_s": NETWORK_BYTES_PER_S,
        "rows": rows,
        "formula": FORMULA,
        "dispatch_fit": dispatch["driver_cpu_s_fit"],
        "extrapolated": {
            "estimate above pop_size": max(
                r["pop_size"] for r in driver["rank0"]["rows"] if not r["estimate_extrapolated"]
            ),
            "dispatch above actors": max(measured),
        },
    }


def projection_table(projection: dict, large_tiles: bool) -> str:
    """Markdown: one row per (P, mode), one column per worker count: generation ms (GPU efficiency)."""
    lines = [
        "| P | mode | " + " | ".join(f"{w} workers" for w in WORKER_COUNTS) + " |",
        "|---|---|" + "---|" * len(WORKER_COUNTS),
    ]
    for pop_size in PROJECTION_POP_SIZES:
        for mode in MODES:
            cells = []
            for workers in WORKER_COUNTS:
                wanted = max(1, math.ceil(pop_size / (2 * workers))) if large_tiles else 8
                key = (pop_size, workers, mode, wanted)
                row = next(
                    r
                    for r in projection["rows"]
                    if (r["pop_size"], r["workers"], r["mode"], r["members_per_tile"]) == key
                )
                cells.append(f"{row['generation_s'] * 1e3:,.0f} ms ({100 * row['gpu_efficiency']:.2g}%)")
            lines.append(f"| {pop_size:,} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_projection(projection: dict) -> None:
    for large_tiles in (True, False):
        print(
            f"\nprojection, {'two tiles per worker' if large_tiles else '8 members per tile'}: "
            "generation time (GPU efficiency)\n" + projection_table(projection, large_tiles)
        )


def reuse(path: str, out: str | None, argv) -> dict:
    """An earlier run's JSON with its measured driver and dispatch constants kept (and its machine and
    date fields), bytes and projection recomputed by this code; written to ``out`` or back to ``path``."""
    payload = json.loads(Path(path).read_text())
    payload["bytes"] = measure_bytes(BYTES_POP_SIZES, WORKER_COUNTS)
    payload["projection"] = project(payload["driver"], payload["dispatch"])
    payload["recomputed"] = {
        "sections": ["bytes", "projection"],
        "date": time.strftime("%Y-%m-%d"),
        **code_facts(argv),
        "note": "driver and dispatch are the measurement's; commit, date and command "
        "at the top level are the measurement's too",
    }
    print_projection(payload["projection"])
    write_json(out or path, payload)
    return payload


def main(argv=None, cluster=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds; writes no JSON unless --json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads of the driver-side measurements (default: torch's)")
    parser.add_argument(
        "--max-call-s",
        type=float,
        default=60.0,
        help="extrapolate, instead of running, an estimate the measured sizes predict to take longer",
    )
    parser.add_argument(
        "--json", help="output (default docs/scaling/scale.json, none with --quick, the --reuse JSON with --reuse)"
    )
    parser.add_argument(
        "--reuse",
        metavar="JSON",
        help="measure nothing: recompute bytes and projection from this JSON's driver and dispatch constants",
    )
    args = parser.parse_args(argv)
    if args.reuse:
        return reuse(args.reuse, args.json, sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    facts = machine_facts(torch.get_num_threads(), sys.argv[1:] if argv is None else argv)
    driver = measure_driver(sizes["pop_sizes"], args.repeats, args.max_call_s)
    dispatch = measure_dispatch(sizes["actors"], sizes["tiles_per_actor"], args.repeats, sizes["nodes"], cluster)
    projection = project(driver, dispatch)
    payload = {
        "benchmark": "scale",
        **facts,
        "quick": args.quick,
        "driver": driver,
        "dispatch": dispatch,
        "bytes": measure_bytes(BYTES_POP_SIZES, WORKER_COUNTS),
        "projection": projection,
        "loadavg_1m_end": os.getloadavg()[0],
    }
    print_projection(projection)
    write_json(args.json or (None if args.quick else "docs/scaling/scale.json"), payload)
    return payload


if __name__ == "__main__":
    main()
