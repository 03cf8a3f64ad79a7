"""Wall time per generation against a peer library, both measured in this one run, in alternating rounds.

    python -m benchmarks.peer [--pop-size 64] [--batch-size 256] [--generations 3] [--rounds 20]
        [--warmup 2] [--workers 2] [--json out.json]

The peer is EvoTorch (`pip install -e '.[peer]'`, or `pip install evotorch==0.6.1`): PGPE with Adam in its
distributed mode (`distributed=True`), one Ray actor per worker. Each actor samples its share of the
population, scores every member with this project's tf-ftz network
(`network.forward(x, network.unflatten(theta), "tf-ftz")`, one member at a time) as the negative mean
cross-entropy on a random minibatch of training images, and returns its gradient for PGPE's center and
standard deviations. Ours is the Trainer on a RayExecutor with as many workers, built the way
benchmarks.generation builds it, from the same initial theta. Both pools live on one local Ray at the same
time, each actor holding one CPU and running one torch thread.

After untimed warm-up generations of each (actors starting, torch.compile, caches), every round times
``--generations`` generations of EvoTorch and then as many of ours, so that a shared machine's drift hits
both alike. Reported: the median generation of each over all rounds, the ratio of the two medians
(EvoTorch / ours: above 1, ours is faster) and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.common import write_json
from benchmarks.generation import build_executor, make_config
from benchmarks.scale import machine_facts

PEER = "evotorch"
PEER_VERSION = "0.6.1"
FIX = f"pip install {PEER}=={PEER_VERSION}  (or: pip install -e '.[peer]')"
STDEV_LEARNING_RATE = 0.1  # PGPE's own step on its standard deviations; no bearing on the time per generation


class PeerMissing(RuntimeError):
    """The peer library cannot be imported."""


def require_peer() -> str:
    """The peer's version; PeerMissing naming the fix if it cannot be imported."""
    try:
        module = importlib.import_module(PEER)
    except ImportError as error:
        raise PeerMissing(f"{PEER} cannot be imported ({error}); this benchmark needs it: {FIX}") from error
    return getattr(module, "__version__", "unknown")


def interleave(steps: dict[str, Callable[[], object]], rounds: int, generations: int) -> dict[str, list[list[float]]]:
    """Wall seconds of each ``steps[name]()``: per round, ``generations`` calls of each in turn (A, A, B, B,
    then the next round). Returns, per name, one list of seconds per round."""
    times: dict[str, list[list[float]]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            seconds = []
            for _ in range(generations):
                started = time.perf_counter()
                step()
                seconds.append(time.perf_counter() - started)
            times[name].append(seconds)
    return times


def summarize(peer: list[list[float]], ours: list[list[float]]) -> dict:
    """Medians over all timed generations, their ratio (peer / ours) and the per-round ratios' median.
    Both sides need the same, non-zero number of rounds, each with at least one positive time."""
    if not peer or len(peer) != len(ours):
        raise ValueError(f"need the same non-zero number of rounds for both sides, got {len(peer)} and {len(ours)}")
    for side in (peer, ours):
        if any(not seconds for seconds in side) or any(s <= 0 for seconds in side for s in seconds):
            raise ValueError("every round needs at least one time, and every time must be positive")
    peer_median = statistics.median(s for seconds in peer for s in seconds)
    ours_median = statistics.median(s for seconds in ours for s in seconds)
    per_round = [statistics.median(a) / statistics.median(b) for a, b in zip(peer, ours)]
    return {
        "rounds": len(peer),
        "peer_median_s": peer_median,
        "ours_median_s": ours_median,
        "ratio": peer_median / ours_median,
        "ratio_per_round": per_round,
        "ratio_per_round_median": statistics.median(per_round),
        "ratio_per_round_range": [min(per_round), max(per_round)],
    }


def make_problem(images, labels, batch_size: int, workers: int):
    """An EvoTorch Problem maximising the negative mean cross-entropy of the tf-ftz network on a random
    minibatch (one per sub-population an actor evaluates). ``images`` (N, 784) uint8 and ``labels`` are
    object-store references, fetched once by each actor."""
    import ray
    from evotorch import Problem

    from es_workers import network

    class TfFtzMnist(Problem):  # local: pickled by value, so Ray actors need not import this module
        def __init__(self):
            super().__init__(
                "max",
                solution_length=network.NUM_PARAMS,
                initial_bounds=(-0.01, 0.01),
                dtype=torch.float32,
                device="cpu",
                num_actors=workers,
                actor_config={"num_cpus": 1},
            )
            self.refs = (images, labels)
            self.data = None

        def _evaluate_batch(self, batch):
            if self.data is None:
                torch.set_num_threads(1)  # the actor's one CPU, as each of our workers runs
                self.data = tuple(torch.from_numpy(array.copy()) for array in ray.get(list(self.refs)))
            train_images, train_labels = self.data
            index = torch.randint(len(train_labels), (batch_size,))
            x = train_images.index_select(0, index).float() / 255.0
            y = train_labels.index_select(0, index).long()
            fitness = torch.empty(len(batch))
            for i, theta in enumerate(batch.values):
                logits = network.forward(x, network.unflatten(theta), "tf-ftz")
                fitness[i] = -torch.nn.functional.cross_entropy(logits, y)
            batch.set_evals(fitness)

    return TfFtzMnist()


def build_peer(config, data, theta0: torch.Tensor, workers: int):
    """EvoTorch's PGPE (Adam, distributed) on the tf-ftz network; returns (searcher, problem)."""
    import ray
    from evotorch.algorithms import PGPE

    images = data.train_images.reshape(len(data.train_images), -1).numpy()
    problem = make_problem(ray.put(images), ray.put(data.train_labels.numpy()), config.es.batch_size, workers)
    searcher = PGPE(
        problem,
        popsize=config.es.pop_size,
        center_learning_rate=config.es.learning_rate,
        stdev_learning_rate=STDEV_LEARNING_RATE,
        stdev_init=config.es.noise_std,
        optimizer="adam",
        ranking_method="centered",
        center_init=theta0.clone(),
        distributed=True,
    )
    return searcher, problem


def peer_bytes_per_actor(searcher) -> int:
    """Pickled size of the search distribution, which every actor is sent each generation; each returns
    gradients of the same size."""
    return len(pickle.dumps(searcher._distribution.to("cpu")))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pop-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--generations", type=int, default=3, help="timed generations of each side per round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="untimed generations of each side before the rounds")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors of each side (at least 2)")
    parser.add_argument("--members-per-tile", type=int, default=8)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be at least 2: EvoTorch runs a single actor in-process")
    if min(args.generations, args.rounds) < 1 or args.warmup < 0:
        parser.error("--generations and --rounds must be at least 1, --warmup at least 0")
    try:
        peer_version = require_peer()
    except PeerMissing as error:
        print(f"benchmarks.peer: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    import ray

    from es_service import plan as planning
    from es_service.data import load_mnist
    from es_service.driver import Trainer, TrainState
    from es_workers import noise
    from es_workers.evaluator import set_process_arithmetic

    timed = args.rounds * args.generations
    settings = SimpleNamespace(
        pop_size=args.pop_size,
        batch_size=args.batch_size,
        warmup=args.warmup,
        generations=timed,  # make_config adds the warm-up and one generation that evaluates the center
        members_per_tile=args.members_per_tile,
        fused=True,
        overrides=[],
    )
    config = make_config(settings, args.workers)
    set_process_arithmetic(config.network.arithmetic)
    data = load_mnist(config.data_dir)
    table = noise.make_table(planning.noise_seed(config.seed), config.noise.table_size)
    theta0 = planning.seed_theta(config.seed)

    own_ray = not ray.is_initialized()
    if own_ray:  # both pools at once: one CPU per actor of each, taking turns
        ray.init(address="local", num_cpus=2 * args.workers, include_dashboard=False, logging_level="WARNING")
    facts = machine_facts(torch.get_num_threads(), [])
    facts["command"] = " ".join(["python -m benchmarks.peer", *(sys.argv[1:] if argv is None else argv)])
    problem = executor = None
    try:
        with contextlib.ExitStack() as stack:
            executor = build_executor(config, table, data, args.workers)
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="es-peer-"))
            state = TrainState(theta0.clone(), None, 0)
            trainer = Trainer(config, Path(run_dir), executor.problem, table, 0, executor, state, "cpu")
            searcher, problem = build_peer(config, data, theta0, args.workers)
            records = []

            def ours():
                records.append(trainer.step())

            steps = {"evotorch": searcher.step, "ours": ours}
            started = time.perf_counter()
            for _ in range(args.warmup):
                for step in steps.values():
                    step()
            warmup_s = time.perf_counter() - started
            del records[:]
            load_before = os.getloadavg()[0]
            times = interleave(steps, args.rounds, args.generations)
            load_after = os.getloadavg()[0]
            peer_sent = peer_bytes_per_actor(searcher) * args.workers
    finally:
        if problem is not None:
            problem.kill_actors()
        if executor is not None:
            executor.close()
        if own_ray:
            ray.shutdown()
    summary = summarize(times["evotorch"], times["ours"])
    ours_bytes = {
        key: statistics.median(record[key] for record in records) for key in ("bytes_to_workers", "bytes_from_workers")
    }
    payload = {
        "benchmark": "peer",
        **facts,
        "peer": {
            "library": PEER,
            "version": peer_version,
            "algorithm": "PGPE",
            "optimizer": "adam",
            "distributed": True,
        },
        "setting": {
            "pop_size": args.pop_size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "rounds": args.rounds,
            "generations_per_round": args.generations,
            "warmup": args.warmup,
            "arithmetic": config.network.arithmetic,
            "members_per_tile": args.members_per_tile,
            "fused": True,
        },
        "warmup_s": warmup_s,
        "loadavg_1m_rounds": [load_before, load_after],
        "evotorch": {
            "median_s": summary["peer_median_s"],
            "times_s": times["evotorch"],
            "bytes_sent_per_generation": peer_sent,
            "bytes_returned_per_generation": peer_sent,
        },
        "ours": {
            "median_s": summary["ours_median_s"],
            "times_s": times["ours"],
            "bytes_sent_per_generation": ours_bytes["bytes_to_workers"],
            "bytes_returned_per_generation": ours_bytes["bytes_from_workers"],
        },
        "ratio": summary["ratio"],
        "ratio_per_round": summary["ratio_per_round"],
        "ratio_per_round_median": summary["ratio_per_round_median"],
        "ratio_per_round_range": summary["ratio_per_round_range"],
    }
    print(
        f"\nP={args.pop_size}  B={args.batch_size}  {args.workers} Ray actors each  {args.rounds} rounds x "
        f"{args.generations} generations of each, after {args.warmup} warm-up; load avg {load_before:.2f} -> "
        f"{load_after:.2f}\n"
        f"  EvoTorch {peer_version} PGPE (distributed): median {summary['peer_median_s'] * 1e3:7.1f} ms per generation, "
        f"{peer_sent / 1e6:.2f} MB sent\n"
        f"  es-service Trainer:                median {summary['ours_median_s'] * 1e3:7.1f} ms per generation, "
        f"{ours_bytes['bytes_to_workers'] / 1e6:.2f} MB sent\n"
        f"  EvoTorch / ours: {summary['ratio']:.2f}x (per-round ratios: median {summary['ratio_per_round_median']:.2f}x, "
        f"range {summary['ratio_per_round_range'][0]:.2f}-{summary['ratio_per_round_range'][1]:.2f}x)"
    )
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
