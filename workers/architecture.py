"""The seed network's shape: its four layer sizes and the exponent of its activation scale.

``Architecture((784, 512, 512, 10), 125)`` is the seed's: three layers, activations carried at
2**-125, so they sit at float32's underflow edge (es_workers.network). Another width or exponent is
the same network family with other numbers. Plain Python, no torch: the config checks a noise table
against the parameter count it gives. No Ray, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_EXPONENT, MAX_EXPONENT = 1, 127  # 2**127 is float32's largest power of two


@dataclass(frozen=True)
class Architecture:
    """Layer sizes (inputs, hidden 1, hidden 2, outputs) and the scale exponent e: the network computes
    h1 = (x W1 + b1) / 2**e, h2 = h1 W2 + b2 / 2**e, o = (h2 W3 + b3 / 2**e) * 2**e."""

    layer_sizes: tuple[int, int, int, int] = (784, 512, 512, 10)
    scale_exponent: int = 125

    def __post_init__(self):
        sizes = tuple(self.layer_sizes)
        if len(sizes) != 4 or not all(isinstance(size, int) and size >= 1 for size in sizes):
            raise ValueError(f"layer sizes {list(sizes)}: use four positive integers (inputs, hidden, hidden, outputs)")
        if not MIN_EXPONENT <= self.scale_exponent <= MAX_EXPONENT:
            raise ValueError(f"scale exponent {self.scale_exponent}: use {MIN_EXPONENT} to {MAX_EXPONENT}")
        object.__setattr__(self, "layer_sizes", sizes)

    @property
    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """theta's layout: W1, b1, W2, b2, W3, b3 with their shapes, in order."""
        shapes = []
        for index, (fan_in, fan_out) in enumerate(zip(self.layer_sizes[:-1], self.layer_sizes[1:]), start=1):
            shapes += [(f"W{index}", (fan_in, fan_out)), (f"b{index}", (fan_out,))]
        return shapes

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.param_shapes)

    @property
    def w1_size(self) -> int:
        """W1's floats: it leads theta and every slice."""
        return self.layer_sizes[0] * self.layer_sizes[1]

    @property
    def output_layer_size(self) -> int:
        """W3's and b3's floats: theta's last ones."""
        return self.layer_sizes[-2] * self.layer_sizes[-1] + self.layer_sizes[-1]

    @property
    def inputs(self) -> int:
        return self.layer_sizes[0]

    @property
    def outputs(self) -> int:
        return self.layer_sizes[-1]

    def units(self, layer: int) -> int:
        """Layer ``layer``'s units (1 and 2: hidden, 3: outputs): what its unit and activity members move."""
        return self.layer_sizes[layer]

    def fan_in(self, layer: int) -> int:
        return self.layer_sizes[layer - 1]


SEED = Architecture()
