"""The seed's deep linear MNIST network and its float32 arithmetic near underflow.

OpenAI, "Nonlinear Computation in Deep Linear Networks" (2017): a 784-512-512-10 linear network whose
activations are scaled by s = 2**125, so they sit at float32's underflow edge. With flush-to-zero
elementwise ops the network is nonlinear; with denormals kept it is exactly linear.

    h1 = (x W1 + b1) / s,   h2 = h1 W2 + b2 / s,   o = (h2 W3 + b3 / s) * s

Arithmetic modes (see FINDINGS §1):
  * ``tf-ftz``: matmuls in IEEE float32 keeping denormals; every elementwise op flushes its inputs and
    its result (|x| < 2**-126 becomes 0). TensorFlow-on-GPU semantics, identical on CPU and CUDA.
  * ``linear``: no flushing anywhere (the control).
  * ``cpu-ftz``: plain ops under the process-wide ``torch.set_flush_denormal(True)`` (CPU only).

No Ray and no I/O here.
"""

from __future__ import annotations

import math

import torch

SCALE = 2.0**125
MIN_NORMAL = 2.0**-126
LAYER_SIZES = (784, 512, 512, 10)


def _layout() -> list[tuple[str, tuple[int, ...]]]:
    shapes = []
    for index, (fan_in, fan_out) in enumerate(zip(LAYER_SIZES[:-1], LAYER_SIZES[1:]), start=1):
        shapes.append((f"W{index}", (fan_in, fan_out)))
        shapes.append((f"b{index}", (fan_out,)))
    return shapes


PARAM_SHAPES = _layout()
NUM_PARAMS = sum(math.prod(shape) for _, shape in PARAM_SHAPES)


def unflatten(flat: torch.Tensor) -> list[torch.Tensor]:
    """Views of W1, b1, W2, b2, W3, b3 into a flat vector (or a batch of them, shape (..., NUM_PARAMS))."""
    if flat.shape[-1] != NUM_PARAMS:
        raise ValueError(f"expected {NUM_PARAMS} parameters in the last dimension, got {tuple(flat.shape)}")
    views, start = [], 0
    lead = flat.shape[:-1]
    for _, shape in PARAM_SHAPES:
        size = math.prod(shape)
        views.append(flat[..., start : start + size].reshape(*lead, *shape))
        start += size
    return views


def init_theta(seed: int) -> torch.Tensor:
    """The seed's initialisation: weights N(0, 2/fan_in), zero biases, as one flat float32 vector."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for name, shape in PARAM_SHAPES:
        if name.startswith("W"):
            parts.append(torch.randn(shape, generator=generator).mul_(math.sqrt(2.0 / shape[0])).flatten())
        else:
            parts.append(torch.zeros(shape))
    return torch.cat(parts)


def flush(x: torch.Tensor) -> torch.Tensor:
    """Flush-to-zero: every |x| below the smallest normal float32 becomes 0 (inf and nan pass)."""
    return torch.where(x.abs() < MIN_NORMAL, torch.zeros((), dtype=x.dtype, device=x.device), x)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def flusher(arithmetic: str):
    """The function applied to every elementwise op's inputs and result in this mode."""
    if arithmetic == "tf-ftz":
        return flush
    if arithmetic in ("linear", "cpu-ftz"):
        return _identity
    raise ValueError(f"unknown arithmetic {arithmetic!r}; allowed: tf-ftz, linear, cpu-ftz")


def forward(x: torch.Tensor, params: list[torch.Tensor], arithmetic: str) -> torch.Tensor:
    """Logits for images ``x`` (B, 784). ``params`` may carry a leading member dimension (P, ...),
    in which case the result is (P, B, 10) from batched matmuls.

    This is the reference path: one torch op per elementwise step, each flushed as the mode says.
    """
    f = flusher(arithmetic)
    w1, b1, w2, b2, w3, b3 = params
    batched = w1.dim() == 3

    def bias(b: torch.Tensor) -> torch.Tensor:
        return b.unsqueeze(-2) if batched else b

    a1 = f(f(torch.matmul(x, w1)) + f(bias(b1)))
    h1 = f(a1 / SCALE)
    c2 = f(f(bias(b2)) / SCALE)
    h2 = f(f(torch.matmul(h1, w2)) + c2)
    c3 = f(f(bias(b3)) / SCALE)
    a3 = f(f(torch.matmul(h2, w3)) + c3)
    return f(a3 * SCALE)


def exact_linear_logits(x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """The network's exact linear map in float64 (no underflow possible): the ideal the FTZ net departs from."""
    w1, b1, w2, b2, w3, b3 = (p.double() for p in params)
    h1 = (x.double() @ w1 + b1) / SCALE
    h2 = h1 @ w2 + b2 / SCALE
    return (h2 @ w3 + b3 / SCALE) * SCALE
