"""The ablation's backprop row: the same network and arithmetic trained with torch autograd + Adam.

Two gradients (``gradient``):
  * ``masked`` (default): autograd through the explicit flushes. A flushed element passes no gradient,
    as a ReLU's zero side does, so backprop sees which units the flushes switch off and can use them.
    A bias at exactly 0 is flushed and so never moves (measured: 93.3% test with the flushes, 86.1%
    with them switched off, biases still 0 after 30 epochs; docs/lab-notes/2026-11-27-why-plain-es-stalls.md).
  * ``straight-through``: the seed's TensorFlow gradient. TF's flushes happen inside the GPU kernels
    of linear ops (add, multiply), whose gradients are linear: the backward pass is the linear network's,
    evaluated at the flushed forward activations. This is the row the seed reports as 94% train / 92% test.
Writes a run directory in the same format as ES runs (metrics.jsonl, run.json, checkpoint.pt), so
`es-service report` and `es-service eval` read it unchanged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from es_service import checkpoint
from es_service import plan as planning
from es_service.config import GRADIENTS, Config
from es_service.metrics import MetricsLog
from es_service.rundir import CHECKPOINT_NAME, METRICS_NAME
from es_service.stopping import StopSignals
from es_workers import network
from es_workers.evaluator import center_accuracies


def straight_through(flushing: Callable, linear: Callable) -> Callable:
    """An epilogue whose value is ``flushing``'s, bit for bit wherever ``linear``'s is finite, and whose
    gradient is ``linear``'s."""

    def epilogue(*args: torch.Tensor) -> torch.Tensor:
        soft = linear(*args)
        return flushing(*args).detach() + (soft - soft.detach())

    return epilogue


def logits_fn(
    arithmetic: str, gradient: str, arch: network.Architecture = network.SEED
) -> Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]:
    """``f(x, params) -> logits`` whose autograd is the named gradient (the values are the forward's)."""
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}; allowed: {', '.join(GRADIENTS)}")
    if gradient == "masked" or arithmetic == "linear":
        return lambda x, params: network.forward(x, params, arithmetic, arch=arch)
    flushing, linear = network.epilogues(arithmetic, arch=arch), network.epilogues("linear")
    ops = network.Epilogues(*(straight_through(f, g) for f, g in zip(vars(flushing).values(), vars(linear).values())))
    return lambda x, params: network.forward_with(x, params, ops)


def train_backprop(
    config: Config,
    run_dir: Path,
    data,
    device: str,
    epochs: int,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    time_budget_s: float | None = None,
    gradient: str = "masked",
    theta: torch.Tensor | None = None,
    optimizer_state: dict | None = None,
    start_epoch: int = 0,
    quiet: bool = False,
) -> dict:
    """Minibatch Adam on cross-entropy; one metrics line and one checkpoint per epoch. ``run_dir`` must
    exist. ``theta``: where to start (default: the seed's initialisation, as ES runs start). A resume
    passes its checkpoint's theta, ``optimizer_state`` and epoch as ``start_epoch``: the epochs it skips
    draw their orders all the same, so the result is the uninterrupted run's, bit for bit. SIGTERM and
    SIGINT stop it within a minibatch with Interrupted; the last whole epoch's checkpoint stays."""
    arithmetic, arch = config.network.arithmetic, config.network.architecture()
    logits_of = logits_fn(arithmetic, gradient, arch)
    if theta is None:
        theta = planning.seed_theta(config.seed, arch)
    theta = theta.detach().clone().to(device)
    theta.requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=learning_rate)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    images = data.train_images.reshape(-1, arch.inputs).to(device)
    labels = data.train_labels.to(device)
    eval_sets = data.eval_sets(device)
    generator = torch.Generator().manual_seed(planning.derive_seed(config.seed, planning.STREAM_GENERATION))
    for _ in range(start_epoch):  # the orders of the epochs already run
        torch.randperm(images.shape[0], generator=generator)
    log = MetricsLog(run_dir / METRICS_NAME)
    log.truncate_after(start_epoch)
    started = time.monotonic()
    record: dict = {"generation": start_epoch}
    with StopSignals() as stop, contextlib.closing(log):
        for epoch in range(start_epoch + 1, epochs + 1):
            epoch_start = time.perf_counter()
            order = torch.randperm(images.shape[0], generator=generator).to(device)
            total_loss = 0.0
            for start in range(0, images.shape[0], batch_size):
                stop.raise_if_stopped(
                    f"in epoch {epoch} of {epochs}; "
                    + (
                        f"the checkpoint after epoch {epoch - 1} stays"
                        if epoch > 1
                        else "no epoch had finished, so a resume starts it over"
                    )
                )
                index = order[start : start + batch_size]
                logits = logits_of(images[index].float() / 255.0, network.unflatten(theta, arch=arch))
                loss = torch.nn.functional.cross_entropy(logits, labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach()) * len(index)
            with torch.no_grad():
                record = {
                    "generation": epoch,
                    "wall_s": time.perf_counter() - epoch_start,
                    "fitness_mean": -total_loss / images.shape[0],
                    **center_accuracies(theta.detach(), eval_sets, arithmetic, arch=arch),
                    "time": time.time(),
                }
            log.append(record)  # then the checkpoint: a line past it is dropped and redone by a resume
            state = checkpoint.build(
                config, theta.detach().float(), optimizer.state_dict(), epoch, planning.noise_seed(config.seed)
            )
            checkpoint.save(state, run_dir / CHECKPOINT_NAME)
            if not quiet:
                scores = " ".join(
                    f"{key.removesuffix('_accuracy')} {value:.4f}"
                    for key, value in record.items()
                    if key.endswith("_accuracy")
                )
                print(f"epoch {epoch}: loss {-record['fitness_mean']:.4f} {scores}", flush=True)
            if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                break
    return record
