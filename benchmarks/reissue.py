"""How long a tile takes to be handed out again after its worker dies (a benchmark, not a test).

    python -m benchmarks.reissue [--repeats 5] [--json out.json]

A private local Ray with 3 one-CPU workers evaluates generations of 6 tiles that take about a second
each; mid-generation one busy worker is killed (ray.kill, as a lost spot node looks to the driver).
Reported: kill -> the driver notices and requeues the tile, and kill -> the tile is dispatched again.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import ray

from benchmarks.common import write_json
from es_service import plan as planning
from es_service.config import from_dict
from es_service.data import load_mnist
from es_service.ray_executor import RayExecutor
from es_workers import noise
from es_workers.ftz_mnist import FtzMnist
from es_workers.network import init_theta


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    config = from_dict(
        {
            "es": {"pop_size": 12, "batch_size": 4096},
            "noise": {"table_size": 1 << 21},
            "workers": {"executor": "ray", "count": 3, "members_per_tile": 2, "fused": False},
        }
    )
    data = load_mnist()
    table = noise.make_table(1, config.noise.table_size)
    executor = RayExecutor(FtzMnist(data.train_images, data.train_labels), table, config.workers)
    executor.wait_until_ready()
    theta = init_theta(0)
    detect, redispatch = [], []
    for generation in range(args.repeats):
        plan = planning.make_plan(config, generation, 60000)
        thread = threading.Thread(target=executor.run_generation, args=(theta, plan))
        thread.start()
        while not any(w.in_flight for w in executor.workers.values()):
            time.sleep(0.01)
        time.sleep(0.3)
        victim = next(w for w in executor.workers.values() if w.in_flight)
        killed_at = time.monotonic()
        ray.kill(victim.handle, no_restart=True)
        thread.join()
        events = [e for e in executor.events if e[0] >= killed_at]
        requeued = [e for e in events if e[1] == "requeue"]
        if requeued:
            tile = requeued[0][2]
            detect.append(requeued[0][0] - killed_at)
            again = [e[0] for e in events if e[1] == "dispatch" and e[2] == tile and e[0] >= requeued[0][0]]
            if again:
                redispatch.append(again[0] - killed_at)
        executor.wait_until_ready()
    result = {
        "benchmark": "reissue",
        "repeats": args.repeats,
        "detect_s": detect,
        "redispatch_s": redispatch,
        "median_detect_s": statistics.median(detect),
        "median_redispatch_s": statistics.median(redispatch),
    }
    print(
        f"kill -> requeue: median {result['median_detect_s'] * 1e3:.1f} ms; "
        f"kill -> handed out again: median {result['median_redispatch_s'] * 1e3:.1f} ms "
        f"({len(redispatch)} of {args.repeats} kills)"
    )
    executor.close()
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
