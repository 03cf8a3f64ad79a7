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

from es_workers.architecture import SEED, Architecture
from es_workers.compiled import Compiled, cached

SCALE = 2.0**SEED.scale_exponent
MIN_NORMAL = 2.0**-126
LAYER_SIZES = SEED.layer_sizes
PARAM_SHAPES = SEED.param_shapes
NUM_PARAMS = SEED.num_params  # the seed's: 669,706
OUTPUT_LAYER_SIZE = SEED.output_layer_size  # W3 and b3: theta's last 5,130 floats
W1_SIZE = SEED.w1_size  # W1 leads theta and every slice: 401,408 floats


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


def unflatten(flat: torch.Tensor, first: int = 0, arch: Architecture = SEED) -> list[torch.Tensor]:
    """Views of W1, b1, W2, b2, W3, b3 into a flat vector (or a batch of them, shape (..., P));
    ``first`` = k: the vector holds only the parameters from arch.param_shapes[k] on (1: b1 to b3)."""
    shapes = arch.param_shapes[first:]
    expected = sum(math.prod(shape) for _, shape in shapes)
    if flat.shape[-1] != expected:
        raise ValueError(f"expected {expected} parameters in the last dimension, got {tuple(flat.shape)}")
    views, start = [], 0
    lead = flat.shape[:-1]
    for _, shape in shapes:
        size = math.prod(shape)
        views.append(flat[..., start : start + size].reshape(*lead, *shape))
        start += size
    return views


def init_theta(seed: int, arch: Architecture = SEED) -> torch.Tensor:
    """The seed's initialisation: weights N(0, 2/fan_in), zero biases, as one flat float32 vector."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for name, shape in arch.param_shapes:
        if name.startswith("W"):
            parts.append(torch.randn(shape, generator=generator).mul_(math.sqrt(2.0 / shape[0])).flatten())
        else:
            parts.append(torch.zeros(shape))
    return torch.cat(parts)


def flush(x: torch.Tensor) -> torch.Tensor:
    """Flush-to-zero: every |x| below the smallest normal float32 becomes 0 (inf and nan pass)."""
    return torch.where(x.abs() < MIN_NORMAL, torch.zeros((), dtype=x.dtype, device=x.device), x)


def frame_min_normal(exponent: int) -> float:
    """2**-126 seen from the frame carried 2**exponent higher: the flush threshold there (0.5 at 125)."""
    return 2.0 ** (exponent - 126)


def flush_scaled(x: torch.Tensor, exponent: int = SEED.scale_exponent) -> torch.Tensor:
    """``flush(x / s) * s`` for values already carried s = 2**exponent higher: threshold 2**-126 * s."""
    return torch.where(x.abs() < frame_min_normal(exponent), torch.zeros((), dtype=x.dtype, device=x.device), x)


def flush_divide(x: torch.Tensor, exponent: int = SEED.scale_exponent) -> torch.Tensor:
    """Exactly ``flush(flush(x) / s) * s`` in float32 (s = 2**exponent), without leaving the normal range.

    ``x / s`` is exact unless it is denormal; a denormal quotient is flushed, except that the floats
    within half a denormal step of 2**-126 round *up* to it (round-to-nearest, ties to even, on the
    denormal grid) and survive: at 125, the two floats just below 0.5.
    """
    threshold = frame_min_normal(exponent)
    rounds_up = threshold - 2.0 ** (exponent - 150)  # smallest |x| whose x / s rounds to 2**-126
    magnitude = x.abs()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    survivor = torch.where(magnitude >= rounds_up, torch.copysign(torch.full_like(x, threshold), x), zero)
    return torch.where(magnitude >= threshold, x, survivor)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _bias(b: torch.Tensor, batched: bool) -> torch.Tensor:
    return b.unsqueeze(-2) if batched else b


def tf_ftz_hidden1(z1: torch.Tensor, b1: torch.Tensor, exponent: int = SEED.scale_exponent) -> torch.Tensor:
    """Layer 1 epilogue, scaled frame: flush(flush(flush(z1) + flush(b1)) / s) * s."""
    return flush_divide(flush(flush(z1) + flush(b1)), exponent)


def tf_ftz_hidden(z: torch.Tensor, b: torch.Tensor, exponent: int = SEED.scale_exponent) -> torch.Tensor:
    """Layer 2 epilogue, scaled frame: flush(flush(z) + flush(flush(b) / s)) with z carried s higher."""
    return flush_scaled(flush_scaled(z, exponent) + flush_divide(b, exponent), exponent)


def tf_ftz_logits(z3: torch.Tensor, b3: torch.Tensor, exponent: int = SEED.scale_exponent) -> torch.Tensor:
    """Layer 3 epilogue: flush((flush(z3) + flush(flush(b3) / s)) * s); the frame's s is the final * s."""
    return flush(tf_ftz_hidden(z3, b3, exponent))


def add_bias(z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return z + b


def moved(z: torch.Tensor, change: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(m, B, n): the pre-activation z (B, n) of m members that each move one unit of the layer below by
    change (m, B), read through that unit's row of the weight (rows (m, n)): an outer product each."""
    return z + change.unsqueeze(-1) * rows.unsqueeze(1)


def tf_ftz_hidden_moved(
    z: torch.Tensor, change: torch.Tensor, rows: torch.Tensor, b: torch.Tensor, exponent: int = SEED.scale_exponent
) -> torch.Tensor:
    """``tf_ftz_hidden`` of ``moved``: for unit members, one kernel when fused, with no (m, B, n) temporary."""
    return tf_ftz_hidden(moved(z, change, rows), b, exponent)


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


ARITHMETICS = ("tf-ftz", "linear")  # the scaled frame's


def _tf_ftz(exponent: int) -> Epilogues:
    """tf-ftz's epilogues at one scale, as closures (torch.compile guards a closure's constant once;
    a functools.partial it re-guards at every call)."""

    def hidden1(z1, b1):
        return tf_ftz_hidden1(z1, b1, exponent)

    def hidden(z, b):
        return tf_ftz_hidden(z, b, exponent)

    def logits(z3, b3):
        return tf_ftz_logits(z3, b3, exponent)

    def hidden_moved(z, change, rows, b):
        return tf_ftz_hidden_moved(z, change, rows, b, exponent)

    return Epilogues(hidden1, hidden, logits, hidden_moved)


def eager_epilogues(arithmetic: str, arch: Architecture = SEED) -> Epilogues:
    """The scaled frame's epilogues at arch's scale (linear: the same at every scale)."""
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"unknown arithmetic {arithmetic!r} for the scaled frame; allowed: tf-ftz, linear")
    if arithmetic == "linear":
        return LINEAR
    return cached(("tf-ftz", arch.scale_exponent), lambda: _tf_ftz(arch.scale_exponent))


LINEAR = Epilogues(add_bias, add_bias, add_bias, add_bias_moved)


def epilogues(arithmetic: str, fused: bool = False, arch: Architecture = SEED) -> Epilogues:
    """Eager epilogues, or the same functions compiled into one fused kernel per layer."""
    eager = eager_epilogues(arithmetic, arch)
    if not fused:
        return eager
    key = ("epilogues", arithmetic, arch.scale_exponent if arithmetic == "tf-ftz" else None)
    return cached(key, lambda: Epilogues(*(Compiled(fn) for fn in vars(eager).values())))


def forward(
    x: torch.Tensor, params: list[torch.Tensor], arithmetic: str, fused: bool = False, arch: Architecture = SEED
) -> torch.Tensor:
    """Logits for images ``x`` (B, 784). ``params`` may carry a leading member dimension (P, ...),
    in which case the result is (P, B, 10) from batched matmuls.

    tf-ftz and linear run in a frame carried s = 2**arch.scale_exponent higher after the first layer: every
    elementwise op is exactly what it is at native scale (flush thresholds move with the frame, see
    ``flush_divide``), while the matmuls of tiny activations never touch denormals. Denormal matmul
    operands cost ~100-200x on x86 CPUs (measured here), and this frame is identical on CPU and CUDA.
    The only departure from a native-scale float32 matmul is that its partial sums are not rounded to
    the denormal grid (native gradual underflow loses up to 2**-150 absolute per operation).
    cpu-ftz runs at native scale under the hardware flag (``forward_native``): that is its point.
    """
    if arithmetic == "cpu-ftz":
        return forward_native(x, params, arithmetic, arch)
    return forward_with(x, params, epilogues(arithmetic, fused, arch))


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


def forward_native(
    x: torch.Tensor, params: list[torch.Tensor], arithmetic: str, arch: Architecture = SEED
) -> torch.Tensor:
    """The seed's formula literally, at native scale: one torch op per elementwise step, each flushed
    as the mode says. The specification ``forward`` is checked against; slow on CPU (denormal matmuls)."""
    f = flush if arithmetic == "tf-ftz" else _identity
    if arithmetic not in ("tf-ftz", "linear", "cpu-ftz"):
        raise ValueError(f"unknown arithmetic {arithmetic!r}; allowed: tf-ftz, linear, cpu-ftz")
    w1, b1, w2, b2, w3, b3 = params
    batched = w1.dim() == 3
    scale = 2.0**arch.scale_exponent
    a1 = f(f(torch.matmul(x, w1)) + f(_bias(b1, batched)))
    h1 = f(a1 / scale)
    c2 = f(f(_bias(b2, batched)) / scale)
    h2 = f(f(torch.matmul(h1, w2)) + c2)
    c3 = f(f(_bias(b3, batched)) / scale)
    a3 = f(f(torch.matmul(h2, w3)) + c3)
    return f(a3 * scale)


def exact_linear_logits(x: torch.Tensor, params: list[torch.Tensor], arch: Architecture = SEED) -> torch.Tensor:
    """The network's exact linear map in float64 (no underflow possible): the ideal the FTZ net departs from."""
    w1, b1, w2, b2, w3, b3 = (p.double() for p in params)
    scale = 2.0**arch.scale_exponent
    h1 = (x.double() @ w1 + b1) / scale
    h2 = h1 @ w2 + b2 / scale
    return (h2 @ w3 + b3 / scale) * scale
