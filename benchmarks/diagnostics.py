"""Where an ES estimate's signal lies, and what training did to the weights. Diagnostics only: the one
place besides backprop where autograd runs, and never part of ES training.

  * ``alignment``: one generation's estimate from the service itself (its plan, evaluator and update
    estimate, in-process) at a theta, against minus the masked autograd gradient of the cross-entropy
    on the same minibatch, per parameter block (the cosine of i.i.d. noise is about 1/sqrt(block size)),
    and the seconds the estimate took (median over the generations measured).
  * ``capacity``: masked backprop restricted to layer members' search space (W1 = W1_0 + U M with U the
    images' top-k principal components, only M and the later layers trained; optionally W2 frozen):
    how much accuracy that space can hold, whatever estimator searches it.
  * ``energy``: the share of each weight's masked gradient (per minibatch) in the top-k directions of
    that layer's input (the uncentered second moment of x, h1 or h2 over training images), and for W2
    in span(W1^T U_k) (es_workers.layer_members.hidden_basis): where a subspace search loses little.
    A share of k / fan_in is what a random subspace holds.
  * ``displacement``: per weight matrix, how far it moved from the seed's initialisation and the share
    of that move's squared norm in its top-10 singular values (i.i.d. noise puts about 6% of a 784 x 512
    move there, 7% of a 512 x 512 one: a move at that share is a random walk, not learned features).

    python -m benchmarks.diagnostics alignment --config CONFIG [--checkpoint CK] [--set K=V ...] [--generations N]
    python -m benchmarks.diagnostics capacity --subspace K [--freeze-w2] [--epochs N] [--validation-size N]
    python -m benchmarks.diagnostics energy [--checkpoint CK] [--subspaces 8 16 32 64 128] [--batches N]
    python -m benchmarks.diagnostics displacement NAME=CHECKPOINT ... [--subspace K]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from es_service import checkpoint
from es_service import plan as planning
from es_service.backprop import logits_fn
from es_service.config import Config, load
from es_service.data import load_mnist
from es_service.executors import LocalExecutor
from es_service.runs import load_data, seed_problem
from es_service.strategy import estimate, shaped_update
from es_workers import layer_members, network, noise

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
            result[name] = float(
                torch.nn.functional.cosine_similarity(est.flatten().double(), -grad.flatten().double(), dim=0)
            )
    return result


def alignment(config: Config, theta: torch.Tensor, data, generations: tuple[int, ...] = (0,)) -> dict:
    """Per-block cosines of the service's estimate at ``theta`` for each planned generation (each its own
    members and minibatch), with their mean, and the seconds each estimate took (every member's
    evaluation, the shaping and the update's estimate; the first may include compiling fused kernels,
    so the summary is the median)."""
    table = noise.make_table(planning.noise_seed(config.seed), config.noise.table_size)
    arithmetic = config.network.arithmetic
    problem = seed_problem(config, data)
    executor = LocalExecutor(problem, table)
    rows = []
    for generation in generations:
        plan = planning.make_plan(config, generation, data.train_images.shape[0])
        started = time.perf_counter()
        update = shaped_update(config, plan, executor.run_generation(theta, plan))[0]
        grad = estimate(table, problem, plan, update, theta)
        seconds = time.perf_counter() - started
        index = torch.as_tensor(plan.batch_indices)
        x = data.train_images[index].reshape(-1, 784).float() / 255.0
        cosines = block_cosines(grad, masked_gradient(theta, x, data.train_labels[index], arithmetic))
        rows.append({"cosines": cosines, "seconds": seconds})
    names = [name for name in BLOCKS if all(name in row["cosines"] for row in rows)]
    return {
        "generations": list(generations),
        "per_generation": rows,
        "mean": {name: float(np.mean([row["cosines"][name] for row in rows])) for name in names},
        "seconds": float(np.median([row["seconds"] for row in rows])),
    }


def capacity(
    data,
    subspace: int,
    freeze_w2: bool = False,
    epochs: int = 6,
    project_init: bool = False,
    learning_rate: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    arithmetic: str = "tf-ftz",
) -> list[dict]:
    """Masked backprop (Adam) from the seed's initialisation with W1 = W1_0 + U M: one row per epoch
    with the validation accuracy (when ``data`` holds images out) and the train accuracy.
    ``project_init``: W1_0 projected on span(U) (U U^T W1_0), so the first layer sees the k components
    only: where decay has erased the initialisation, that is what layer-1 members in the subspace keep."""
    basis = layer_members.image_basis(data.train_images, subspace)
    w1, b1, w2, b2, w3, b3 = (part.clone() for part in network.unflatten(planning.seed_theta(seed)))
    if project_init:
        w1 = basis @ (basis.T @ w1)
    moves = torch.zeros(subspace, w1.shape[1], requires_grad=True)
    trained = [moves, b1.requires_grad_(), b2.requires_grad_(), w3.requires_grad_(), b3.requires_grad_()]
    if not freeze_w2:
        trained.append(w2.requires_grad_())
    optimizer = torch.optim.Adam(trained, lr=learning_rate)
    forward = logits_fn(arithmetic, "masked")
    images = data.train_images.reshape(-1, 784).float() / 255.0

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            params = [w1 + basis @ moves, b1, w2, b2, w3, b3]
            return float((forward(x.reshape(-1, 784).float() / 255.0, params).argmax(-1) == y).float().mean())

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for epoch in range(1, epochs + 1):
        for index in torch.randperm(images.shape[0], generator=generator).split(batch_size):
            params = [w1 + basis @ moves, b1, w2, b2, w3, b3]
            loss = torch.nn.functional.cross_entropy(forward(images[index], params), data.train_labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        row = {"epoch": epoch, "train_accuracy": accuracy(data.train_images[:10000], data.train_labels[:10000])}
        if data.validation_images is not None:
            row["validation_accuracy"] = accuracy(data.validation_images, data.validation_labels)
        rows.append(row)
    return rows


def _top_directions(inputs: torch.Tensor) -> torch.Tensor:
    """(n, n) eigenvectors of inputs^T inputs (float64), largest eigenvalue first."""
    return torch.linalg.eigh(inputs.double().T @ inputs.double())[1].flip(-1)


def energy(
    theta: torch.Tensor,
    data,
    subspaces: tuple[int, ...] = (8, 16, 32, 64, 128),
    batches: int = 6,
    batch_size: int = 256,
    sample: int = 8192,
    seed: int = 0,
    arithmetic: str = "tf-ftz",
) -> dict:
    """Per weight matrix and k: the mean over ``batches`` minibatches of the share of the masked
    gradient's squared norm in the top-k directions of the layer's input (from ``sample`` training
    images), "W2 via W1" in span(W1^T U_k), and the flushed share of the first hidden layer."""
    generator = torch.Generator().manual_seed(seed)
    images = data.train_images.reshape(-1, 784).float() / 255.0
    w1, b1, w2, b2, _, _ = network.unflatten(theta)
    ops = network.epilogues(arithmetic)
    x = images[torch.randperm(images.shape[0], generator=generator)[:sample]]
    h1 = ops.hidden1(x @ w1, b1)
    h2 = ops.hidden2(h1 @ w2, b2)
    directions = {"W1": _top_directions(x), "W2": _top_directions(h1), "W3": _top_directions(h2)}
    shares: dict[str, dict[int, list[float]]] = {
        name: {k: [] for k in subspaces} for name in [*directions, "W2 via W1"]
    }
    for _ in range(batches):
        index = torch.randperm(images.shape[0], generator=generator)[:batch_size]
        grads = network.unflatten(masked_gradient(theta, images[index], data.train_labels[index], arithmetic))
        for name, grad in zip(("W1", "W2", "W3"), grads[0::2]):
            total = float(grad.double().square().sum())
            for k in subspaces:
                shares[name][k].append(float((directions[name][:, :k].T @ grad.double()).square().sum()) / total)
        total = float(grads[2].double().square().sum())
        for k in subspaces:
            q = layer_members.hidden_basis(w1, directions["W1"].float(), k).double()
            shares["W2 via W1"][k].append(float((q.T @ grads[2].double()).square().sum()) / total)
    return {
        "flushed_h1": float((h1 == 0).float().mean()),
        "share": {name: {str(k): float(np.mean(v)) for k, v in by_k.items()} for name, by_k in shares.items()},
    }


def top10_share(matrix: torch.Tensor) -> float:
    values = torch.linalg.svdvals(matrix.double())
    return float((values[:10] ** 2).sum() / (values**2).sum())


def displacement(theta: torch.Tensor, start: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per weight matrix: its norm, its displacement's norm and that displacement's top-10 share."""
    result = {}
    for (name, _), now, then in zip(network.PARAM_SHAPES, network.unflatten(theta), network.unflatten(start)):
        if name.startswith("W"):
            result[name] = {
                "norm": float(now.norm()),
                "displacement": float((now - then).norm()),
                "top10_share": top10_share(now - then),
            }
    return result


def noise_top10_shares(seed: int = 0, subspace: int = 0) -> dict[str, float]:
    """The top-10 share of an i.i.d. Gaussian matrix of each weight's shape: the random-walk reference.
    ``subspace`` k adds ``W1 in k dims``: a Gaussian move of W1 confined to k input directions (U G, U
    784 x k orthonormal), the reference for layer-1 members in the images' principal subspace."""
    generator = torch.Generator().manual_seed(seed)
    shares = {
        name: top10_share(torch.randn(shape, generator=generator))
        for name, shape in network.PARAM_SHAPES
        if name.startswith("W")
    }
    if subspace:
        directions = torch.linalg.qr(torch.randn(784, subspace, generator=generator))[0]
        shares[f"W1 in {subspace} dims"] = top10_share(directions @ torch.randn(subspace, 512, generator=generator))
    return shares


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnostics", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    align = commands.add_parser("alignment")
    align.add_argument("--config", required=True)
    align.add_argument("--checkpoint", help="theta to measure at (default: the config's seed initialisation)")
    align.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    align.add_argument("--generations", type=int, default=3, help="planned generations to average over")
    align.add_argument("--out", help="append the result as one JSON line to this file")
    room = commands.add_parser("capacity")
    room.add_argument("--subspace", type=int, required=True, help="principal components W1 moves in")
    room.add_argument("--freeze-w2", action="store_true")
    room.add_argument("--project-init", action="store_true", help="W1_0 projected on the k components")
    room.add_argument("--epochs", type=int, default=6)
    room.add_argument("--validation-size", type=int, default=10000)
    room.add_argument("--out")
    where = commands.add_parser("energy")
    where.add_argument("--checkpoint", help="theta to measure at (default: the seed's initialisation)")
    where.add_argument("--subspaces", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    where.add_argument("--batches", type=int, default=6)
    where.add_argument("--validation-size", type=int, default=10000)
    where.add_argument("--out")
    moved = commands.add_parser("displacement")
    moved.add_argument("thetas", nargs="+", metavar="NAME=CHECKPOINT")
    moved.add_argument("--subspace", type=int, default=0, help="add the noise share of W1 moves in k dimensions")
    moved.add_argument("--out")
    args = parser.parse_args(argv)
    if args.command == "alignment":
        config = load(args.config, args.overrides)
        theta = checkpoint.load(args.checkpoint)["theta"] if args.checkpoint else planning.seed_theta(config.seed)
        result = {
            "config": args.config,
            "checkpoint": args.checkpoint,
            "overrides": args.overrides,
            **alignment(config, theta, load_data(config), tuple(range(args.generations))),
        }
    elif args.command == "capacity":
        data = load_mnist().hold_out(args.validation_size)
        result = {
            "subspace": args.subspace,
            "freeze_w2": args.freeze_w2,
            "project_init": args.project_init,
            "epochs": capacity(data, args.subspace, args.freeze_w2, args.epochs, args.project_init),
        }
    elif args.command == "energy":
        theta = checkpoint.load(args.checkpoint)["theta"] if args.checkpoint else planning.seed_theta(0)
        data = load_mnist().hold_out(args.validation_size)
        result = {"checkpoint": args.checkpoint, **energy(theta, data, tuple(args.subspaces), args.batches)}
    else:
        result = {"noise_top10_share": noise_top10_shares(subspace=args.subspace)}
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
