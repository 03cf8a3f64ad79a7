"""The cost of one training step of a config's estimator, as a ratio to one masked-autograd step.

Both run in one process on the same minibatches, taking turns in every round (``interleaved_times``),
so that drift on a shared machine hits them alike. The ES step is the service's own: the plan, the
in-process executor's evaluation of every member, the update's estimate and Adam (``Trainer.step``
without the center's evaluation). The yardstick is backprop through the explicit flushes (masked
gradients, es_service.backprop) with torch's Adam on the same theta and batch size: it never trains
anything here, it only prices a step.

    python -m benchmarks.step_cost --config configs/mnist_es.yaml [--rounds 15] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import device_facts, interleaved_times, write_json
from es_service import plan as planning
from es_service.backprop import logits_fn
from es_service.config import Config, load
from es_service.driver import Trainer
from es_service.runs import load_data, seed_problem
from es_workers import network


def es_step(config: Config, data, run_dir: Path):
    """A function that runs the next generation of ``config`` through the service's own Trainer."""
    return Trainer.in_process(config, run_dir, seed_problem(config, data)).step


def backprop_step(config: Config, data):
    """A function that takes one masked-autograd Adam step on the next minibatch of ``config``'s size."""
    theta = planning.seed_theta(config.seed).requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=config.es.learning_rate)
    logits = logits_fn(config.network.arithmetic, "masked")
    generator = torch.Generator().manual_seed(config.seed)
    images = data.train_images.reshape(-1, 784)

    def step() -> None:
        index = torch.randint(0, images.shape[0], (config.es.batch_size,), generator=generator)
        x = images[index].float() / 255.0
        loss = torch.nn.functional.cross_entropy(logits(x, network.unflatten(theta)), data.train_labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(config: Config, data, rounds: int, warmup: int = 2, threads: int = 1) -> dict:
    """Per-round seconds of each step and their ratios; the median ratio is the figure to quote.

    ``threads``: torch's thread count for both (the evaluator runs one member chunk per thread). One
    thread each prices a step per core and holds on a shared machine: there a two-thread OpenMP matmul
    waits for a descheduled partner (a masked-autograd step measured 0.75 s with 2 threads beside a
    training run, 0.03 s with 1)."""
    config = config.model_copy(update={"eval": config.eval.model_copy(update={"every": 10**9})})
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as run_dir:
        times = interleaved_times(
            {"es_step": es_step(config, data, Path(run_dir)), "backprop_step": backprop_step(config, data)},
            torch.device("cpu"),
            rounds,
            warmup,
        )
    torch.set_num_threads(saved)
    ratios = [es / bp for es, bp in zip(times["es_step"], times["backprop_step"])]
    return {
        "es_step_s_median": statistics.median(times["es_step"]),
        "backprop_step_s_median": statistics.median(times["backprop_step"]),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "times": times,
        "batch_size": config.es.batch_size,
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both steps (default 1)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    config = load(args.config, args.overrides)
    result = measure(config, load_data(config), args.rounds, threads=args.threads)
    print(
        f"ES step {result['es_step_s_median']:.3f} s, masked-autograd step {result['backprop_step_s_median']:.4f} s: "
        f"ratio {result['ratio_median']:.1f} (median of {args.rounds} rounds, {args.threads} thread(s))"
    )
    write_json(
        args.out, {"config": args.config, "overrides": args.overrides, **device_facts(torch.device("cpu")), **result}
    )


if __name__ == "__main__":
    main()
