"""The update rule in one place: ``OpenES`` (Salimans et al. 2017) over a problem, as ask and tell.

Fitness shaping (centered ranks or z-scores) per member group, one weight per noise slice (or, for
per-image kinds, each image's slope), each member kind's estimate (es_workers.kinds), and Adam with
L2 or decoupled weight decay, the weight-norm cap and per-layer step scales. What a generation
evaluates, with its scheduled sigma and learning rate, is the plan (es_service.plan). No Ray, no I/O.

Sign convention: fitness is maximised. The estimate approximates d E[F(theta + sigma eps)] / d theta
(an ascent direction); the optimizer *descends* on ``-estimate + weight_decay * theta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from es_service import plan as planning
from es_workers import layer_members, network
from es_workers.problem import Problem

if TYPE_CHECKING:
    from es_service.config import Config, ESConfig


def centered_ranks(fitness: np.ndarray) -> np.ndarray:
    """Ranks mapped to [-0.5, 0.5]; non-finite fitness ranks worst. Ties break by member index. With no
    finite fitness at all, zeros: ranks by index alone would be a made-up direction."""
    if not np.isfinite(fitness).any():
        return np.zeros(len(fitness))
    values = np.where(np.isfinite(fitness), fitness, -np.inf)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    if len(values) == 1:
        return np.zeros(1)
    return ranks / (len(values) - 1) - 0.5


def normalized(fitness: np.ndarray) -> np.ndarray:
    """Fitness z-scored across the population; non-finite fitness counts as the worst finite value.

    Unlike ranks it keeps how much better a member did: with antithetic pairs on a shared minibatch,
    (F+ - F-) / 2 sigma is a finite-difference slope along the slice, and the estimate is the plain
    Gaussian-smoothing gradient up to one scale, which Adam normalises away.
    """
    finite = np.isfinite(fitness)
    if not finite.any():
        return np.zeros(len(fitness))
    values = np.where(finite, fitness, fitness[finite].min())
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros(len(values))


SHAPINGS = {"centered_rank": centered_ranks, "normalized": normalized}


def shape_fitness(fitness: np.ndarray, shaping: str) -> np.ndarray:
    if shaping not in SHAPINGS:
        raise ValueError(f"unknown fitness shaping {shaping!r}; allowed: {', '.join(SHAPINGS)}")
    return SHAPINGS[shaping](np.asarray(fitness, dtype=np.float64))


def slice_weights(shaped: np.ndarray, antithetic: bool) -> np.ndarray:
    """One weight per noise slice: (w+ - w-) per antithetic pair, else each member's own weight."""
    if antithetic:
        return shaped[0::2] - shaped[1::2]
    return shaped


def activity_slopes(image_losses: np.ndarray, noise_std: float) -> np.ndarray:
    """(pairs, images) float32 central differences (loss(+sigma) - loss(-sigma)) / (2 sigma) of activity
    members' per-image losses (pair i: members 2i and 2i + 1): each image's slope along its unit's
    pre-activation. An image without two finite losses gives no slope (0)."""
    losses = np.asarray(image_losses, dtype=np.float64)
    slopes = (losses[0::2] - losses[1::2]) / (2.0 * noise_std)
    return np.where(np.isfinite(slopes), slopes, 0.0).astype(np.float32)


def cap_weight_norms(theta: torch.Tensor, multiplier: float, arch: network.Architecture = network.SEED) -> None:
    """Scale each weight matrix whose Frobenius norm exceeds ``multiplier`` times its expected He-init
    norm sqrt(2 * fan_out) (network.init_theta draws N(0, 2 / fan_in)) back onto that cap, in place.

    The flush threshold is fixed, so the size of the weights decides how nonlinear the tf-ftz network
    is: growing weights push every activation past it and the network turns linear. A cap bounds the
    size without pulling on it below the cap (decoupled decay always pulls, and the norm where its pull
    balances the noisy steps' growth falls with the learning rate).
    The norm is summed in float64 on one thread, so the result does not depend on the thread count.
    """
    with torch.no_grad(), network.single_threaded():
        for weights in network.unflatten(theta, arch=arch)[0::2]:  # views of W1, W2, W3
            cap = multiplier * math.sqrt(2.0 * weights.shape[1])
            norm = float(torch.linalg.vector_norm(weights, dtype=torch.float64))
            if norm > cap:
                weights.mul_(cap / norm)


class AdamES:
    """torch.optim.Adam stepping one flat float32 theta on the ES estimate (EvoTorch's pattern).

    ``decoupled`` weight decay uses torch.optim.AdamW instead (Loshchilov & Hutter 2019): theta shrinks
    by lr * wd each step whatever the gradient's scale. Through Adam's normalisation an L2 term is
    negligible next to ES's noisy estimate, so only the decoupled form holds the weight norm down.
    """

    def __init__(
        self,
        theta: torch.Tensor,
        learning_rate: float,
        weight_decay: float,
        decoupled: bool = False,
        weight_norm_cap: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_step_scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
        arch: network.Architecture = network.SEED,
    ):
        self.theta = torch.nn.Parameter(theta.detach().clone(), requires_grad=False)
        self.arch = arch
        self.weight_norm_cap = weight_norm_cap
        self.layer_step_scales = {
            layer: scale for layer, scale in zip(layer_members.LAYERS, layer_step_scales) if scale != 1.0
        }
        if decoupled:
            self.weight_decay = 0.0
            self.optimizer = torch.optim.AdamW([self.theta], lr=learning_rate, betas=betas, weight_decay=weight_decay)
        else:
            self.weight_decay = weight_decay
            self.optimizer = torch.optim.Adam([self.theta], lr=learning_rate, betas=betas)

    @classmethod
    def from_config(cls, theta: torch.Tensor, es: ESConfig, arch: network.Architecture = network.SEED) -> AdamES:
        """The optimizer an ``ESConfig`` describes (``arch``: the network whose layers it caps and scales)."""
        return cls(
            theta,
            es.learning_rate,
            es.weight_decay,
            decoupled=es.weight_decay_mode == "decoupled",
            weight_norm_cap=es.weight_norm_cap,
            betas=(es.adam_beta1, es.adam_beta2),
            layer_step_scales=tuple(layer.step_scale for layer in es.layers()),
            arch=arch,
        )

    def step(self, grad: torch.Tensor, learning_rate: float) -> float:
        """One descent step on -grad + weight_decay * theta; returns the step's L2 norm."""
        before = self.theta.detach().clone()
        direction = -grad.to(self.theta.device)
        if self.weight_decay:
            direction = direction + self.weight_decay * self.theta.detach()
        self.theta.grad = direction
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.step()
        self.theta.grad = None
        for layer, scale in self.layer_step_scales.items():  # Adam's whole step, decay included, scales with lr
            start, stop = layer_members.param_range(layer, self.arch)
            now, then = self.theta.detach()[start:stop], before[start:stop]
            now.copy_(then if scale == 0 else then + scale * (now - then))
        if self.weight_norm_cap is not None:
            cap_weight_norms(self.theta.detach(), self.weight_norm_cap, self.arch)
        return float(torch.linalg.vector_norm(self.theta.detach() - before))

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


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


GROUPS = (0, *layer_members.LAYERS)
"""Member groups in an update: 0 the whole members, then each layer's members."""


def shaped_update(config: Config, plan: planning.GenerationPlan, outcome) -> tuple[Update, np.ndarray]:
    """(the update, every member's fitness) from one generation's results: each group ranked among
    itself, then one weight per noise slice."""
    es = config.es
    weights, every_fitness = [], []
    for group in GROUPS:
        loss_sums, correct = outcome.results(group)
        fitness = planning.member_fitness(loss_sums, correct, len(plan.batch_indices), es.fitness)
        if plan.kinds[group].per_image:
            slopes = activity_slopes(outcome.image_losses[group - 1], plan.noise_std_of(group))
            weights.append(slopes.reshape(-1))
        else:
            antithetic = es.antithetic if group == 0 else True
            shaped = shape_fitness(fitness, es.fitness_shaping)
            weights.append(np.asarray(slice_weights(shaped, antithetic), dtype=np.float32))
        every_fitness.append(fitness)
    fitness = np.concatenate(every_fitness)
    return Update(plan.generation, tuple(weights), skipped=not np.isfinite(fitness).any()), fitness


def estimate(
    table: torch.Tensor, problem: Problem, plan: planning.GenerationPlan, update: Update, theta: torch.Tensor
) -> torch.Tensor:
    """The gradient estimate at ``theta`` (the generation's center): the whole members' kind's, with each
    layer that has layer members taking its kind's (es_workers.kinds; the center's inputs they read
    come from the problem)."""
    count = len(plan.member_offsets)
    center = problem.center(theta, plan.batch_indices)
    grad = (
        plan.kinds[0].estimate(table, plan.slice_offsets, update.weights[0], plan.noise_std, count, center)
        if count
        else torch.zeros(problem.num_params, device=table.device)
    )
    for layer, offsets in zip(layer_members.LAYERS, plan.layer_offsets):
        if len(offsets):
            kind = plan.kinds[layer]
            start, stop = kind.param_range
            sigma = plan.noise_std_of(layer)
            grad[start:stop] = kind.estimate(table, offsets, update.weights[layer], sigma, 2 * len(offsets), center)
    return grad


class OpenES:
    """OpenAI-ES with Adam over a ``Problem``, as ask and tell (evosax's and EvoTorch's interface).

    ``ask(generation)``: the generation's plan, a pure function of (config, generation): its members
    (noise-table offsets and signs), sigma, the learning rate, the minibatch and the tiles.
    ``tell(plan, outcome)``: the update, O(P) scalars: each member group's fitness shaped among
    itself, one weight per noise slice. ``estimate`` and ``step``: the gradient estimate from an
    update, and Adam's step on it, with the weight decay and the norm cap. The driver and every
    replica of theta (es_service.replica) run them on the same update, so their bits stay equal.
    """

    def __init__(self, config: Config, problem: Problem):
        self.config, self.problem = config, problem

    def ask(self, generation: int) -> planning.GenerationPlan:
        return planning.make_plan(self.config, generation, self.problem.num_examples, self.problem.num_params)

    def tell(self, plan: planning.GenerationPlan, outcome) -> tuple[Update, np.ndarray]:
        """(the update, every member's fitness)."""
        return shaped_update(self.config, plan, outcome)

    def optimizer(self, theta: torch.Tensor, state: dict | None = None) -> AdamES:
        """Adam over ``theta`` as es.* says (``state``: a checkpoint's)."""
        adam = AdamES.from_config(theta, self.config.es, self.config.network.architecture())
        if state is not None:
            adam.load_state_dict(state)
        return adam

    def estimate(self, table: torch.Tensor, plan: planning.GenerationPlan, update: Update, theta: torch.Tensor):
        return estimate(table, self.problem, plan, update, theta)

    def step(self, adam: AdamES, grad: torch.Tensor, plan: planning.GenerationPlan, update: Update) -> float:
        """Adam's step on ``grad`` at the plan's learning rate (none for a skipped update); its norm."""
        return 0.0 if update.skipped else adam.step(grad, plan.learning_rate)
