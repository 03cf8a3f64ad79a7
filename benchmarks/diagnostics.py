"""Where an ES estimate's signal lies, and what training did to the weights. Diagnostics only: the one
place besides backprop where autograd runs, and never part of ES training.

  * ``alignment``: one generation's estimate from the service itself (its plan, evaluator and update
    estimate, in-process) at a theta, against minus the masked autograd gradient of the cross-entropy
    on the same minibatch, per parameter block (the cosine of i.i.d. noise is about 1/sqrt(block size)).
  * ``displacement``: per weight matrix, how far it moved from the seed's initialisation and the share
    of that move's squared norm in its top-10 singular values (i.i.d. noise puts about 6% of a 784 x 512
    move there, 7% of a 512 x 512 one: a move at that share is a random walk, not learned features).

    python -m benchmarks.diagnostics alignment --config CONFIG [--checkpoint CK] [--set K=V ...] [--generations N]
    python -m benchmarks.diagnostics displacement NAME=CHECKPOINT ...
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from es_service import checkpoint, plan as planning
from es_service.backprop import logits_fn
from es_service.config import Config, load
from es_service.driver import estimate
from es_service.executors import LocalExecutor
from es_service.runner import load_data
from workers import layer_members, network, noise

BLOCKS = [name for name, _ in network.PARAM_SHAPES]


def masked_gradient(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, arithmetic: str) -> torch.Tensor:
    """d(mean cross-entropy)/d theta through the explicit flushes (a flushed element passes none)."""
    theta = theta.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(logits_fn(arithmetic, "masked")(x, network.unflatten(theta)), y)
    loss.backward()
    return theta.grad


def block_cosines(estimate_: torch.Tensor, gradient: torch.Tensor) -> dict[str, float]:
    """Cosine of the estimate with minus the gradient, per block with a nonzero gradient."""
    result = {}
    for name, est, grad in zip(BLOCKS, network.unflatten(estimate_), network.unflatten(gradient)):
        if float(grad.norm()) > 0 and float(est.norm()) > 0:
            result[name] = float(torch.nn.functional.cosine_similarity(est.flatten().double(),
                                                                       -grad.flatten().double(), dim=0))
    return result


def alignment(config: Config, theta: torch.Tensor, data, generations: tuple[int, ...] = (0,)) -> dict:
    """Per-block cosines of the service's estimate at ``theta`` for each planned generation (each its own
    members and minibatch), with their mean."""
    table = noise.make_table(planning.noise_seed(config.seed), config.noise.table_size)
    subspace = config.es.w1.subspace if config.es.w1.pop_size else 0
    basis = layer_members.image_basis(data.train_images, subspace) if subspace else None
    executor = LocalExecutor(table, data.train_images, data.train_labels, config.network.arithmetic, "cpu",
                             config.workers.fused, basis=basis)
    rows = []
    for generation in generations:
        plan = planning.make_plan(config, generation, data.train_images.shape[0])
        grad, _ = estimate(config, table, basis, plan, executor.run_generation(theta, plan))
        index = torch.as_tensor(plan.batch_indices)
        x = data.train_images[index].reshape(-1, 784).float() / 255.0
        rows.append(block_cosines(grad, masked_gradient(theta, x, data.train_labels[index], config.network.arithmetic)))
    names = [name for name in BLOCKS if all(name in row for row in rows)]
    return {"generations": list(generations), "per_generation": rows,
            "mean": {name: float(np.mean([row[name] for row in rows])) for name in names}}


def top10_share(matrix: torch.Tensor) -> float:
    values = torch.linalg.svdvals(matrix.double())
    return float((values[:10] ** 2).sum() / (values**2).sum())


def displacement(theta: torch.Tensor, start: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per weight matrix: its norm, its displacement's norm and that displacement's top-10 share."""
    result = {}
    for (name, _), now, then in zip(network.PARAM_SHAPES, network.unflatten(theta), network.unflatten(start)):
        if name.startswith("W"):
            result[name] = {"norm": float(now.norm()), "displacement": float((now - then).norm()),
                            "top10_share": top10_share(now - then)}
    return result


def noise_top10_shares(seed: int = 0) -> dict[str, float]:
    """The top-10 share of an i.i.d. Gaussian matrix of each weight's shape: the random-walk reference."""
    generator = torch.Generator().manual_seed(seed)
    return {name: top10_share(torch.randn(shape, generator=generator)) for name, shape in network.PARAM_SHAPES
            if name.startswith("W")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnostics", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    align = commands.add_parser("alignment")
    align.add_argument("--config", required=True)
    align.add_argument("--checkpoint", help="theta to measure at (default: the config's seed initialisation)")
    align.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    align.add_argument("--generations", type=int, default=3, help="planned generations to average over")
    align.add_argument("--out", help="append the result as one JSON line to this file")
    moved = commands.add_parser("displacement")
    moved.add_argument("thetas", nargs="+", metavar="NAME=CHECKPOINT")
    moved.add_argument("--out")
    args = parser.parse_args(argv)
    if args.command == "alignment":
        config = load(args.config, args.overrides)
        theta = checkpoint.load(args.checkpoint)["theta"] if args.checkpoint else planning.seed_theta(config.seed)
        result = {"config": args.config, "checkpoint": args.checkpoint, "overrides": args.overrides,
                  **alignment(config, theta, load_data(config), tuple(range(args.generations)))}
    else:
        result = {"noise_top10_share": noise_top10_shares()}
        for item in args.thetas:
            name, _, path = item.partition("=")
            state = checkpoint.load(path)
            result[name] = displacement(state["theta"], planning.seed_theta(state["config"].seed))
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
