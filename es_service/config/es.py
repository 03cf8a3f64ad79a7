"""The es section: the population, its noise and its steps, and the layer members (es.w1, es.w2, es.w3:
members that move one layer only, es_workers.layer_members). The rules between the layer members and
the rest of es.* are ESConfig's."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import model_validator

from es_service.config.base import IMAGES, POSITIVE, TRAINING_IMAGES, Section, at_most, require, rule

FitnessKind = Literal["cross_entropy", "accuracy"]
Schedule = Literal["constant", "linear", "cosine"]
DecayMode = Literal["l2", "decoupled"]
Shaping = Literal["centered_rank", "normalized"]
LayerMemberKind = Literal["rank1", "unit", "activity"]  # how a member of es.w1 or es.w2 moves its layer
OutputMemberKind = Literal["full", "activity"]  # how a member of es.w3 moves its layer (es_workers.layer_members)
MAX_RANK = 64  # far past where low rank pays: a rank-64 member already reads 27% of a full slice
MAX_MEMBERS = 10**7  # members per generation, ten thousand times the paper's populations
SIGMA_RANGE = (1e-6, 10.0)
MAX_LEARNING_RATE = 10.0

# sigma and the step keep a run inside float32: values that could only waste a run are refused before it starts
SIGMA = rule(
    lambda sigma: SIGMA_RANGE[0] <= sigma <= SIGMA_RANGE[1],
    f"use a sigma from {SIGMA_RANGE[0]:g} to {SIGMA_RANGE[1]:g}: the estimate divides by sigma, so a smaller one "
    "overflows float32, and a larger one swamps theta's weights (below 0.1) with noise",
)
ADAM_STEP = rule(
    lambda rate: rate <= MAX_LEARNING_RATE,
    f"use at most {MAX_LEARNING_RATE:g}: Adam moves every parameter by about the learning rate each generation, "
    "and theta's weights start below 0.1 (default 0.01)",
)
ADAM_BETA = rule(lambda beta: 0 <= beta < 1, "use a number in [0, 1) (Adam's defaults: 0.9 and 0.999)")


class LayerMembersConfig(Section):
    pop_size: Annotated[
        int,
        at_most(MAX_MEMBERS),
        rule(lambda size: size >= 0 and size % 2 == 0, "use 0 (none) or an even number (antithetic pairs)"),
    ] = 0
    """Members (antithetic pairs) that move only this layer's weight and bias (es_workers.layer_members);
    ranked among themselves, their estimate replaces the whole members' for this layer (0: none; at most
    10,000,000)."""
    noise_scale: Annotated[
        float, rule(lambda scale: 0 < scale < math.inf, "use a finite number > 0 (1.0: es.noise_std itself)")
    ] = 1.0
    """Their sigma, as a multiple of the scheduled es.noise_std."""
    step_scale: Annotated[
        float, rule(lambda scale: 0 <= scale < math.inf, "use a finite number >= 0 (0 freezes the layer)")
    ] = 1.0
    """This layer's optimizer step (Adam's update and its decay), as a multiple of the scheduled
    es.learning_rate, whoever estimates it: below 1 for a layer whose estimate is mostly noise, whose
    full steps would randomise it; 0 freezes the layer."""


class HiddenLayerMembersConfig(LayerMembersConfig):
    kind: LayerMemberKind = "rank1"
    """rank1: each member moves the whole matrix by a rank-1 move (and the bias); unit: each member moves
    one hidden unit's incoming weights (a column of the matrix) and its bias, pair i unit i mod 512: no
    512 x 512 matmul per member, so 4-5 times cheaper, and at equal compute a better-aligned estimate
    (docs/lab-notes/2026-11-30-es-alone-layer-and-unit-members.md); activity: not weight-space ES but
    activity perturbation (forward-only): pair i moves unit i's pre-activation by +-sigma on every
    image and each image's loss is read, pop_size 1024 (docs/design.md, "Activity members")."""


class FirstLayerMembersConfig(HiddenLayerMembersConfig):
    subspace: Annotated[
        int, rule(lambda size: 0 <= size <= 784, "use 0 (all 784 pixels) or 1 to 784 principal components")
    ] = 0
    """The rank-1 move's input factor lies in the span of the training images' top-k uncentered
    principal components (0: all 784 pixels); unsupervised image statistics, no labels."""
    subspace_power: Annotated[
        float, rule(lambda power: -2 <= power <= 2, "use a number from -2 to 2 (0: isotropic)")
    ] = 0.0
    """Shape of the search within the subspace: component m's coefficient has a standard deviation
    proportional to lambda_m^p (lambda_m: the images' energy along it), scaled so the moves' mean squared
    entry is unchanged; 0: isotropic. p > 0 puts more of each member on the images' main directions,
    p < 0 on the fainter ones (-0.5: every component moves the unit's pre-activation equally)."""


class SecondLayerMembersConfig(HiddenLayerMembersConfig):
    subspace: Annotated[int, rule(lambda size: 0 <= size <= 512, "use 0 (all 512 inputs) or 1 to 512 dimensions")] = 0
    """Unit members only: a member's move of its unit's incoming weights lies in the span of W1^T U_k,
    the first hidden layer's image of the training images' top-k principal components (recomputed
    from W1 each generation), where most of W2's gradient lies; 0: all 512 inputs. Needs layer-1
    members with es.w1.subspace >= k (their basis is the one used)."""


class OutputLayerMembersConfig(LayerMembersConfig):
    kind: OutputMemberKind = "full"
    """full: each member moves all of W3 and b3; activity: pair i moves logit i's pre-activation by
    +-sigma on every image and each image's loss is read (activity perturbation, forward-only), pop_size 20."""


class ESConfig(Section):
    pop_size: Annotated[
        int,
        at_most(MAX_MEMBERS),
        rule(
            lambda size: size == 0 or size >= 2,
            "use an integer >= 2, or 0 when every layer has its own members (es.w1, w2, w3)",
        ),
    ] = 64
    """Members per generation (even when antithetic; at most 10,000,000). 0 only when every layer has its own
    members (es.wN.pop_size) or is frozen (es.wN.step_scale: 0)."""
    antithetic: bool = True
    """Evaluate each noise slice at +sigma and -sigma (mirrored sampling)."""
    noise_std: Annotated[float, POSITIVE, SIGMA] = 0.02
    """sigma: standard deviation of the parameter perturbation (1e-6 to 10)."""
    noise_std_final: Annotated[float | None, POSITIVE, SIGMA] = None
    """sigma at the last generation (None: constant); follows `schedule`."""
    learning_rate: Annotated[float, POSITIVE, ADAM_STEP] = 0.01
    """Adam step size (at most 10)."""
    learning_rate_final: Annotated[float | None, POSITIVE, ADAM_STEP] = None
    """Adam step size at the last generation (None: constant); follows `schedule`."""
    adam_beta1: Annotated[float, ADAM_BETA] = 0.9
    """Adam's first-moment decay: near 1 averages the noisy estimate over about 1 / (1 - beta1) generations."""
    adam_beta2: Annotated[float, ADAM_BETA] = 0.999
    """Adam's second-moment decay."""
    schedule: Schedule = "constant"
    """How sigma and the learning rate move to their final values: constant, linear or cosine."""
    weight_decay: Annotated[float, rule(lambda decay: 0 <= decay < math.inf, "use a finite number >= 0")] = 0.0
    """Weight decay coefficient; how it acts is set by weight_decay_mode."""
    weight_decay_mode: DecayMode = "l2"
    """l2: Adam descends on -grad + wd * theta (OpenAI-ES); decoupled: AdamW, theta *= 1 - lr * wd each step."""
    weight_norm_cap: Annotated[
        float | None,
        rule(lambda cap: 0 < cap < math.inf, "use null (no cap) or a finite number > 0 (1.0: the init norm)"),
    ] = None
    """Largest Frobenius norm of each weight matrix, in units of its He-init norm sqrt(2 * fan_out)
    (32, 32 and 4.47 for W1, W2, W3; None: no cap); a matrix above it is scaled back onto it after each step."""
    fitness: FitnessKind = "cross_entropy"
    """cross_entropy (negative mean cross-entropy) or accuracy, on the generation's minibatch."""
    fitness_shaping: Shaping = "centered_rank"
    """centered_rank (ranks in [-0.5, 0.5], OpenAI-ES) or normalized (z-scores: keeps the size of each difference)."""
    batch_size: Annotated[int, IMAGES] = 256
    """Images in the generation's minibatch (every member sees the same one)."""
    batch_size_final: Annotated[int | None, IMAGES] = None
    """Minibatch size at the last generation (None: constant); grows linearly, rounded to shard_size."""
    shard_size: Annotated[
        int, at_most(TRAINING_IMAGES), rule(lambda size: size >= 0, "use 0 (one shard) or a positive integer")
    ] = 0
    """Images per fitness shard (0: the whole batch is one shard; at most 60,000). Never derived from the
    worker count."""
    w1: FirstLayerMembersConfig = FirstLayerMembersConfig()
    """Layer-1 members: a rank-1 move of W1 (and b1), evaluated from the shared x W1."""
    w2: SecondLayerMembersConfig = SecondLayerMembersConfig()
    """Layer-2 members: a rank-1 move of W2 (and b2), evaluated from the center's first hidden layer."""
    w3: OutputLayerMembersConfig = OutputLayerMembersConfig()
    """Layer-3 members: a full move of W3 and b3 (5,130 floats), evaluated from the center's last hidden
    layer (about 1/10 of a rank-1 member's time on CPU)."""
    rank: Annotated[
        int, rule(lambda rank: 0 <= rank <= MAX_RANK, f"use 0 (full-rank perturbations) or 1 to {MAX_RANK}")
    ] = 0
    """0: each member's perturbation is a full table slice; r from 1 to 64: each weight matrix moves by
    A B^T / sqrt(r), A and B r columns (low-rank ES)."""
    shared_first_layer: bool = False
    """Full rank only: compute a member's first layer as x W1 + sign * sigma * (x E1), with x W1 shared by
    the tile and x E1 by each antithetic pair (W1 + sigma E1 is never built): a pair costs 0.70 of two
    members' FLOPs. Rounds differently from building W1 + sigma E1, so theta's bits differ."""

    def layers(self) -> tuple[LayerMembersConfig, LayerMembersConfig, LayerMembersConfig]:
        return self.w1, self.w2, self.w3

    @model_validator(mode="after")
    def _who_moves_each_layer(self) -> ESConfig:
        """The whole members, the layer's own, or nobody (then the layer is frozen)."""
        require(
            not (self.antithetic and self.pop_size % 2),
            f"es.pop_size: {self.pop_size} is odd but es.antithetic is true; use an even population",
        )
        for layer, members in enumerate(self.layers(), start=1):
            require(
                members.pop_size or self.pop_size or members.step_scale == 0,
                f"es.pop_size: 0 leaves layer {layer} with no members; set es.w{layer}.pop_size > 0, es.pop_size > 0, "
                f"or freeze it with es.w{layer}.step_scale: 0",
            )
        return self

    @model_validator(mode="after")
    def _how_members_search(self) -> ESConfig:
        """Subspaces are for weight moves (layer 2's for unit members, inside layer 1's basis); a shared
        first layer is for full-rank members."""
        w1, w2 = self.w1, self.w2
        require(
            w1.kind != "activity" or not w1.subspace,
            f"es.w1.subspace: {w1.subspace} with es.w1.kind activity: activity members move a unit's "
            "pre-activation, not its weights; set es.w1.subspace: 0",
        )
        require(
            not w2.subspace or w2.kind == "unit",
            f"es.w2.subspace: {w2.subspace} with es.w2.kind {w2.kind!r}: only unit members search a "
            "subspace of layer 2; set es.w2.kind: unit, or es.w2.subspace: 0",
        )
        require(
            not w2.subspace or (w1.pop_size and w2.subspace <= w1.subspace),
            f"es.w2.subspace: {w2.subspace} needs layer-1 members whose subspace holds at least that many "
            f"principal components (es.w1.pop_size {w1.pop_size}, es.w1.subspace {w1.subspace}); set "
            f"es.w1.subspace >= {w2.subspace} with es.w1.pop_size > 0, or es.w2.subspace: 0",
        )
        require(
            not (w1.subspace_power and not w1.subspace),
            f"es.w1.subspace_power: {w1.subspace_power} with es.w1.subspace 0: it shapes the search within "
            "the principal subspace; set es.w1.subspace > 0, or subspace_power: 0",
        )
        require(
            not (self.shared_first_layer and self.rank),
            f"es.shared_first_layer with es.rank: {self.rank}: low-rank members already share x W1; "
            "set es.shared_first_layer: false, or es.rank: 0",
        )
        return self
