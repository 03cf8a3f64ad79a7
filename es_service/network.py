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
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

# Compiled CUDA kernels are Triton, whose default lets ptxas contract a * b + c into one FMA (one
# rounding instead of two): the perturbation theta + scale * slice would then differ from eager torch.
# Off for this process, before anything compiles; the flushing epilogues have no products to contract.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

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
HEAD_SIZE = LAYER_SIZES[-2] * LAYER_SIZES[-1] + LAYER_SIZES[-1]  # W3 and b3: theta's last 5,130 floats
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


@dataclass(frozen=True)
class Epilogues:
    """The elementwise work after each matmul. Only exact ops (add, abs, compare, select, copysign):
    fusing them into one kernel per layer (torch.compile) cannot change a single bit."""

    hidden1: Callable
    hidden2: Callable
    logits: Callable


EAGER = {
    "tf-ftz": Epilogues(tf_ftz_hidden1, tf_ftz_hidden, tf_ftz_logits),
    "linear": Epilogues(add_bias, add_bias, add_bias),
}
_CACHE: dict[tuple, object] = {}


def _cached(key: tuple, build: Callable):
    """One object per key, built on first use: compiled functions are compiled once per process."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def compiled_functions() -> list["_Compiled"]:
    """Every compiled function built so far (tests check that none fell back to eager)."""
    found = []
    for value in _CACHE.values():
        if isinstance(value, _Compiled):
            found.append(value)
        elif isinstance(value, Epilogues):
            found += [fn for fn in vars(value).values() if isinstance(fn, _Compiled)]
    return found


def epilogues(arithmetic: str, fused: bool = False) -> Epilogues:
    """Eager epilogues, or the same functions compiled into one fused kernel per layer."""
    if arithmetic not in EAGER:
        raise ValueError(f"unknown arithmetic {arithmetic!r} for the scaled frame; allowed: tf-ftz, linear")
    eager = EAGER[arithmetic]
    if not fused:
        return eager
    return _cached(("epilogues", arithmetic), lambda: Epilogues(*(_Compiled(fn) for fn in vars(eager).values())))


class _Compiled:
    """torch.compile'd epilogue that falls back to eager (same bits, slower) where compiling fails,
    e.g. on a machine without a C++ compiler."""

    def __init__(self, fn: Callable):
        # inductor on a CPU-only machine warns that it found no CUDA runtime: true, and of no use here
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self.eager = fn
        self.compiled = torch.compile(fn, dynamic=None)
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as err:  # inductor raises many types; eager is always correct
                warnings.warn(f"torch.compile failed ({type(err).__name__}); using eager epilogues")
                self.failed = True
        return self.eager(*args)


def perturb(theta: torch.Tensor, noise_slice: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A member's parameters: ``theta + scale * noise_slice``, rounded in that order (no FMA)."""
    return theta + scale * noise_slice


def perturb_rows(table: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(n, NUM_PARAMS) members' parameters: row j is theta + scales[j] * table[offsets[j] : offsets[j] + N],
    rounded as ``perturb``. Eager, this materialises an (n, N) index: use it compiled (one pass)."""
    index = offsets[:, None] + torch.arange(theta.shape[0], device=theta.device)
    return theta + scales[:, None] * table[index]


def perturb_rows_fused(table: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, theta: torch.Tensor):
    """``perturb_rows`` compiled into one kernel (bitwise equal to gather, then scale, then add)."""
    return _cached(("perturb_rows",), lambda: _Compiled(perturb_rows))(table, offsets, scales, theta)


def _member_forward(epilogues_: Epilogues) -> Callable:
    def member(x, theta, noise_slice, scale):
        w1, b1, w2, b2, w3, b3 = unflatten(perturb(theta, noise_slice, scale))
        h1 = epilogues_.hidden1(torch.mm(x, w1), b1)
        h2 = epilogues_.hidden2(torch.mm(h1, w2), b2)
        return epilogues_.logits(torch.mm(h2, w3), b3)

    return member


def member_forward(x: torch.Tensor, theta: torch.Tensor, noise_slice: torch.Tensor, scale: torch.Tensor,
                   arithmetic: str, fused: bool = False) -> torch.Tensor:
    """(B, 10) logits of one member, theta + scale * noise_slice (``scale`` a 0-d tensor).

    Fused tf-ftz: the perturbation, the three matmuls and the epilogues are one torch.compile region: the
    weights are built in one pass from the table (no scratch copy), the matmuls stay ATen/MKL calls, and
    every elementwise op fuses into its neighbours. Bitwise equal to the eager path (a test checks it);
    ~20% faster than building the weights first at 256 images on CPU.
    """
    if arithmetic == "cpu-ftz":
        return forward_native(x, unflatten(perturb(theta, noise_slice, scale)), arithmetic)
    if fused and arithmetic == "tf-ftz":  # linear: inductor would turn mm + bias into addmm (other bits)
        member = _cached(("member", arithmetic), lambda: _Compiled(_member_forward(EAGER[arithmetic])))
    else:
        member = _cached(("member", arithmetic, fused), lambda: _member_forward(epilogues(arithmetic, fused)))
    return member(x, theta, noise_slice, scale)


def center_hidden2(x: torch.Tensor, theta: torch.Tensor, arithmetic: str, fused: bool = False) -> torch.Tensor:
    """(B, 512) last hidden layer of the unperturbed network (scaled frame): what W3 multiplies."""
    return _hidden2(x, unflatten(theta), epilogues(arithmetic, fused), batched=False)


def head_forward(h2: torch.Tensor, theta: torch.Tensor, noise: torch.Tensor, scales: torch.Tensor,
                 arithmetic: str, fused: bool = False) -> torch.Tensor:
    """(n, B, 10) logits of n head members: theta with only its output layer (W3, b3) moved to
    theta + scales[j] * noise[j], noise (n, HEAD_SIZE), from the center's last hidden layer ``h2``.
    A head member costs one (B, 512) @ (512, 10) matmul, 1/65 of a member's FLOPs. Its logits are the full
    forward's of theta + scale * (zeros, then noise[j]): bitwise on CPU (a test checks it), and up to the
    last matmul's rounding where a batched matmul sums in another order."""
    head = perturb(theta[NUM_PARAMS - HEAD_SIZE :], noise, scales[:, None])
    w3 = head[:, : -LAYER_SIZES[-1]].reshape(-1, *LAYER_SIZES[-2:])
    return epilogues(arithmetic, fused).logits(torch.matmul(h2, w3), head[:, -LAYER_SIZES[-1] :].unsqueeze(-2))


def _corrected(epilogue: Callable) -> Callable:
    """A layer's epilogue with the matmul's correction ``u * v`` added first (one fused kernel compiled)."""

    def layer(z, u, v, b):
        return epilogue(z + u * v, b)

    return layer


def _shared_first_layer(hidden1: Callable, ops: Epilogues) -> Callable:
    def members(xw1, xe1, tail, scale):
        b1, w2, b2, w3, b3 = unflatten(tail, first=1)
        batched = tail.dim() == 2
        if xe1.dim() == 4:  # (pairs, 1, B, 512): each x E1 serves the two members of its pair, no copy
            pairs = xe1.shape[0]
            h1 = hidden1(xw1, xe1, scale.reshape(pairs, 2, 1, 1), b1.reshape(pairs, 2, 1, -1)).flatten(0, 1)
        else:
            h1 = hidden1(xw1, xe1, scale, _bias(b1, batched))
        h2 = ops.hidden2(torch.matmul(h1, w2), _bias(b2, batched))
        return ops.logits(torch.matmul(h2, w3), _bias(b3, batched))

    return members


def shared_first_layer_forward(xw1: torch.Tensor, xe1: torch.Tensor, tail: torch.Tensor, scales: torch.Tensor,
                               arithmetic: str, fused: bool = False) -> torch.Tensor:
    """Logits of members theta + scale * slice whose first layer is computed as ``xw1 + scale * xe1``:
    ``xw1 = x @ W1`` shared by every member on the same images, ``xe1 = x @ E1`` (E1: the slice's first
    W1_SIZE floats as a (784, 512) matrix) shared by the two members of an antithetic pair. The
    perturbed W1 is never built, and a pair's first layer costs one matmul instead of two.
    ``tail``: the members' perturbed parameters after W1 (b1 to b3), (N - W1_SIZE,) with a 0-d scale
    and xe1 (B, 512), or (n, N - W1_SIZE) with scales (n,) and xe1 (n, B, 512), or (n / 2, 1, B, 512)
    when members 2k and 2k + 1 are an antithetic pair (the same bits, without copying x E1 per member).

    The pre-activation differs from x @ (W1 + scale * E1) by rounding only; the epilogues (the flushes)
    are ``forward``'s, so the network is the same. Fused, each layer's elementwise work is one kernel,
    bitwise equal to eager.
    """
    if arithmetic not in EAGER:
        raise ValueError(f"a shared first layer needs the scaled frame; arithmetic {arithmetic!r} is not "
                         "allowed (use tf-ftz or linear)")
    scale = scales.reshape(-1, 1, 1) if tail.dim() == 2 else scales
    return _cached(("shared first layer", arithmetic, fused), lambda: _shared_first_layer(
        _Compiled(_corrected(EAGER[arithmetic].hidden1)) if fused else _corrected(EAGER[arithmetic].hidden1),
        epilogues(arithmetic, fused)))(xw1, xe1, tail, scale)


def _shared_first_layer_member(arithmetic: str) -> Callable:
    layers = _shared_first_layer(_corrected(EAGER[arithmetic].hidden1), EAGER[arithmetic])

    def member(xw1, xe1, theta, noise_slice, scale):
        return layers(xw1, xe1, perturb(theta[W1_SIZE:], noise_slice[W1_SIZE:], scale), scale)

    return member


def shared_first_layer_member(xw1: torch.Tensor, xe1: torch.Tensor, theta: torch.Tensor, noise_slice: torch.Tensor,
                              scale: torch.Tensor, arithmetic: str, fused: bool = False) -> torch.Tensor:
    """(B, 10) logits of one member of ``shared_first_layer_forward`` from its whole (N,) table slice.
    Fused tf-ftz: the tail's perturbation, two matmuls and the epilogues are one torch.compile region
    (as ``member_forward``), bitwise equal to eager."""
    if fused and arithmetic == "tf-ftz":  # linear: inductor would turn mm + bias into addmm (other bits)
        member = _cached(("shared first layer member", arithmetic),
                         lambda: _Compiled(_shared_first_layer_member(arithmetic)))
        return member(xw1, xe1, theta, noise_slice, scale)
    return shared_first_layer_forward(xw1, xe1, perturb(theta[W1_SIZE:], noise_slice[W1_SIZE:], scale), scale,
                                      arithmetic, fused)


def first_layer_noise(noise: torch.Tensor) -> torch.Tensor:
    """E1: the (..., 784, 512) view of a slice's (or rows') first W1_SIZE floats."""
    return noise[..., :W1_SIZE].reshape(*noise.shape[:-1], *LAYER_SIZES[:2])


def noise_length(rank: int) -> int:
    """Table floats one member's perturbation reads: every parameter (rank 0), or, at rank r, r columns
    on each side of every weight matrix plus the biases (3,876 floats at rank 1, against 669,706)."""
    if rank == 0:
        return NUM_PARAMS
    return sum(rank * (fan_in + fan_out) + fan_out for fan_in, fan_out in zip(LAYER_SIZES[:-1], LAYER_SIZES[1:]))


def low_rank_factors(noise: torch.Tensor, rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Views (A, B, e) per layer of a low-rank perturbation (..., noise_length(rank)): the layer's weight
    moves by A B^T / sqrt(rank), A (..., fan_in, rank) and B (..., fan_out, rank); its bias by e."""
    lead, parts, start = noise.shape[:-1], [], 0
    for fan_in, fan_out in zip(LAYER_SIZES[:-1], LAYER_SIZES[1:]):
        sizes = (fan_in * rank, fan_out * rank, fan_out)
        a, b, e = (noise[..., start + sum(sizes[:k]) : start + sum(sizes[: k + 1])] for k in range(3))
        parts.append((a.reshape(*lead, fan_in, rank), b.reshape(*lead, fan_out, rank), e))
        start += sum(sizes)
    return parts


def low_rank_dense(noise: torch.Tensor, rank: int) -> torch.Tensor:
    """The (NUM_PARAMS,) perturbation a low-rank slice stands for: A B^T / sqrt(rank) per weight, e per bias."""
    parts = []
    for a, b, e in low_rank_factors(noise, rank):
        parts += [(a @ b.T * rank**-0.5).flatten(), e]
    return torch.cat(parts)


def _low_rank_epilogue(epilogue: Callable) -> Callable:
    """A layer's epilogue after a low-rank member's matmuls: the correction u * v (see
    ``low_rank_correction``) and the bias perturbation join the flushing chain. Compiled, that is one
    kernel; every step rounds as in eager (FMA contraction is off, see TRITON_DEFAULT_FP_FUSION)."""
    corrected = _corrected(epilogue)

    def layer(z, u, v, b, e, scale):
        return corrected(z, u, v, perturb(b, e, scale))

    return layer


def low_rank_epilogues(arithmetic: str, fused: bool = False) -> Epilogues:
    eager = epilogues(arithmetic)
    wrap = (lambda fn: _Compiled(_low_rank_epilogue(fn))) if fused else _low_rank_epilogue
    return _cached(("low-rank epilogues", arithmetic, fused), lambda: Epilogues(*map(wrap, vars(eager).values())))


def low_rank_correction(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """(u, v) with u * v = ((h A) c) B^T, what h (c A B^T) adds to h W (the perturbed weight is never
    built). Rank 1: u = (h a) c, (..., B, 1), and v = b^T, (..., 1, fan_out): the epilogue forms the
    outer product itself, so no (B, fan_out) correction is written and read back. Higher rank: u is the
    correction and v = 1 (an exact multiply)."""
    if h.dim() == 2 and a.dim() == 3:  # shared images, n members: one (B, K) @ (K, n r) GEMM, x never expanded
        members, fan_in, rank = a.shape
        ha = torch.mm(h, a.transpose(0, 1).reshape(fan_in, members * rank)).reshape(-1, members, rank).transpose(0, 1)
    else:
        ha = torch.matmul(h, a)
    if a.shape[-1] == 1:
        return ha * c, b.transpose(-1, -2)
    return torch.matmul(ha * c, b.transpose(-1, -2)), torch.ones((), dtype=h.dtype, device=h.device)


def low_rank_forward(x: torch.Tensor, xw1: torch.Tensor, theta: torch.Tensor, noise: torch.Tensor,
                     scales: torch.Tensor, rank: int, arithmetic: str, fused: bool = False) -> torch.Tensor:
    """Logits of members theta + scale * (low-rank perturbation), for noise (M,) and a 0-d scale
    (one member, (B, 10)) or noise (n, M) and scales (n,) (n members, (n, B, 10)).

    ``xw1 = x @ W1`` is shared by every member on the same images: a member's first layer costs only its
    rank-r correction, later layers one matmul with the shared W (batched members: one large GEMM).
    The matmuls differ from building theta + scale * dense(noise) by rounding only; the elementwise
    epilogues (the flushes) are those of ``forward``, so the network is the same. Fused, each layer's
    correction, bias perturbation and flushes are one compiled kernel, bitwise equal to eager; the
    matmuls stay ATen calls (inductor would reorder the sums of the thin ones).
    """
    if arithmetic not in EAGER:
        raise ValueError(f"low-rank perturbations need the scaled frame; arithmetic {arithmetic!r} is not "
                         "allowed (use tf-ftz or linear)")
    w1, b1, w2, b2, w3, b3 = unflatten(theta)
    (a1, f1, e1), (a2, f2, e2), (a3, f3, e3) = low_rank_factors(noise, rank)
    batched = noise.dim() == 2
    scale = scales.reshape(-1, 1, 1) if batched else scales
    c = scale * rank**-0.5
    ops = low_rank_epilogues(arithmetic, fused)
    h1 = ops.hidden1(xw1, *low_rank_correction(x, a1, f1, c), b1, _bias(e1, batched), scale)
    h2 = ops.hidden2(torch.matmul(h1, w2), *low_rank_correction(h1, a2, f2, c), b2, _bias(e2, batched), scale)
    return ops.logits(torch.matmul(h2, w3), *low_rank_correction(h2, a3, f3, c), b3, _bias(e3, batched), scale)


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
