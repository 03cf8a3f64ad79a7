"""The seed's deep linear MNIST network and its float32 arithmetic near underflow.

OpenAI, "Nonlinear Computation in Deep Linear Networks" (2017): a 784-512-512-10 linear network whose
activations are scaled by s = 2**125, so they sit at float32's underflow edge. With flush-to-zero
elementwise ops the network is nonlinear; with denormals kept it is exactly linear.

    h1 = (x W1 + b1) / s,   h2 = h1 W2 + b2 / s,   o = (h2 W3 + b3 / s) * s

Arithmetic modes (docs/design.md has the float32 measurements behind them):
  * ``tf-ftz``: matmuls in IEEE float32 keeping denormals; every elementwise op flushes its inputs and
    its result (|x| < 2**-126 becomes 0). TensorFlow-on-GPU semantics, identical on CPU and CUDA.
  * ``linear``: no flushing anywhere (the control).
  * ``cpu-ftz``: plain ops under the process-wide ``torch.set_flush_denormal(True)`` (CPU only).

No Ray and no I/O here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from es_workers.compiled import Compiled, cached

SCALE = 2.0**125
MIN_NORMAL = 2.0**-126
LAYER_SIZES = (784, 512, 512, 10)
SCALED_MIN_NORMAL = MIN_NORMAL * SCALE  # 0.5: the flush threshold seen from the scaled frame
DIVIDE_ROUNDS_UP = 0.5 - 2.0**-25  # smallest |x| whose x / 2**125 rounds to 2**-126


def _layout() -> list[tuple[str, tuple[int, ...]]]:
    shapes = []
    for index, (fan_in, fan_out) in enumerate(zip(LAYER_SIZES[:-1], LAYER_SIZES[1:]), start=1):
        shapes.append((f"W{index}", (fan_in, fan_out)))
        shapes.append((f"b{index}", (fan_out,)))
    return shapes


PARAM_SHAPES = _layout()
NUM_PARAMS = sum(math.prod(shape) for _, shape in PARAM_SHAPES)
OUTPUT_LAYER_SIZE = LAYER_SIZES[-2] * LAYER_SIZES[-1] + LAYER_SIZES[-1]  # W3 and b3: theta's last 5,130 floats
W1_SIZE = LAYER_SIZES[0] * LAYER_SIZES[1]  # W1 leads theta and every slice: 401,408 floats


@contextlib.contextmanager
def single_threaded():
    """torch ops on one intra-op thread while inside. MKL's float32 GEMM can give other bits with 2
    threads than with 1 (measured here), so CPU results that must not depend on the machine run so."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def unflatten(flat: torch.Tensor, first: int = 0) -> list[torch.Tensor]:
    """Views of W1, b1, W2, b2, W3, b3 into a flat vector (or a batch of them, shape (..., NUM_PARAMS));
    ``first`` = k: the vector holds only the parameters from PARAM_SHAPES[k] on (1: b1 to b3)."""
    expected = sum(math.prod(shape) for _, shape in PARAM_SHAPES[first:])
    if flat.shape[-1] != expected:
        raise ValueError(f"expected {expected} parameters in the last dimension, got {tuple(flat.shape)}")
    views, start = [], 0
    lead = flat.shape[:-1]
    for _, shape in PARAM_SHAPES[first:]:
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


def flush_scaled(x: torch.Tensor) -> torch.Tensor:
    """``flush(x / SCALE) * SCALE`` for values already carried SCALE higher: threshold 2**-126 * 2**125."""
    return torch.where(x.abs() < SCALED_MIN_NORMAL, torch.zeros((), dtype=x.dtype, device=x.device), x)


def flush_divide(x: torch.Tensor) -> torch.Tensor:
    """Exactly ``flush(flush(x) / SCALE) * SCALE`` in float32, without leaving the normal range.

    ``x / 2**125`` is exact unless it is denormal; a denormal quotient is flushed, except that the two
    floats just below 0.5 round *up* to 2**-126 (round-to-nearest on the denormal grid) and survive.
    """
    magnitude = x.abs()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    rounded_up = torch.where(magnitude >= DIVIDE_ROUNDS_UP, torch.copysign(torch.full_like(x, 0.5), x), zero)
    return torch.where(magnitude >= SCALED_MIN_NORMAL, x, rounded_up)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _bias(b: torch.Tensor, batched: bool) -> torch.Tensor:
    return b.unsqueeze(-2) if batched else b


def tf_ftz_hidden1(z1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """Layer 1 epilogue, scaled frame: flush(flush(flush(z1) + flush(b1)) / s) * s."""
    return flush_divide(flush(flush(z1) + flush(b1)))


def tf_ftz_hidden(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Layer 2 epilogue, scaled frame: flush(flush(z) + flush(flush(b) / s)) with z carried s higher."""
    return flush_scaled(flush_scaled(z) + flush_divide(b))


def tf_ftz_logits(z3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """Layer 3 epilogue: flush((flush(z3) + flush(flush(b3) / s)) * s); the frame's s is the final * s."""
    return flush(tf_ftz_hidden(z3, b3))


def add_bias(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return z + b


def moved(z: torch.Tensor, change: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(m, B, n): the pre-activation z (B, n) of m members that each move one unit of the layer below by
    change (m, B), read through that unit's row of the weight (rows (m, n)): an outer product each."""
    return z + change.unsqueeze(-1) * rows.unsqueeze(1)


def tf_ftz_hidden_moved(z: torch.Tensor, change: torch.Tensor, rows: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``tf_ftz_hidden`` of ``moved``: for unit members, one kernel when fused, with no (m, B, n) temporary."""
    return tf_ftz_hidden(moved(z, change, rows), b)


def add_bias_moved(z: torch.Tensor, change: torch.Tensor, rows: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return add_bias(moved(z, change, rows), b)


@dataclass(frozen=True)
class Epilogues:
    """The elementwise work after each matmul. Only exact ops (add, abs, compare, select, copysign):
    fusing them into one kernel per layer (torch.compile) cannot change a single bit. ``hidden2_moved``
    also multiplies (``moved``): fused, each step still rounds as in eager because FMA contraction is
    off (inductor's C++ flag's default; TRITON_DEFAULT_FP_FUSION, es_workers.compiled)."""

    hidden1: Callable
    hidden2: Callable
    logits: Callable
    hidden2_moved: Callable


EAGER = {
    "tf-ftz": Epilogues(tf_ftz_hidden1, tf_ftz_hidden, tf_ftz_logits, tf_ftz_hidden_moved),
    "linear": Epilogues(add_bias, add_bias, add_bias, add_bias_moved),
}


def epilogues(arithmetic: str, fused: bool = False) -> Epilogues:
    """Eager epilogues, or the same functions compiled into one fused kernel per layer."""
    if arithmetic not in EAGER:
        raise ValueError(f"unknown arithmetic {arithmetic!r} for the scaled frame; allowed: tf-ftz, linear")
    eager = EAGER[arithmetic]
    if not fused:
        return eager
    return cached(("epilogues", arithmetic), lambda: Epilogues(*(Compiled(fn) for fn in vars(eager).values())))


def forward(x: torch.Tensor, params: list[torch.Tensor], arithmetic: str, fused: bool = False) -> torch.Tensor:
    """Logits for images ``x`` (B, 784). ``params`` may carry a leading member dimension (P, ...),
    in which case the result is (P, B, 10) from batched matmuls.

    tf-ftz and linear run in a frame carried SCALE = 2**125 higher after the first layer: every
    elementwise op is exactly what it is at native scale (flush thresholds move with the frame, see
    ``flush_divide``), while the matmuls of tiny activations never touch denormals. Denormal matmul
    operands cost ~100-200x on x86 CPUs (measured here), and this frame is identical on CPU and CUDA.
    The only departure from a native-scale float32 matmul is that its partial sums are not rounded to
    the denormal grid (native gradual underflow loses up to 2**-150 absolute per operation).
    cpu-ftz runs at native scale under the hardware flag (``forward_native``): that is its point.
    """
    if arithmetic == "cpu-ftz":
        return forward_native(x, params, arithmetic)
    return forward_with(x, params, epilogues(arithmetic, fused))


def forward_with(x: torch.Tensor, params: list[torch.Tensor], ops: Epilogues) -> torch.Tensor:
    """``forward`` in the scaled frame with the given epilogues."""
    batched = params[0].dim() == 3
    h2 = _hidden2(x, params, ops, batched)
    return ops.logits(torch.matmul(h2, params[4]), _bias(params[5], batched))


def _hidden2(x: torch.Tensor, params: list[torch.Tensor], ops: Epilogues, batched: bool) -> torch.Tensor:
    """The last hidden layer (scaled frame) of ``forward``."""
    w1, b1, w2, b2 = params[:4]
    h1 = ops.hidden1(torch.matmul(x, w1), _bias(b1, batched))
    return ops.hidden2(torch.matmul(h1, w2), _bias(b2, batched))


def forward_native(x: torch.Tensor, params: list[torch.Tensor], arithmetic: str) -> torch.Tensor:
    """The seed's formula literally, at native scale: one torch op per elementwise step, each flushed
    as the mode says. The specification ``forward`` is checked against; slow on CPU (denormal matmuls)."""
    f = flush if arithmetic == "tf-ftz" else _identity
    if arithmetic not in ("tf-ftz", "linear", "cpu-ftz"):
        raise ValueError(f"unknown arithmetic {arithmetic!r}; allowed: tf-ftz, linear, cpu-ftz")
    w1, b1, w2, b2, w3, b3 = params
    batched = w1.dim() == 3
    a1 = f(f(torch.matmul(x, w1)) + f(_bias(b1, batched)))
    h1 = f(a1 / SCALE)
    c2 = f(f(_bias(b2, batched)) / SCALE)
    h2 = f(f(torch.matmul(h1, w2)) + c2)
    c3 = f(f(_bias(b3, batched)) / SCALE)
    a3 = f(f(torch.matmul(h2, w3)) + c3)
    return f(a3 * SCALE)


def exact_linear_logits(x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """The network's exact linear map in float64 (no underflow possible): the ideal the FTZ net departs from."""
    w1, b1, w2, b2, w3, b3 = (p.double() for p in params)
    h1 = (x.double() @ w1 + b1) / SCALE
    h2 = h1 @ w2 + b2 / SCALE
    return (h2 @ w3 + b3 / SCALE) * SCALE
