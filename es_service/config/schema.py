"""Typed, frozen run configuration: the sections, their fields and the rules on them.

The sections are frozen pydantic models (strict types, no unknown keys, choices as ``Literal``); each
field's docstring is its description, and docs/configuration.md is generated from them (``python -m
es_service.config_docs``). Value ranges and the rules across fields are ``Config``'s model validator
(``validate``), each with the hint a user needs. Every field is checked before anything starts; a bad
value raises :class:`ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

Arithmetic = Literal["tf-ftz", "linear", "cpu-ftz"]
FitnessKind = Literal["cross_entropy", "accuracy"]
Executor = Literal["ray", "local"]
ThetaSync = Literal["broadcast", "replay"]
Device = Literal["auto", "cpu", "cuda"]
Schedule = Literal["constant", "linear", "cosine"]
DecayMode = Literal["l2", "decoupled"]
Shaping = Literal["centered_rank", "normalized"]
LayerMemberKind = Literal["rank1", "unit", "activity"]  # how a member of es.w1 or es.w2 moves its layer
OutputMemberKind = Literal["full", "activity"]  # how a member of es.w3 moves its layer (es_workers.layer_members)
Gradient = Literal["masked", "straight-through"]  # backprop's gradients; see es_service/backprop.py
DEVICES = typing.get_args(Device)
GRADIENTS = typing.get_args(Gradient)
WARM_START_STAGES = ("backprop", "finetune")  # in the order they run; each a run directory RUN_DIR/warm_start/NAME
MAX_RANK = 64  # far past where low rank pays: a rank-64 member already reads 27% of a full slice


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: field, bad value, what is allowed."""


class Section(BaseModel):
    """One block of the config. Strict types, because a value of the wrong type is a mistake in the file:
    a bool is not an int, nor "8" an int; an int widens to a float."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _float_text(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if (
            isinstance(value, str)
            and float in (annotation, *typing.get_args(annotation))
            and _FLOAT_TEXT.fullmatch(value.strip())
        ):
            return float(value)  # PyYAML reads `1e-3` (no dot) as a string
        return value


class NetworkConfig(Section):
    arithmetic: Arithmetic = "tf-ftz"
    """tf-ftz: explicit flush in every elementwise op (portable); linear: no flushing; cpu-ftz:
    torch.set_flush_denormal, CPU only."""


class LayerMembersConfig(Section):
    pop_size: int = 0
    """Members (antithetic pairs) that move only this layer's weight and bias (es_workers.layer_members);
    ranked among themselves, their estimate replaces the whole members' for this layer (0: none; at most
    10,000,000)."""
    noise_scale: float = 1.0
    """Their sigma, as a multiple of the scheduled es.noise_std."""
    step_scale: float = 1.0
    """This layer's optimizer step (Adam's update and its decay), as a multiple of the scheduled
    es.learning_rate, whoever estimates it: below 1 for a layer whose estimate is mostly noise, whose
    full steps would randomise it; 0 freezes the layer."""


class HiddenLayerMembersConfig(LayerMembersConfig):
    kind: LayerMemberKind = "rank1"
    """rank1: each member moves the whole matrix by a rank-1 move (and the bias); unit: each member moves
    one hidden unit's incoming weights (a column of the matrix) and its bias, pair i unit i mod 512: no
    512 x 512 matmul per member, so 4-5 times cheaper, and at equal compute a better-aligned estimate
    (docs/results.md); activity: not weight-space ES but activity perturbation (forward-only): pair i
    moves unit i's pre-activation by +-sigma on every image and each image's loss is read, pop_size
    1024 (docs/design.md, "Activity members")."""


class FirstLayerMembersConfig(HiddenLayerMembersConfig):
    subspace: int = 0
    """The rank-1 move's input factor lies in the span of the training images' top-k uncentered
    principal components (0: all 784 pixels); unsupervised image statistics, no labels."""
    subspace_power: float = 0.0
    """Shape of the search within the subspace: component m's coefficient has a standard deviation
    proportional to lambda_m^p (lambda_m: the images' energy along it), scaled so the moves' mean squared
    entry is unchanged; 0: isotropic. p > 0 puts more of each member on the images' main directions,
    p < 0 on the fainter ones (-0.5: every component moves the unit's pre-activation equally)."""


class SecondLayerMembersConfig(HiddenLayerMembersConfig):
    subspace: int = 0
    """Unit members only: a member's move of its unit's incoming weights lies in the span of W1^T U_k,
    the first hidden layer's image of the training images' top-k principal components (recomputed
    from W1 each generation), where most of W2's gradient lies; 0: all 512 inputs. Needs layer-1
    members with es.w1.subspace >= k (their basis is the one used)."""


class OutputLayerMembersConfig(LayerMembersConfig):
    kind: OutputMemberKind = "full"
    """full: each member moves all of W3 and b3; activity: pair i moves logit i's pre-activation by
    +-sigma on every image and each image's loss is read (activity perturbation, forward-only), pop_size 20."""


class ESConfig(Section):
    pop_size: int = 64
    """Members per generation (even when antithetic; at most 10,000,000). 0 only when every layer has its own
    members (es.wN.pop_size) or is frozen (es.wN.step_scale: 0)."""
    antithetic: bool = True
    """Evaluate each noise slice at +sigma and -sigma (mirrored sampling)."""
    noise_std: float = 0.02
    """sigma: standard deviation of the parameter perturbation (1e-6 to 10)."""
    noise_std_final: float | None = None
    """sigma at the last generation (None: constant); follows `schedule`."""
    learning_rate: float = 0.01
    """Adam step size (at most 10)."""
    learning_rate_final: float | None = None
    """Adam step size at the last generation (None: constant); follows `schedule`."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay: near 1 averages the noisy estimate over about 1 / (1 - beta1) generations."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay."""
    schedule: Schedule = "constant"
    """How sigma and the learning rate move to their final values: constant, linear or cosine."""
    weight_decay: float = 0.0
    """Weight decay coefficient; how it acts is set by weight_decay_mode."""
    weight_decay_mode: DecayMode = "l2"
    """l2: Adam descends on -grad + wd * theta (OpenAI-ES); decoupled: AdamW, theta *= 1 - lr * wd each step."""
    weight_norm_cap: float | None = None
    """Largest Frobenius norm of each weight matrix, in units of its He-init norm sqrt(2 * fan_out)
    (32, 32 and 4.47 for W1, W2, W3; None: no cap); a matrix above it is scaled back onto it after each step."""
    fitness: FitnessKind = "cross_entropy"
    """cross_entropy (negative mean cross-entropy) or accuracy, on the generation's minibatch."""
    fitness_shaping: Shaping = "centered_rank"
    """centered_rank (ranks in [-0.5, 0.5], OpenAI-ES) or normalized (z-scores: keeps the size of each difference)."""
    batch_size: int = 256
    """Images in the generation's minibatch (every member sees the same one)."""
    batch_size_final: int | None = None
    """Minibatch size at the last generation (None: constant); grows linearly, rounded to shard_size."""
    shard_size: int = 0
    """Images per fitness shard (0: the whole batch is one shard; at most 60,000). Never derived from the
    worker count."""
    w1: FirstLayerMembersConfig = FirstLayerMembersConfig()
    """Layer-1 members: a rank-1 move of W1 (and b1), evaluated from the shared x W1."""
    w2: SecondLayerMembersConfig = SecondLayerMembersConfig()
    """Layer-2 members: a rank-1 move of W2 (and b2), evaluated from the center's first hidden layer."""
    w3: OutputLayerMembersConfig = OutputLayerMembersConfig()
    """Layer-3 members: a full move of W3 and b3 (5,130 floats), evaluated from the center's last hidden
    layer (about 1/10 of a rank-1 member's time on CPU)."""
    rank: int = 0
    """0: each member's perturbation is a full table slice; r from 1 to 64: each weight matrix moves by
    A B^T / sqrt(r), A and B r columns (low-rank ES)."""
    shared_first_layer: bool = False
    """Full rank only: compute a member's first layer as x W1 + sign * sigma * (x E1), with x W1 shared by
    the tile and x E1 by each antithetic pair (W1 + sigma E1 is never built): a pair costs 0.70 of two
    members' FLOPs. Rounds differently from building W1 + sigma E1, so theta's bits differ."""

    def layers(self) -> tuple[LayerMembersConfig, LayerMembersConfig, LayerMembersConfig]:
        return self.w1, self.w2, self.w3


class NoiseConfig(Section):
    table_size: int = 1 << 25
    """Float32 entries in the shared noise table (must exceed the parameter count, 669,706; at most 2**31)."""


class WorkersConfig(Section):
    executor: Executor = "ray"
    """ray (stateless Ray actors) or local (the same evaluator in the driver's process)."""
    device: Device = "auto"
    """Evaluator device for the local executor: auto (CUDA if present), cpu or cuda. Ray actors use CUDA iff
    they hold a GPU."""
    fused: bool = True
    """Compile each layer's elementwise work into one kernel (torch.compile; bitwise equal to eager, which
    it falls back to if compiling fails)."""
    members_per_tile: int = 8
    """Population members evaluated together in one tile (one worker call; at most 10,000); never changes theta."""
    theta_sync: ThetaSync = "broadcast"
    """How Ray workers get theta each generation; never changes theta. broadcast: from the object store
    (theta's 2.68 MB per worker). replay: each keeps a replica and replays the driver's update from
    O(P) scalars, checked by a fingerprint per result (a snapshot on joining or drifting); see
    docs/scaling.md."""
    count: int = 0
    """Worker actors (0: one per GPU, else one per cpus_per_worker CPUs in the cluster; at most 100,000)."""
    min_count: int = 1
    """Fewest worker actors the pool keeps (elastic lower bound; at most 100,000)."""
    max_count: int = 64
    """Most worker actors the pool starts (elastic upper bound; asked of the autoscaler; at most 100,000)."""
    cpus_per_worker: int = 1
    """CPUs each worker actor reserves (and its torch thread count; at most 4096)."""
    gpus_per_worker: float = 0.0
    """GPUs each worker actor reserves (0: evaluate on CPU)."""
    tile_timeout_s: float = 600.0
    """A tile not returned after this many seconds is handed out again."""
    no_worker_timeout_s: float = 120.0
    """With no live worker for this many seconds, checkpoint and fail (exit 1)."""


class EvalConfig(Section):
    every: int = 10
    """Evaluate the center's train/test accuracy every this many generations (and at the end; at most 10**9)."""
    train_size: int = 10000
    """Training images used for the periodic train accuracy (0: all 60,000; at most what validation_size leaves)."""


class CheckpointConfig(Section):
    every: int = 10
    """Write a checkpoint every this many generations (and at the end, and on SIGTERM/SIGINT; at most 10**9)."""


class WarmStartConfig(Section):
    epochs: int = 0
    """Backprop epochs (torch autograd + Adam, on the run's training images) before ES; ES starts from
    their theta, not the seed's initialisation. 0: no warm start (ES from scratch); at most 100,000."""
    learning_rate: float = 0.001
    """Adam step size of those epochs."""
    finetune_epochs: int = 0
    """Then this many more epochs with a fresh Adam at finetune_learning_rate (0: none; needs epochs >= 1; at
    most 100,000)."""
    finetune_learning_rate: float = 0.0001
    """Adam step size of the fine-tuning epochs."""
    batch_size: int = 128
    """Images per backprop step."""
    gradient: Gradient = "masked"
    """masked: autograd through the flushes; straight-through: the linear network's (the seed's TensorFlow gradient)."""

    def schedules(self) -> list[tuple[int, float]]:
        """(epochs, learning rate) of each stage, in WARM_START_STAGES's order."""
        return [(self.epochs, self.learning_rate), (self.finetune_epochs, self.finetune_learning_rate)]


class Config(Section):
    seed: int = 0
    """Base seed: the initialisation, the noise table, member offsets and minibatches all derive from it
    (0 to 2**63 - 1)."""
    generations: int = 100
    """Generations to train (at most 10**9)."""
    data_dir: str | None = None
    """MNIST location (raw or .gz files); None: ES_DATA_DIR, the user cache, download, registry fallback."""
    validation_size: int = 0
    """The last N training images, held out: never in a minibatch or a backprop epoch, scored as
    validation_accuracy with every evaluation of the center (0: none; at most 50000). Choose settings on
    it, not on test."""
    network: NetworkConfig = NetworkConfig()
    es: ESConfig = ESConfig()
    noise: NoiseConfig = NoiseConfig()
    workers: WorkersConfig = WorkersConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    warm_start: WarmStartConfig = WarmStartConfig()
    """Backprop epochs run before ES in the same command; ES starts from their theta. Each stage is a run
    directory of its own under RUN_DIR/warm_start/. `--init-from` skips the warm start."""

    @model_validator(mode="after")
    def _rules(self) -> Config:
        """Value ranges and the rules across fields (``validate``), each message with its own hint."""
        return validate(self)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def digest(self) -> str:
        """Hash of the fields that define the trajectory of theta (not where or how fast it runs)."""
        return digest_of(self.to_dict())


ADDED_FIELDS = {"w3.kind": "full"}
"""Trajectory fields added after runs were recorded, with their default: hashed only when set."""


def digest_of(data: dict[str, Any]) -> str:
    """``Config.digest`` of a config dict as it was written. A checkpoint from before a field existed
    holds a dict without it, and its digest was taken without it: hashing the dict as stored (not
    the Config it loads into, which fills in the new field's default) keeps old checkpoints loadable."""
    data = json.loads(json.dumps(data))
    data.pop("workers", None)
    data.pop("data_dir", None)
    data["eval"] = None
    data["checkpoint"] = None
    es = data.get("es", {})
    for name, default in ADDED_FIELDS.items():  # runs that leave a newer field at its default keep their digest
        section, field = name.rsplit(".", 1)
        parent = es.get(section, {}) if section != "es" else es
        if isinstance(parent, dict) and parent.get(field, default) == default:
            parent.pop(field, None)
    if all(es.get(name) is None for name in ("noise_std_final", "learning_rate_final", "batch_size_final")):
        data.pop("generations", None)  # schedules stretch over `generations`; otherwise it only says when to stop
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def shown(value: Any, limit: int = 80) -> str:
    """repr(value), cut to ``limit`` characters: whatever the input, a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


MAX_GENERATIONS = 10**9  # a billion generations: decades at the fastest generation this service runs
MAX_MEMBERS = 10**7  # members per generation, ten thousand times the paper's populations
MAX_WORKERS = 100_000
INT_LIMITS = {
    "seed": 2**63 - 1,  # a signed 64-bit integer, as every reader of a checkpoint can hold it
    "generations": MAX_GENERATIONS,
    "es.pop_size": MAX_MEMBERS,
    "es.w1.pop_size": MAX_MEMBERS,
    "es.w2.pop_size": MAX_MEMBERS,
    "es.w3.pop_size": MAX_MEMBERS,
    "es.shard_size": 60000,  # the MNIST training set
    "workers.members_per_tile": 10_000,
    "workers.count": MAX_WORKERS,
    "workers.min_count": MAX_WORKERS,
    "workers.max_count": MAX_WORKERS,
    "workers.cpus_per_worker": 4096,
    "eval.every": MAX_GENERATIONS,
    "checkpoint.every": MAX_GENERATIONS,
    "warm_start.epochs": 100_000,
    "warm_start.finetune_epochs": 100_000,
}
"""Upper bounds of the integers that have no other: a larger value could only waste or break a run (each
field's description in docs/configuration.md names its bound)."""


def validate(config: Config) -> Config:
    """Check value ranges and cross-field rules; return the config unchanged."""
    es, workers, arithmetic = config.es, config.workers, config.network.arithmetic
    for name, limit in INT_LIMITS.items():
        value = functools.reduce(getattr, name.split("."), config)
        _require(value <= limit, f"{name}: {shown(value)} is more than any run can use; use at most {limit:,}")
    _require(config.seed >= 0, f"seed: {config.seed} is negative; use an integer >= 0")
    _require(config.generations >= 1, f"generations: {config.generations}; use an integer >= 1")
    _require(
        not (arithmetic == "cpu-ftz" and workers.gpus_per_worker > 0),
        "network.arithmetic: 'cpu-ftz' with workers.gpus_per_worker > 0: torch.set_flush_denormal "
        "does nothing on CUDA; use tf-ftz (the portable FTZ semantics) or gpus_per_worker: 0",
    )
    _require(
        es.pop_size == 0 or es.pop_size >= 2,
        f"es.pop_size: {es.pop_size}; use an integer >= 2, or 0 when every layer has its own members (es.w1, w2, w3)",
    )
    _require(
        not (es.antithetic and es.pop_size % 2),
        f"es.pop_size: {es.pop_size} is odd but es.antithetic is true; use an even population",
    )
    for name in ("noise_std", "noise_std_final", "learning_rate", "learning_rate_final"):
        value = getattr(es, name)
        _require(value is None or 0 < value < math.inf, f"es.{name}: {value}; use a finite number > 0")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(es, name)
        _require(0 <= value < 1, f"es.{name}: {value}; use a number in [0, 1) (Adam's defaults: 0.9 and 0.999)")
    _require(0 <= es.weight_decay < math.inf, f"es.weight_decay: {es.weight_decay}; use a finite number >= 0")
    _require(
        es.weight_norm_cap is None or 0 < es.weight_norm_cap < math.inf,
        f"es.weight_norm_cap: {es.weight_norm_cap}; use null (no cap) or a finite number > 0 (1.0: the init norm)",
    )
    for name in ("batch_size", "batch_size_final"):
        value = getattr(es, name)
        _require(
            value is None or 1 <= value <= 60000,
            f"es.{name}: {value}; use an integer from 1 to 60000 (the MNIST training set)",
        )
    _validate_layer_members(config)
    _require(0 <= es.rank <= MAX_RANK, f"es.rank: {es.rank}; use 0 (full-rank perturbations) or 1 to {MAX_RANK}")
    _require(
        not (es.rank and arithmetic == "cpu-ftz"),
        f"es.rank: {es.rank} with network.arithmetic 'cpu-ftz': low-rank members need the scaled frame "
        "(cpu-ftz runs at native scale); use es.rank: 0 or tf-ftz",
    )
    _require(
        not (es.shared_first_layer and es.rank),
        f"es.shared_first_layer with es.rank: {es.rank}: low-rank members already share x W1; "
        "set es.shared_first_layer: false, or es.rank: 0",
    )
    _require(
        not (es.shared_first_layer and arithmetic == "cpu-ftz"),
        "es.shared_first_layer with network.arithmetic 'cpu-ftz': a shared first layer needs the scaled "
        "frame (cpu-ftz runs at native scale); use tf-ftz or es.shared_first_layer: false",
    )
    _require(
        0 <= config.validation_size <= 50000,
        f"validation_size: {config.validation_size}; "
        "use 0 (none) up to 50000 (at least 10,000 images stay for training)",
    )
    _require(es.shard_size >= 0, f"es.shard_size: {es.shard_size}; use 0 (one shard) or a positive integer")
    _require(
        workers.members_per_tile >= 1, f"workers.members_per_tile: {workers.members_per_tile}; use an integer >= 1"
    )
    from es_workers.network import NUM_PARAMS

    table_size = config.noise.table_size
    _require(
        table_size > NUM_PARAMS,
        f"noise.table_size: {table_size}; must exceed the parameter count "
        f"{NUM_PARAMS} (2**25 = 33554432 is a good default)",
    )
    _require(table_size <= 1 << 31, f"noise.table_size: {table_size}; at most 2**31 entries (8 GiB)")
    _require(
        not (arithmetic == "cpu-ftz" and workers.device == "cuda"),
        "network.arithmetic: 'cpu-ftz' with workers.device 'cuda': torch.set_flush_denormal does nothing "
        "on CUDA; use tf-ftz (the portable FTZ semantics) or workers.device: cpu",
    )
    _require(workers.count >= 0, f"workers.count: {workers.count}; use 0 (auto) or a positive integer")
    _require(workers.min_count >= 1, f"workers.min_count: {workers.min_count}; use an integer >= 1")
    _require(
        workers.max_count >= workers.min_count,
        f"workers.max_count: {workers.max_count} is below workers.min_count {workers.min_count}",
    )
    _require(workers.cpus_per_worker >= 1, f"workers.cpus_per_worker: {workers.cpus_per_worker}; use an integer >= 1")
    _require(workers.gpus_per_worker >= 0, f"workers.gpus_per_worker: {workers.gpus_per_worker}; use a number >= 0")
    for name in ("tile_timeout_s", "no_worker_timeout_s"):
        _require(getattr(workers, name) > 0, f"workers.{name}: {getattr(workers, name)}; use a number > 0")
    _require(config.eval.every >= 1, f"eval.every: {config.eval.every}; use an integer >= 1")
    training_images = 60000 - config.validation_size
    _require(
        0 <= config.eval.train_size <= training_images,
        f"eval.train_size: {config.eval.train_size}; use 0 (all) or an integer up to {training_images} "
        f"(the training images validation_size {config.validation_size} leaves)",
    )
    _validate_warm_start(config)
    _validate_limits(config)
    _require(config.checkpoint.every >= 1, f"checkpoint.every: {config.checkpoint.every}; use an integer >= 1")
    return config


def _validate_layer_members(config: Config) -> None:
    es = config.es
    for layer, members in enumerate(es.layers(), start=1):
        name = f"es.w{layer}"
        _require(
            members.pop_size >= 0 and members.pop_size % 2 == 0,
            f"{name}.pop_size: {members.pop_size}; use 0 (none) or an even number (antithetic pairs)",
        )
        _require(
            0 < members.noise_scale < math.inf,
            f"{name}.noise_scale: {members.noise_scale}; use a finite number > 0 (1.0: es.noise_std itself)",
        )
        _require(
            not (members.pop_size and config.network.arithmetic == "cpu-ftz"),
            f"{name}.pop_size with network.arithmetic 'cpu-ftz': layer members start from the scaled frame's "
            f"shared products; use tf-ftz (the portable FTZ semantics) or {name}.pop_size: 0",
        )
        _require(
            0 <= members.step_scale < math.inf,
            f"{name}.step_scale: {members.step_scale}; use a finite number >= 0 (0 freezes the layer)",
        )
        _require(
            members.pop_size or es.pop_size or members.step_scale == 0,
            f"es.pop_size: 0 leaves layer {layer} with no members; set {name}.pop_size > 0, es.pop_size > 0, "
            f"or freeze it with {name}.step_scale: 0",
        )
    for layer, members in enumerate(es.layers(), start=1):
        units = (512, 512, 10)[layer - 1]
        _require(
            members.kind != "activity" or members.pop_size == 2 * units,
            f"es.w{layer}.pop_size: {members.pop_size} with es.w{layer}.kind activity: its members are one "
            f"antithetic pair per unit; set es.w{layer}.pop_size: {2 * units}",
        )
    _require(
        es.w1.kind != "activity" or not es.w1.subspace,
        f"es.w1.subspace: {es.w1.subspace} with es.w1.kind activity: activity members move a unit's "
        "pre-activation, not its weights; set es.w1.subspace: 0",
    )
    _require(
        0 <= es.w1.subspace <= 784,
        f"es.w1.subspace: {es.w1.subspace}; use 0 (all 784 pixels) or 1 to 784 principal components",
    )
    _require(
        -2 <= es.w1.subspace_power <= 2,
        f"es.w1.subspace_power: {es.w1.subspace_power}; use a number from -2 to 2 (0: isotropic)",
    )
    _require(
        0 <= es.w2.subspace <= 512,
        f"es.w2.subspace: {es.w2.subspace}; use 0 (all 512 inputs) or 1 to 512 dimensions",
    )
    _require(
        not es.w2.subspace or es.w2.kind == "unit",
        f"es.w2.subspace: {es.w2.subspace} with es.w2.kind {es.w2.kind!r}: only unit members search a "
        "subspace of layer 2; set es.w2.kind: unit, or es.w2.subspace: 0",
    )
    _require(
        not es.w2.subspace or (es.w1.pop_size and es.w2.subspace <= es.w1.subspace),
        f"es.w2.subspace: {es.w2.subspace} needs layer-1 members whose subspace holds at least that many "
        f"principal components (es.w1.pop_size {es.w1.pop_size}, es.w1.subspace {es.w1.subspace}); set "
        f"es.w1.subspace >= {es.w2.subspace} with es.w1.pop_size > 0, or es.w2.subspace: 0",
    )
    _require(
        not (es.w1.subspace_power and not es.w1.subspace),
        f"es.w1.subspace_power: {es.w1.subspace_power} with es.w1.subspace 0: it shapes the search within "
        "the principal subspace; set es.w1.subspace > 0, or subspace_power: 0",
    )


def _validate_warm_start(config: Config) -> None:
    warm = config.warm_start
    for name in ("epochs", "finetune_epochs"):
        value = getattr(warm, name)
        _require(value >= 0, f"warm_start.{name}: {value}; use 0 (none) or a positive number of epochs")
    _require(
        not (warm.finetune_epochs and not warm.epochs),
        f"warm_start.finetune_epochs: {warm.finetune_epochs} with warm_start.epochs 0: fine-tuning follows "
        "the first backprop epochs; set warm_start.epochs >= 1, or finetune_epochs: 0",
    )
    for name in ("learning_rate", "finetune_learning_rate"):
        value = getattr(warm, name)
        _require(0 < value < math.inf, f"warm_start.{name}: {value}; use a finite number > 0")
    _require(
        1 <= warm.batch_size <= 60000,
        f"warm_start.batch_size: {warm.batch_size}; use an integer from 1 to 60000 (the MNIST training set)",
    )
    _require(
        not (warm.epochs and config.network.arithmetic == "cpu-ftz"),
        "warm_start with network.arithmetic 'cpu-ftz': backprop supports tf-ftz and linear (autograd); "
        "use tf-ftz or warm_start.epochs: 0",
    )


SIGMA_RANGE = (1e-6, 10.0)
MAX_LEARNING_RATE = 10.0


def _validate_limits(config: Config) -> None:
    """Bounds that keep a run inside float32: values that could only waste a run are refused before its
    directory exists."""
    es, workers = config.es, config.workers
    low, high = SIGMA_RANGE
    for name in ("noise_std", "noise_std_final"):
        value = getattr(es, name)
        _require(
            value is None or low <= value <= high,
            f"es.{name}: {value}; use a sigma from {low:g} to {high:g}: the estimate divides by sigma, so a "
            "smaller one overflows float32, and a larger one swamps theta's weights (below 0.1) with noise",
        )
    for name in ("learning_rate", "learning_rate_final"):
        value = getattr(es, name)
        _require(
            value is None or value <= MAX_LEARNING_RATE,
            f"es.{name}: {value}; use at most {MAX_LEARNING_RATE:g}: Adam moves every parameter by about "
            "the learning rate each generation, and theta's weights start below 0.1 (default 0.01)",
        )
    for name in ("gpus_per_worker", "tile_timeout_s", "no_worker_timeout_s"):
        value = getattr(workers, name)
        _require(math.isfinite(value), f"workers.{name}: {value}; use a finite number")
