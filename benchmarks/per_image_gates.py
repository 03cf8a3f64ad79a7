"""Gates for per-image estimators: how well each one points along minus the masked gradient, per
compute-second, on the seed's network (es_workers.network, tf-ftz, in the scaled frame) at its
initialisation and at a trained theta. Diagnostics only: the one autograd call is the yardstick
(benchmarks.diagnostics.masked_gradient); every estimator is forward passes and algebra.

Plain-torch references for estimators the service does not have, each a full-theta ascent direction
(on fitness, minus the mean cross-entropy), in theta's order:

  * ``weight_space``: OpenAI ES (Salimans et al. 2017, "Evolution Strategies as a Scalable Alternative
    to Reinforcement Learning"): P antithetic pairs of whole-network moves sigma * eps, one move shared
    by the whole minibatch; fitness F = minus the member's mean loss; estimate
    sum_p (F+ - F-) eps_p / (2 sigma P).
  * ``flipout``: the same moves decorrelated per image (Wen et al. 2018, "Flipout: Efficient
    Pseudo-Independent Weight Perturbations on Mini-Batches"): image n sees layer move dW * (s_n r_n^T)
    with random +-1 signs s_n (inputs) and r_n (outputs), computed as ((h_n * s_n) dW) * r_n, and the
    bias move db * r_n; estimate sum_{p,n} (F_n+ - F_n-) (dW_p * s_n r_n^T) / (2 sigma P B).
  * ``activity``: node perturbation of every unit at once (Widrow and Lehr 1990; the forward gradient
    of Baydin et al. 2022 and Ren et al. 2023 by finite differences): each image's pre-activations
    (matmul outputs, before their flush) move by sigma * xi, K antithetic draws per image; slopes
    (F_n+ - F_n-) xi_n / (2 sigma) averaged over the draws; each layer's estimate (its input at the
    center)^T slopes (es_workers.layer_members.activity_estimate).

With the service's own estimators (benchmarks.diagnostics.alignment: configs/mnist_es_weight_space.yaml's
unit members and configs/mnist_es.yaml's activity members, one unit at a time), each row reports the
per-block cosine with minus the masked gradient on the same minibatch (B = 256), averaged over minibatches,
and the median seconds per estimate.

    python -m benchmarks.per_image_gates [--checkpoint CK] [--batches 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.diagnostics import alignment, block_cosines, masked_gradient
from es_service import checkpoint
from es_service import plan as planning
from es_service.config import load
from es_service.runs import load_data
from es_workers import layer_members, network

ARITHMETIC = "tf-ftz"
WEIGHT_SPACE = "ES, weight space (the seed's method)"
FLIPOUT = "ES, weight space, per-image (Flipout)"
ACTIVITY = "activity perturbation (forward-only)"
PLUS_MINUS = torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1)  # antithetic members stacked first
SERVICE_CONFIGS = {WEIGHT_SPACE: "configs/mnist_es_weight_space.yaml", ACTIVITY: "configs/mnist_es.yaml"}
SERVICE = {  # name: (family, config)
    "unit members, 4096/4096/1024 (service)": (WEIGHT_SPACE, SERVICE_CONFIGS[WEIGHT_SPACE]),
    "activity, one unit at a time, sigma 0.3 (service)": (ACTIVITY, SERVICE_CONFIGS[ACTIVITY]),
}


def image_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(..., B) cross-entropy of every image from logits (..., B, 10)."""
    labels = y.expand(logits.shape[:-1]).reshape(-1)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="none").reshape(
        logits.shape[:-1]
    )


def weight_space(
    theta, x, y, generator, pairs=256, sigma=0.02, chunk=16, arithmetic=ARITHMETIC, fused=True
) -> torch.Tensor:
    """OpenAI ES: ``pairs`` antithetic whole-network moves, one per pair for the whole minibatch."""
    grad = torch.zeros(network.NUM_PARAMS)
    for start in range(0, pairs, chunk):
        eps = torch.randn(min(chunk, pairs - start), network.NUM_PARAMS, generator=generator)
        members = torch.cat([theta + sigma * eps, theta - sigma * eps])
        fitness = -image_losses(network.forward(x, network.unflatten(members), arithmetic, fused), y).mean(dim=1)
        plus, minus = fitness.chunk(2)
        grad.addmv_(eps.T, plus - minus)
    return grad / (2 * sigma * pairs)


def flipout_term(h, move, s, r) -> torch.Tensor:
    """(..., m, B, out): h_n (move_m * s_n r_n^T) for every member m and image n, as ((h * s) move) * r.
    h (B, in) or (..., m, B, in), move (m, in, out), s (m, B, in), r (m, B, out)."""
    return torch.matmul(h * s, move) * r


def flipout_moves(move, s, r, diff) -> torch.Tensor:
    """sum over members m and images n of diff_mn (move_m * s_mn r_mn^T), (in, out): one (in, B) @ (B, out)
    matmul per member."""
    return (move * torch.matmul((s * diff[..., None]).transpose(1, 2), r)).sum(dim=0)


def flipout(theta, x, y, generator, pairs=256, sigma=0.02, chunk=16, arithmetic=ARITHMETIC, fused=True) -> torch.Tensor:
    """Flipout ES: each pair's move, sign-flipped per image (fresh signs per pair and image)."""
    ops = network.epilogues(arithmetic, fused)
    epilogue = (ops.hidden1, ops.hidden2, ops.logits)
    params = network.unflatten(theta)
    grad = torch.zeros(network.NUM_PARAMS)
    grads = network.unflatten(grad)
    batch = x.shape[0]
    for start in range(0, pairs, chunk):
        m = min(chunk, pairs - start)
        moves = network.unflatten(sigma * torch.randn(m, network.NUM_PARAMS, generator=generator))
        signs = [
            [torch.randn(m, batch, n, generator=generator).sign_() for n in shape]  # +-1, each 1/2
            for shape in zip(network.LAYER_SIZES[:-1], network.LAYER_SIZES[1:])
        ]
        h = x  # then (2, m, B, n): the + and - members
        for layer, (s, r) in enumerate(signs):
            weight, bias, move, bias_move = params[2 * layer : 2 * layer + 2] + moves[2 * layer : 2 * layer + 2]
            z = torch.matmul(h, weight) + PLUS_MINUS * flipout_term(h, move, s, r)  # layer 1: one term for both
            h = epilogue[layer](z, bias + PLUS_MINUS * bias_move[:, None, :] * r)
        fitness = -image_losses(h, y)
        diff = fitness[0] - fitness[1]  # (m, B)
        for layer, (s, r) in enumerate(signs):
            grads[2 * layer] += flipout_moves(moves[2 * layer], s, r, diff)
            grads[2 * layer + 1] += (moves[2 * layer + 1] * torch.bmm(diff[:, None, :], r).squeeze(1)).sum(dim=0)
    return grad / (2 * sigma * sigma * pairs * batch)  # moves carry sigma: eps = move / sigma


def activity(theta, x, y, generator, draws=8, sigma=0.3, chunk=8, arithmetic=ARITHMETIC, fused=True) -> torch.Tensor:
    """Node perturbation of every unit of every layer at once, ``draws`` antithetic draws per image."""
    w1, b1, w2, b2, w3, b3 = network.unflatten(theta)
    ops = network.epilogues(arithmetic, fused)
    xw1 = torch.mm(x, w1)
    sums = [torch.zeros(x.shape[0], units) for units in network.LAYER_SIZES[1:]]
    for start in range(0, draws, chunk):
        k = min(chunk, draws - start)
        xi = [torch.randn(k, x.shape[0], units, generator=generator) for units in network.LAYER_SIZES[1:]]
        fitness = []
        for shift in (sigma, -sigma):
            h1 = ops.hidden1(xw1 + shift * xi[0], b1)
            h2 = ops.hidden2(torch.matmul(h1, w2) + shift * xi[1], b2)
            fitness.append(-image_losses(ops.logits(torch.matmul(h2, w3) + shift * xi[2], b3), y))
        diff = fitness[0] - fitness[1]  # (k, B)
        for total, noise in zip(sums, xi):
            total -= (diff[..., None] * noise).sum(dim=0)  # slopes of the loss, as activity_estimate reads
    inputs = layer_members.center_inputs(x, theta, arithmetic)
    return torch.cat(
        [layer_members.activity_estimate(h, total / (2 * sigma * draws)) for h, total in zip(inputs, sums)]
    )


REFERENCES = {  # name: (family, estimator)
    "whole-network ES, P=256 pairs, sigma 0.02": (WEIGHT_SPACE, weight_space),
    "Flipout ES, P=256 pairs, sigma 0.02": (FLIPOUT, flipout),
    **{
        f"activity all-at-once, K={draws}, sigma {sigma}": (
            ACTIVITY,
            functools.partial(activity, draws=draws, sigma=sigma),
        )
        for draws in (8, 64)
        for sigma in (0.1, 0.3)
    },
}


def reference_row(estimator, theta, batches, seed: int = 0) -> dict:
    """Mean per-block cosines over ``batches`` [(x, y, gradient)] and the median seconds per estimate."""
    generator = torch.Generator().manual_seed(seed)
    cosines, seconds = [], []
    for x, y, gradient in batches:
        started = time.perf_counter()
        grad = estimator(theta, x, y, generator)
        seconds.append(time.perf_counter() - started)
        cosines.append(block_cosines(grad, gradient))
    return summary(cosines, seconds)


def summary(cosines: list[dict], seconds: list[float]) -> dict:
    names = [name for name in cosines[0] if all(name in row for row in cosines)]
    return {
        "cosines": {name: float(np.mean([row[name] for row in cosines])) for name in names},
        "seconds": float(np.median(seconds)),
        "seconds_each": seconds,
    }


def gates(thetas: dict, batches: int = 3, only=None) -> list[dict]:
    """One row per estimator (``only``: those names), with its cosines and seconds at each named theta.
    The references see the activity config's minibatches of generations 0, 1, ...; the service's
    estimators their own config's (both configs, seed 0 and B = 256, plan the same ones). Each
    reference runs once untimed first (compiling its fused kernels)."""
    config = load(SERVICE_CONFIGS[ACTIVITY])
    data = load_data(config)
    rows = {name: {"estimator": name, "family": family} for name, (family, _) in {**REFERENCES, **SERVICE}.items()}
    chosen = [name for name in rows if only is None or name in only]
    for where, theta in thetas.items():
        minibatches = []
        for generation in range(batches):
            index = torch.as_tensor(planning.make_plan(config, generation, data.train_images.shape[0]).batch_indices)
            x, y = data.train_images[index].reshape(-1, 784).float() / 255.0, data.train_labels[index]
            minibatches.append((x, y, masked_gradient(theta, x, y, ARITHMETIC)))
        for name in chosen:
            if name in REFERENCES:
                estimator = REFERENCES[name][1]
                if where == next(iter(thetas)):
                    estimator(theta, *minibatches[0][:2], torch.Generator().manual_seed(99))
                rows[name][where] = reference_row(estimator, theta, minibatches)
            else:
                measured = alignment(load(SERVICE[name][1]), theta, data, tuple(range(batches)))
                rows[name][where] = summary(
                    [row["cosines"] for row in measured["per_generation"]],
                    [row["seconds"] for row in measured["per_generation"]],
                )
    return [rows[name] for name in chosen]


def table(rows: list[dict], thetas: list[str]) -> str:
    """The markdown table: W1/W2/W3 cosines at each theta, then seconds per estimate."""
    head = ["estimator", "family"] + [f"{w} cos ({where})" for where in thetas for w in ("W1", "W2", "W3")]
    head += [f"s / estimate ({where})" for where in thetas]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["estimator"], row["family"]]
        cells += [f"{row[where]['cosines'].get(w, float('nan')):.3f}" for where in thetas for w in ("W1", "W2", "W3")]
        cells += [f"{row[where]['seconds']:.2f}" for where in thetas]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.per_image_gates", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="the trained theta (default: init only)")
    parser.add_argument("--batches", type=int, default=3, help="minibatches (B = 256) to average over")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="docs/results/2026-12-07-cpu-per-image/gates")
    parser.add_argument("--note", default="", help="added to the record's note (e.g. where the checkpoint came from)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    thetas = {"init": planning.seed_theta(0)}
    meta = {}
    if args.checkpoint:
        state = checkpoint.load(args.checkpoint)
        thetas["trained"] = state["theta"]
        meta = {"checkpoint": args.checkpoint, "checkpoint_generation": state.get("generation")}
    rows = gates(thetas, args.batches)
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "torch": torch.__version__,
        "commit": commit,
        "threads": args.threads,
        "note": f"the CPU was shared with a training run: seconds are upper bounds, roughly comparable. {args.note}",
        "arithmetic": ARITHMETIC,
        "batch_size": 256,
        "batches": args.batches,
        **meta,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gates.json").write_text(json.dumps(result, indent=1) + "\n")
    head = (
        f"Per-image gates ({result['date']}, {cpu}, torch {torch.__version__}, {args.threads} threads, commit"
        f" {commit[:7]}): cosine with minus the masked gradient ({ARITHMETIC}, B = 256, mean over {args.batches}"
        f" minibatches) per weight matrix, and the median seconds per estimate. {result['note']}\n\n"
    )
    (out / "gates.md").write_text(head + table(rows, list(thetas)))
    print(head + table(rows, list(thetas)))


if __name__ == "__main__":
    main()
