"""A generation's update as data, and a replica of theta that applies it: the same code on the driver and,
with ``workers.theta_sync: replay``, on every worker, so workers never receive theta itself.

An ``Update`` is O(P) scalars: the generation and one float32 weight per noise slice of each member
group (shaped fitness differences). Everything else the step needs (offsets, sigma, learning rate) the
plan derives from (config, generation). A ``Replica`` holds theta, Adam's state and the generation;
two replicas that apply the same updates stay bitwise equal on one kind of CPU, and ``fingerprint``
(64 bits of theta) tells when one has not. No Ray, no I/O.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from es_service import plan as planning
from es_service import strategy
from es_service.config import Config
from es_workers import layer_members, network

GROUPS = (0, *layer_members.LAYERS)
"""Member groups in an update: 0 the whole members, then each layer's members."""


@dataclass(frozen=True)
class Update:
    generation: int
    """The generation whose fitness this is; applying it turns that generation's theta into the next's."""
    weights: tuple[np.ndarray, ...]
    """Per group in GROUPS, one float32 weight per noise slice (empty for a group without members); for
    activity members, each pair's per-image slopes (units x images, flat): O(P B) scalars."""
    skipped: bool = False
    """No member scored: theta stays and Adam does not step."""

    @property
    def nbytes(self) -> int:
        """Payload bytes: the weights, the generation and the flag."""
        return sum(weights.nbytes for weights in self.weights) + 9


def shaped_update(config: Config, plan: planning.GenerationPlan, outcome) -> tuple[Update, np.ndarray]:
    """(the update, every member's fitness) from one generation's results: each group ranked among
    itself, then one weight per noise slice."""
    es = config.es
    weights, every_fitness = [], []
    for group in GROUPS:
        loss_sums, correct = outcome.results(group)
        fitness = planning.member_fitness(loss_sums, correct, len(plan.batch_indices), es.fitness)
        if group and plan.activity_layers[group - 1]:
            slopes = strategy.activity_slopes(outcome.image_losses[group - 1], plan.noise_std_of(group))
            weights.append(slopes.reshape(-1))
        else:
            antithetic = es.antithetic if group == 0 else True
            shaped = strategy.shape_fitness(fitness, es.fitness_shaping)
            weights.append(np.asarray(strategy.slice_weights(shaped, antithetic), dtype=np.float32))
        every_fitness.append(fitness)
    fitness = np.concatenate(every_fitness)
    return Update(plan.generation, tuple(weights), skipped=not np.isfinite(fitness).any()), fitness


def estimate(
    table: torch.Tensor,
    basis: torch.Tensor | None,
    plan: planning.GenerationPlan,
    update: Update,
    theta: torch.Tensor,
    images: torch.Tensor | None = None,
    arithmetic: str = "tf-ftz",
) -> torch.Tensor:
    """The gradient estimate at ``theta`` (the generation's center): the whole members', with each layer
    that has layer members taking theirs. ``basis``: layer 1's (es_service.plan.layer1_basis);
    ``images``: the training images (uint8), which activity members' estimate reads through the center."""
    whole = update.weights[0]
    members = len(plan.member_offsets)
    grad = (
        strategy.grad_estimate(table, plan.slice_offsets, whole, plan.noise_std, members, rank=plan.rank)
        if members
        else torch.zeros(network.NUM_PARAMS, device=table.device)
    )
    inputs = None
    for layer in layer_members.LAYERS:
        offsets = plan.layer_offsets[layer - 1]
        if len(offsets) and plan.activity_layers[layer - 1]:
            if inputs is None:
                inputs = activity_inputs(images, plan, theta, arithmetic)
            slopes = torch.as_tensor(update.weights[layer].reshape(len(offsets), -1)).to(theta.device)
            start, stop = layer_members.param_range(layer)
            grad[start:stop] = layer_members.activity_estimate(inputs[layer - 1], slopes.T)
        elif len(offsets):
            start, stop = layer_members.param_range(layer)
            subspace = plan.subspaces[layer - 1]
            layer_basis = basis
            if layer == 2 and subspace:
                layer_basis = layer_members.hidden_basis(network.unflatten(theta)[0], basis, subspace)
            grad[start:stop] = strategy.layer_estimate(
                table,
                offsets,
                update.weights[layer],
                layer,
                plan.noise_std_of(layer),
                2 * len(offsets),
                subspace,
                layer_basis,
                plan.unit_layers[layer - 1],
            )
    return grad


def activity_inputs(
    images: torch.Tensor | None, plan: planning.GenerationPlan, theta: torch.Tensor, arithmetic: str
) -> tuple[torch.Tensor, ...]:
    """Each layer's input at the center on the generation's minibatch (layer_members.center_inputs)."""
    if images is None:
        raise ValueError("activity members' estimate needs the training images: attach them to the replica")
    index = torch.as_tensor(plan.batch_indices).to(images.device)
    x = images.reshape(-1, layer_members.INPUTS).index_select(0, index).to(theta.device).float() / 255.0
    with network.single_threaded() if theta.device.type == "cpu" else contextlib.nullcontext():
        return layer_members.center_inputs(x, theta, arithmetic)


def fingerprint(theta: torch.Tensor) -> int:
    """64 bits of theta's bytes (BLAKE2b): equal fingerprints mean, in practice, equal bits."""
    data = theta.detach().cpu().contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class Replica:
    """theta, Adam's state and the generation, stepping on ``Update``s.

    Pickles without the noise table, the basis and the images (a worker already holds them): ``attach`` them after
    unpickling. What is pickled is a snapshot: a worker that joins late, or whose copy drifted, loads one
    and follows updates from there.
    """

    def __init__(
        self,
        config: Config,
        num_train: int,
        theta: torch.Tensor,
        generation: int,
        optimizer_state: dict | None = None,
        table: torch.Tensor | None = None,
        basis: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
    ):
        self.config = config
        self.num_train = num_train
        self.generation = generation
        self.adam = strategy.AdamES.from_config(theta, config.es)
        if optimizer_state is not None:
            self.adam.load_state_dict(optimizer_state)
        self.table, self.basis, self.images = table, basis, images
        self._fingerprint: int | None = None

    @property
    def theta(self) -> torch.Tensor:
        return self.adam.theta.detach()

    def attach(self, table: torch.Tensor, basis: torch.Tensor | None, images: torch.Tensor | None = None) -> Replica:
        self.table, self.basis, self.images = table, basis, images
        return self

    def apply(self, update: Update, plan: planning.GenerationPlan | None = None) -> dict[str, float]:
        """Step on ``update`` (it must be this replica's generation's); returns the step's norm and the
        seconds of the estimate and of Adam. ``plan``: the generation's plan where the caller has it."""
        if update.generation != self.generation:
            raise ValueError(f"update of generation {update.generation} for a replica at {self.generation}")
        started = time.perf_counter()
        plan = plan or planning.make_plan(self.config, self.generation, self.num_train)
        grad = estimate(self.table, self.basis, plan, update, self.theta, self.images, self.config.network.arithmetic)
        if grad.is_cuda:
            torch.cuda.synchronize()
        estimated = time.perf_counter()
        step_norm = 0.0 if update.skipped else self.adam.step(grad, plan.learning_rate)
        self.generation += 1
        self._fingerprint = None
        return {"step_norm": step_norm, "grad_s": estimated - started, "adam_s": time.perf_counter() - estimated}

    def fingerprint(self) -> int:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.theta)
        return self._fingerprint

    def __getstate__(self) -> dict:
        return {
            "config": self.config,
            "num_train": self.num_train,
            "generation": self.generation,
            "theta": self.theta.cpu().clone(),
            "optimizer_state": self.adam.state_dict(),
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(
            state["config"], state["num_train"], state["theta"], state["generation"], state["optimizer_state"]
        )
