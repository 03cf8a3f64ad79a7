"""The seed's problem: the deep linear MNIST network at float32's underflow edge (es_workers.network).

Its members are every kind the service has (whole, low-rank, shared first layer, layer, unit, output
and activity members: es_workers.members, es_workers.layer_members), evaluated by
``PopulationEvaluator``. It holds the training images and labels, the sets the center's accuracy is
measured on, the arithmetic, and layer 1's search basis where its members have one. No Ray, no I/O.
"""

from __future__ import annotations

import numpy as np
import torch

from es_workers import network
from es_workers.architecture import Architecture
from es_workers.evaluator import PopulationEvaluator, center_accuracies, set_process_arithmetic
from es_workers.layer_members import Center
from es_workers.problem import Problem, shared_tensor


class FtzMnist(Problem):
    """The network ``arch`` (the seed's: 784-512-512-10 at 2**-125) in ``arithmetic`` on MNIST.

    ``eval_sets``: name -> (uint8 images, labels) the center's accuracy is measured on (``metrics``);
    they stay on the driver (a pickled problem leaves them behind). ``basis``: layer-1 members' input
    subspace (es_workers.layer_members.image_basis), or None. ``fused``: compiled epilogues."""

    counts_correct = True

    def __init__(
        self,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        arithmetic: str = "tf-ftz",
        fused: bool = False,
        basis: torch.Tensor | None = None,
        eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        arch: Architecture = network.SEED,
    ):
        self.arch = arch
        self.num_params = arch.num_params
        self.train_images = shared_tensor(train_images)
        self.train_labels = shared_tensor(train_labels)
        self.arithmetic = arithmetic
        self.fused = fused
        self.basis = None if basis is None else shared_tensor(basis)
        self.eval_sets = eval_sets or {}
        self._on_device, self._eval_device = self.eval_sets, torch.device("cpu")
        self.num_examples = self.train_images.shape[0]

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return self.arch.param_shapes

    def init_theta(self, seed: int) -> torch.Tensor:
        return network.init_theta(seed, self.arch)

    def metrics(self, theta: torch.Tensor) -> dict[str, float]:
        """Each eval set's accuracy and, flushing, the test set's with denormals kept
        (es_workers.evaluator.center_accuracies), on theta's device."""
        if self._eval_device != theta.device:  # copied once per device, not at every evaluation
            sets = self.eval_sets.items()
            self._on_device = {name: (x.to(theta.device), y.to(theta.device)) for name, (x, y) in sets}
            self._eval_device = theta.device
        return center_accuracies(theta, self._on_device, self.arithmetic, fused=self.fused, arch=self.arch)

    def center(self, theta: torch.Tensor, batch_indices: np.ndarray) -> Center:
        basis = None if self.basis is None else self.basis.to(theta.device)
        return Center(theta, basis, self.train_images, batch_indices, self.arithmetic, self.arch)

    def prepare_process(self) -> None:
        set_process_arithmetic(self.arithmetic)

    def evaluator(self, table: torch.Tensor, device: str, threads: int | None = None) -> PopulationEvaluator:
        return PopulationEvaluator(
            table,
            self.train_images,
            self.train_labels,
            self.arithmetic,
            device,
            self.fused,
            threads=threads,
            basis=self.basis,
            arch=self.arch,
        )

    def __getstate__(self) -> dict:
        """As numpy arrays (Ray's object store shares those between a node's workers without copies), and
        without the eval sets."""
        arrays = {name: getattr(self, name) for name in ("train_images", "train_labels", "basis")}
        state = {name: None if value is None else value.numpy() for name, value in arrays.items()}
        return {**state, "arithmetic": self.arithmetic, "fused": self.fused, "arch": self.arch}

    def __setstate__(self, state: dict) -> None:
        images, labels = state["train_images"], state["train_labels"]
        self.__init__(images, labels, state["arithmetic"], state["fused"], state["basis"], arch=state["arch"])
