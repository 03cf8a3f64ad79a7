"""The run configuration's schema: frozen, typed sections, each field with its description and its rules.

Each field's docstring is its description, and docs/configuration.md is generated from them (``python
-m es_service.config_docs``). A field's own rules sit in its annotation, a rule across fields is a
model validator of the section that holds them all (es_service/config/base.py); each names the field,
the bad value and what is allowed. The es section and its layer members are in es_service/config/es.py.
"""

from __future__ import annotations

import math
import typing
from typing import Annotated, Any, Literal

from pydantic import model_validator

from es_service.config.base import (
    AT_LEAST_ONE,
    IMAGES,
    POSITIVE,
    TRAINING_IMAGES,
    Section,
    at_most,
    check,
    require,
    rule,
    shown,
)
from es_service.config.digest import digest_of
from es_service.config.es import ESConfig
from es_workers.architecture import MAX_EXPONENT, MIN_EXPONENT, SEED, Architecture

Arithmetic = Literal["tf-ftz", "linear", "cpu-ftz"]
Executor = Literal["ray", "local"]
ThetaSync = Literal["broadcast", "replay"]
Device = Literal["auto", "cpu", "cuda"]
Gradient = Literal["masked", "straight-through"]  # backprop's gradients; see es_service/backprop.py
DEVICES = typing.get_args(Device)
GRADIENTS = typing.get_args(Gradient)
WARM_START_STAGES = ("backprop", "finetune")  # in the order they run; each a run directory RUN_DIR/warm_start/NAME
MAX_GENERATIONS = 10**9  # a billion generations: decades at the fastest generation this service runs
MAX_WORKERS = 100_000

FINITE = rule(math.isfinite, "use a finite number")
Every = Annotated[int, at_most(MAX_GENERATIONS), AT_LEAST_ONE]
Seconds = Annotated[float, rule(lambda seconds: seconds > 0, "use a number > 0"), FINITE]
Epochs = Annotated[
    int, at_most(100_000), rule(lambda epochs: epochs >= 0, "use 0 (none) or a positive number of epochs")
]


MAX_HIDDEN = 16384  # a 16384-16384 hidden pair is 268M parameters: a table of 2**31 still holds it


def _mnist_shaped(sizes: list[int]) -> bool:
    return (
        len(sizes) == 4 and sizes[0] == 784 and sizes[-1] == 10 and all(1 <= size <= MAX_HIDDEN for size in sizes[1:-1])
    )


class NetworkConfig(Section):
    arithmetic: Arithmetic = "tf-ftz"
    """tf-ftz: explicit flush in every elementwise op (portable); linear: no flushing; cpu-ftz:
    torch.set_flush_denormal, CPU only."""
    layer_sizes: Annotated[
        list[int],
        check(
            _mnist_shaped,
            lambda sizes: (
                f"{shown(sizes)}; use [784, H1, H2, 10]: MNIST's pixels, two hidden layers of 1 to "
                f"{MAX_HIDDEN}, 10 classes"
            ),
        ),
    ] = list(SEED.layer_sizes)
    """Inputs, the two hidden layers' widths and outputs (the seed's: [784, 512, 512, 10])."""
    scale_exponent: Annotated[
        int,
        rule(
            lambda exponent: MIN_EXPONENT <= exponent <= MAX_EXPONENT,
            f"use an integer from {MIN_EXPONENT} to {MAX_EXPONENT}",
        ),
    ] = SEED.scale_exponent
    """e: activations are carried at 2**-e (h1 = (x W1 + b1) / 2**e), at float32's underflow edge for the
    seed's 125, where flush-to-zero makes the linear network nonlinear."""

    def architecture(self) -> Architecture:
        """The network's shape as the workers take it."""
        return Architecture(tuple(self.layer_sizes), self.scale_exponent)


class NoiseConfig(Section):
    table_size: Annotated[int, rule(lambda size: size <= 1 << 31, "at most 2**31 entries (8 GiB)")] = 1 << 25
    """Float32 entries in the shared noise table (must exceed the parameter count, 669,706 for the
    seed's layer sizes; at most 2**31)."""


class WorkersConfig(Section):
    executor: Executor = "ray"
    """ray (stateless Ray actors) or local (the same evaluator in the driver's process)."""
    device: Device = "auto"
    """Evaluator device for the local executor: auto (CUDA if present), cpu or cuda. Ray actors use CUDA iff
    they hold a GPU."""
    fused: bool = True
    """Compile each layer's elementwise work into one kernel (torch.compile; bitwise equal to eager, which
    it falls back to if compiling fails)."""
    members_per_tile: Annotated[int, at_most(10_000), AT_LEAST_ONE] = 8
    """Population members evaluated together in one tile (one worker call; at most 10,000); never changes theta."""
    theta_sync: ThetaSync = "broadcast"
    """How Ray workers get theta each generation; never changes theta. broadcast: from the object store
    (theta's 2.68 MB per worker). replay: each keeps a replica and replays the driver's update from
    O(P) scalars, checked by a fingerprint per result (a snapshot on joining or drifting); see
    docs/scaling.md."""
    count: Annotated[
        int, at_most(MAX_WORKERS), rule(lambda count: count >= 0, "use 0 (auto) or a positive integer")
    ] = 0
    """Worker actors (0: one per GPU, else one per cpus_per_worker CPUs in the cluster; at most 100,000)."""
    min_count: Annotated[int, at_most(MAX_WORKERS), AT_LEAST_ONE] = 1
    """Fewest worker actors the pool keeps (elastic lower bound; at most 100,000)."""
    max_count: Annotated[int, at_most(MAX_WORKERS)] = 64
    """Most worker actors the pool starts (elastic upper bound; asked of the autoscaler; at most 100,000)."""
    cpus_per_worker: Annotated[int, at_most(4096), AT_LEAST_ONE] = 1
    """CPUs each worker actor reserves (and its torch thread count; at most 4096)."""
    gpus_per_worker: Annotated[float, rule(lambda gpus: gpus >= 0, "use a number >= 0"), FINITE] = 0.0
    """GPUs each worker actor reserves (0: evaluate on CPU)."""
    tile_timeout_s: Seconds = 600.0
    """A tile not returned after this many seconds is handed out again."""
    no_worker_timeout_s: Seconds = 120.0
    """With no live worker for this many seconds, checkpoint and fail (exit 1)."""

    @model_validator(mode="after")
    def _pool_bounds(self) -> WorkersConfig:
        require(
            self.max_count >= self.min_count,
            f"workers.max_count: {self.max_count} is below workers.min_count {self.min_count}",
        )
        return self


class EvalConfig(Section):
    every: Every = 10
    """Evaluate the center's train/test accuracy every this many generations (and at the end; at most 10**9)."""
    train_size: int = 10000
    """Training images used for the periodic train accuracy (0: all 60,000; at most what validation_size leaves)."""


class CheckpointConfig(Section):
    every: Every = 10
    """Write a checkpoint every this many generations (and at the end, and on SIGTERM/SIGINT; at most 10**9)."""


class WarmStartConfig(Section):
    epochs: Epochs = 0
    """Backprop epochs (torch autograd + Adam, on the run's training images) before ES; ES starts from
    their theta, not the seed's initialisation. 0: no warm start (ES from scratch); at most 100,000."""
    learning_rate: Annotated[float, POSITIVE] = 0.001
    """Adam step size of those epochs."""
    finetune_epochs: Epochs = 0
    """Then this many more epochs with a fresh Adam at finetune_learning_rate (0: none; needs epochs >= 1; at
    most 100,000)."""
    finetune_learning_rate: Annotated[float, POSITIVE] = 0.0001
    """Adam step size of the fine-tuning epochs."""
    batch_size: Annotated[int, IMAGES] = 128
    """Images per backprop step."""
    gradient: Gradient = "masked"
    """masked: autograd through the flushes; straight-through: the linear network's (the seed's TensorFlow gradient)."""

    def schedules(self) -> list[tuple[int, float]]:
        """(epochs, learning rate) of each stage, in WARM_START_STAGES's order."""
        return [(self.epochs, self.learning_rate), (self.finetune_epochs, self.finetune_learning_rate)]

    @model_validator(mode="after")
    def _finetune_follows(self) -> WarmStartConfig:
        require(
            not (self.finetune_epochs and not self.epochs),
            f"warm_start.finetune_epochs: {self.finetune_epochs} with warm_start.epochs 0: fine-tuning follows "
            "the first backprop epochs; set warm_start.epochs >= 1, or finetune_epochs: 0",
        )
        return self


class Config(Section):
    seed: Annotated[
        int, at_most(2**63 - 1), check(lambda seed: seed >= 0, lambda seed: f"{seed} is negative; use an integer >= 0")
    ] = 0
    """Base seed: the initialisation, the noise table, member offsets and minibatches all derive from it
    (0 to 2**63 - 1)."""
    generations: Annotated[int, at_most(MAX_GENERATIONS), AT_LEAST_ONE] = 100
    """Generations to train (at most 10**9)."""
    data_dir: str | None = None
    """MNIST location (raw or .gz files); None: ES_DATA_DIR, the user cache, download, registry fallback."""
    validation_size: Annotated[
        int,
        rule(lambda size: 0 <= size <= 50000, "use 0 (none) up to 50000 (at least 10,000 images stay for training)"),
    ] = 0
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
    def _what_cpu_ftz_refuses(self) -> Config:
        """torch.set_flush_denormal acts on the CPU at native scale: GPUs, the scaled frame (low rank, a
        shared first layer, layer members) and autograd are out."""
        es, workers = self.es, self.workers
        cpu_ftz = self.network.arithmetic == "cpu-ftz"
        require(
            not (cpu_ftz and workers.gpus_per_worker > 0),
            "network.arithmetic: 'cpu-ftz' with workers.gpus_per_worker > 0: torch.set_flush_denormal "
            "does nothing on CUDA; use tf-ftz (the portable FTZ semantics) or gpus_per_worker: 0",
        )
        for layer, members in enumerate(es.layers(), start=1):
            require(
                not (members.pop_size and cpu_ftz),
                f"es.w{layer}.pop_size with network.arithmetic 'cpu-ftz': layer members start from the scaled "
                f"frame's shared products; use tf-ftz (the portable FTZ semantics) or es.w{layer}.pop_size: 0",
            )
        require(
            not (es.rank and cpu_ftz),
            f"es.rank: {es.rank} with network.arithmetic 'cpu-ftz': low-rank members need the scaled frame "
            "(cpu-ftz runs at native scale); use es.rank: 0 or tf-ftz",
        )
        require(
            not (es.shared_first_layer and cpu_ftz),
            "es.shared_first_layer with network.arithmetic 'cpu-ftz': a shared first layer needs the scaled "
            "frame (cpu-ftz runs at native scale); use tf-ftz or es.shared_first_layer: false",
        )
        require(
            not (cpu_ftz and workers.device == "cuda"),
            "network.arithmetic: 'cpu-ftz' with workers.device 'cuda': torch.set_flush_denormal does nothing "
            "on CUDA; use tf-ftz (the portable FTZ semantics) or workers.device: cpu",
        )
        require(
            not (self.warm_start.epochs and cpu_ftz),
            "warm_start with network.arithmetic 'cpu-ftz': backprop supports tf-ftz and linear (autograd); "
            "use tf-ftz or warm_start.epochs: 0",
        )
        return self

    @model_validator(mode="after")
    def _layers_fit_the_network(self) -> Config:
        """Activity members are one pair per unit of their layer; layer 2's subspace lies in its inputs."""
        sizes = self.network.layer_sizes
        for layer, members in enumerate(self.es.layers(), start=1):
            require(
                members.kind != "activity" or members.pop_size == 2 * sizes[layer],
                f"es.w{layer}.pop_size: {members.pop_size} with es.w{layer}.kind activity: its members are one "
                f"antithetic pair per unit; set es.w{layer}.pop_size: {2 * sizes[layer]}",
            )
        require(
            self.es.w2.subspace <= sizes[1],
            f"es.w2.subspace: {self.es.w2.subspace} is more than layer 2's {sizes[1]} inputs "
            f"(network.layer_sizes {sizes}); use 0 (all) or 1 to {sizes[1]}",
        )
        return self

    @model_validator(mode="after")
    def _table_holds_theta(self) -> Config:
        size, params = self.noise.table_size, self.network.architecture().num_params
        require(
            size > params,
            f"noise.table_size: {size}; must exceed the parameter count {params} of network.layer_sizes "
            f"{list(self.network.layer_sizes)} (2**25 = 33554432 is a good default)",
        )
        return self

    @model_validator(mode="after")
    def _train_size_fits(self) -> Config:
        training_images = TRAINING_IMAGES - self.validation_size
        require(
            0 <= self.eval.train_size <= training_images,
            f"eval.train_size: {self.eval.train_size}; use 0 (all) or an integer up to {training_images} "
            f"(the training images validation_size {self.validation_size} leaves)",
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def digest(self) -> str:
        """Hash of the fields that define the trajectory of theta (not where or how fast it runs)."""
        return digest_of(self.to_dict())
