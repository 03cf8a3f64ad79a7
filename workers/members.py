"""Whole members: population members that move every parameter, and how each kind is evaluated.

  * full rank: theta + scale * slice, one table slice of every parameter (``member_forward``);
  * the shared first layer: full-rank members whose first layer is x W1 + scale * x E1, with x W1
    shared by the tile and x E1 by each antithetic pair (``shared_first_layer_forward``);
  * low rank: each weight moves by A B^T / sqrt(r) and is never built (``low_rank_forward``);
  * output-layer moves from the center's last hidden layer (``output_layer_forward``, what layer-3 members use).

Every kind runs the network's own epilogues (the flushes), so the network is the same; the matmuls
differ from building the perturbed weights by rounding only. No Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from es_workers.architecture import Architecture
from es_workers.compiled import Compiled, cached
from es_workers.network import (
    ARITHMETICS,
    SEED,
    Epilogues,
    _bias,
    eager_epilogues,
    epilogues,
    forward_native,
    unflatten,
)


def perturb(theta: torch.Tensor, noise_slice: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A member's parameters: ``theta + scale * noise_slice``, rounded in that order (no FMA)."""
    return theta + scale * noise_slice


def perturb_rows(table: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(n, P) members' parameters: row j is theta + scales[j] * table[offsets[j] : offsets[j] + N],
    rounded as ``perturb``. Eager, this materialises an (n, N) index: use it compiled (one pass)."""
    index = offsets[:, None] + torch.arange(theta.shape[0], device=theta.device)
    return theta + scales[:, None] * table[index]


def perturb_rows_fused(table: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, theta: torch.Tensor):
    """``perturb_rows`` compiled into one kernel (bitwise equal to gather, then scale, then add)."""
    return cached(("perturb_rows",), lambda: Compiled(perturb_rows))(table, offsets, scales, theta)


def _member_forward(epilogues_: Epilogues, arch: Architecture) -> Callable:
    def member(x, theta, noise_slice, scale):
        w1, b1, w2, b2, w3, b3 = unflatten(perturb(theta, noise_slice, scale), arch=arch)
        h1 = epilogues_.hidden1(torch.mm(x, w1), b1)
        h2 = epilogues_.hidden2(torch.mm(h1, w2), b2)
        return epilogues_.logits(torch.mm(h2, w3), b3)

    return member


def member_forward(
    x: torch.Tensor,
    theta: torch.Tensor,
    noise_slice: torch.Tensor,
    scale: torch.Tensor,
    arithmetic: str,
    fused: bool = False,
    arch: Architecture = SEED,
) -> torch.Tensor:
    """(B, 10) logits of one member, theta + scale * noise_slice (``scale`` a 0-d tensor).

    Fused tf-ftz: the perturbation, the three matmuls and the epilogues are one torch.compile region: the
    weights are built in one pass from the table (no scratch copy), the matmuls stay ATen/MKL calls, and
    every elementwise op fuses into its neighbours. Bitwise equal to the eager path (a test checks it);
    ~20% faster than building the weights first at 256 images on CPU.
    """
    if arithmetic == "cpu-ftz":
        return forward_native(x, unflatten(perturb(theta, noise_slice, scale), arch=arch), arithmetic, arch)
    if fused and arithmetic == "tf-ftz":  # linear: inductor would turn mm + bias into addmm (other bits)
        member = cached(
            ("member", arithmetic, arch), lambda: Compiled(_member_forward(eager_epilogues(arithmetic, arch), arch))
        )
    else:
        member = cached(
            ("member", arithmetic, fused, arch), lambda: _member_forward(epilogues(arithmetic, fused, arch), arch)
        )
    return member(x, theta, noise_slice, scale)


def output_layer_forward(
    h2: torch.Tensor,
    theta: torch.Tensor,
    noise: torch.Tensor,
    scales: torch.Tensor,
    arithmetic: str,
    fused: bool = False,
    arch: Architecture = SEED,
) -> torch.Tensor:
    """(n, B, 10) logits of n layer-3 members: theta with only its output layer (W3, b3) moved to
    theta + scales[j] * noise[j], noise (n, arch.output_layer_size), from the center's last hidden layer ``h2``.
    A layer-3 member costs one (B, 512) @ (512, 10) matmul, 1/65 of a member's FLOPs. Its logits are the full
    forward's of theta + scale * (zeros, then noise[j]): bitwise on CPU (a test checks it), and up to the
    last matmul's rounding where a batched matmul sums in another order."""
    moved = perturb(theta[-arch.output_layer_size :], noise, scales[:, None])
    outputs = arch.outputs
    w3 = moved[:, :-outputs].reshape(-1, *arch.layer_sizes[-2:])
    return epilogues(arithmetic, fused, arch).logits(torch.matmul(h2, w3), moved[:, -outputs:].unsqueeze(-2))


def _corrected(epilogue: Callable) -> Callable:
    """A layer's epilogue with the matmul's correction ``u * v`` added first (one fused kernel compiled)."""

    def layer(z, u, v, b):
        return epilogue(z + u * v, b)

    return layer


def _shared_first_layer(hidden1: Callable, ops: Epilogues, arch: Architecture) -> Callable:
    def members(xw1, xe1, tail, scale):
        b1, w2, b2, w3, b3 = unflatten(tail, first=1, arch=arch)
        batched = tail.dim() == 2
        if xe1.dim() == 4:  # (pairs, 1, B, 512): each x E1 serves the two members of its pair, no copy
            pairs = xe1.shape[0]
            h1 = hidden1(xw1, xe1, scale.reshape(pairs, 2, 1, 1), b1.reshape(pairs, 2, 1, -1)).flatten(0, 1)
        else:
            h1 = hidden1(xw1, xe1, scale, _bias(b1, batched))
        h2 = ops.hidden2(torch.matmul(h1, w2), _bias(b2, batched))
        return ops.logits(torch.matmul(h2, w3), _bias(b3, batched))

    return members


def shared_first_layer_forward(
    xw1: torch.Tensor,
    xe1: torch.Tensor,
    tail: torch.Tensor,
    scales: torch.Tensor,
    arithmetic: str,
    fused: bool = False,
    arch: Architecture = SEED,
) -> torch.Tensor:
    """Logits of members theta + scale * slice whose first layer is computed as ``xw1 + scale * xe1``:
    ``xw1 = x @ W1`` shared by every member on the same images, ``xe1 = x @ E1`` (E1: the slice's first
    arch.w1_size floats as a (784, 512) matrix) shared by the two members of an antithetic pair. The
    perturbed W1 is never built, and a pair's first layer costs one matmul instead of two.
    ``tail``: the members' perturbed parameters after W1 (b1 to b3), (P - W1,) with a 0-d scale
    and xe1 (B, 512), or (n, P - W1) with scales (n,) and xe1 (n, B, 512), or (n / 2, 1, B, 512)
    when members 2k and 2k + 1 are an antithetic pair (the same bits, without copying x E1 per member).

    The pre-activation differs from x @ (W1 + scale * E1) by rounding only; the epilogues (the flushes)
    are ``forward``'s, so the network is the same. Fused, each layer's elementwise work is one kernel,
    bitwise equal to eager.
    """
    if arithmetic not in ARITHMETICS:
        raise ValueError(
            f"a shared first layer needs the scaled frame; arithmetic {arithmetic!r} is not "
            "allowed (use tf-ftz or linear)"
        )
    scale = scales.reshape(-1, 1, 1) if tail.dim() == 2 else scales

    def build() -> Callable:  # once per process and key, not per call
        hidden1 = _corrected(eager_epilogues(arithmetic, arch).hidden1)
        return _shared_first_layer(Compiled(hidden1) if fused else hidden1, epilogues(arithmetic, fused, arch), arch)

    return cached(("shared first layer", arithmetic, fused, arch), build)(xw1, xe1, tail, scale)


def _shared_first_layer_member(arithmetic: str, arch: Architecture) -> Callable:
    eager = eager_epilogues(arithmetic, arch)
    layers = _shared_first_layer(_corrected(eager.hidden1), eager, arch)

    def member(xw1, xe1, theta, noise_slice, scale):
        return layers(xw1, xe1, perturb(theta[arch.w1_size :], noise_slice[arch.w1_size :], scale), scale)

    return member


def shared_first_layer_member(
    xw1: torch.Tensor,
    xe1: torch.Tensor,
    theta: torch.Tensor,
    noise_slice: torch.Tensor,
    scale: torch.Tensor,
    arithmetic: str,
    fused: bool = False,
    arch: Architecture = SEED,
) -> torch.Tensor:
    """(B, 10) logits of one member of ``shared_first_layer_forward`` from its whole (N,) table slice.
    Fused tf-ftz: the tail's perturbation, two matmuls and the epilogues are one torch.compile region
    (as ``member_forward``), bitwise equal to eager."""
    if fused and arithmetic == "tf-ftz":  # linear: inductor would turn mm + bias into addmm (other bits)
        member = cached(
            ("shared first layer member", arithmetic, arch),
            lambda: Compiled(_shared_first_layer_member(arithmetic, arch)),
        )
        return member(xw1, xe1, theta, noise_slice, scale)
    tail = perturb(theta[arch.w1_size :], noise_slice[arch.w1_size :], scale)
    return shared_first_layer_forward(xw1, xe1, tail, scale, arithmetic, fused, arch)


def first_layer_noise(noise: torch.Tensor, arch: Architecture = SEED) -> torch.Tensor:
    """E1: the (..., 784, 512) view of a slice's (or rows') first arch.w1_size floats."""
    return noise[..., : arch.w1_size].reshape(*noise.shape[:-1], *arch.layer_sizes[:2])


def noise_length(rank: int, arch: Architecture = SEED) -> int:
    """Table floats one member's perturbation reads: every parameter (rank 0), or, at rank r, r columns
    on each side of every weight matrix plus the biases (the seed's: 3,876 floats at rank 1, against 669,706)."""
    if rank == 0:
        return arch.num_params
    sizes = arch.layer_sizes
    return sum(rank * (fan_in + fan_out) + fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))


def low_rank_factors(
    noise: torch.Tensor, rank: int, arch: Architecture = SEED
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Views (A, B, e) per layer of a low-rank perturbation (..., noise_length(rank)): the layer's weight
    moves by A B^T / sqrt(rank), A (..., fan_in, rank) and B (..., fan_out, rank); its bias by e."""
    lead, parts, start = noise.shape[:-1], [], 0
    for fan_in, fan_out in zip(arch.layer_sizes[:-1], arch.layer_sizes[1:]):
        sizes = (fan_in * rank, fan_out * rank, fan_out)
        a, b, e = (noise[..., start + sum(sizes[:k]) : start + sum(sizes[: k + 1])] for k in range(3))
        parts.append((a.reshape(*lead, fan_in, rank), b.reshape(*lead, fan_out, rank), e))
        start += sum(sizes)
    return parts


def low_rank_dense(noise: torch.Tensor, rank: int, arch: Architecture = SEED) -> torch.Tensor:
    """The (P,) perturbation a low-rank slice stands for: A B^T / sqrt(rank) per weight, e per bias."""
    parts = []
    for a, b, e in low_rank_factors(noise, rank, arch):
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


def low_rank_epilogues(arithmetic: str, fused: bool = False, arch: Architecture = SEED) -> Epilogues:
    eager = eager_epilogues(arithmetic, arch)
    wrap = (lambda fn: Compiled(_low_rank_epilogue(fn))) if fused else _low_rank_epilogue
    key = ("low-rank epilogues", arithmetic, fused, arch.scale_exponent)
    return cached(key, lambda: Epilogues(*map(wrap, vars(eager).values())))


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


def low_rank_forward(
    x: torch.Tensor,
    xw1: torch.Tensor,
    theta: torch.Tensor,
    noise: torch.Tensor,
    scales: torch.Tensor,
    rank: int,
    arithmetic: str,
    fused: bool = False,
    arch: Architecture = SEED,
) -> torch.Tensor:
    """Logits of members theta + scale * (low-rank perturbation), for noise (M,) and a 0-d scale
    (one member, (B, 10)) or noise (n, M) and scales (n,) (n members, (n, B, 10)).

    ``xw1 = x @ W1`` is shared by every member on the same images: a member's first layer costs only its
    rank-r correction, later layers one matmul with the shared W (batched members: one large GEMM).
    The matmuls differ from building theta + scale * dense(noise) by rounding only; the elementwise
    epilogues (the flushes) are those of ``forward``, so the network is the same. Fused, each layer's
    correction, bias perturbation and flushes are one compiled kernel, bitwise equal to eager; the
    matmuls stay ATen calls (inductor would reorder the sums of the thin ones).
    """
    if arithmetic not in ARITHMETICS:
        raise ValueError(
            f"low-rank perturbations need the scaled frame; arithmetic {arithmetic!r} is not "
            "allowed (use tf-ftz or linear)"
        )
    w1, b1, w2, b2, w3, b3 = unflatten(theta, arch=arch)
    (a1, f1, e1), (a2, f2, e2), (a3, f3, e3) = low_rank_factors(noise, rank, arch)
    batched = noise.dim() == 2
    scale = scales.reshape(-1, 1, 1) if batched else scales
    c = scale * rank**-0.5
    ops = low_rank_epilogues(arithmetic, fused, arch)
    h1 = ops.hidden1(xw1, *low_rank_correction(x, a1, f1, c), b1, _bias(e1, batched), scale)
    h2 = ops.hidden2(torch.matmul(h1, w2), *low_rank_correction(h1, a2, f2, c), b2, _bias(e2, batched), scale)
    return ops.logits(torch.matmul(h2, w3), *low_rank_correction(h2, a3, f3, c), b3, _bias(e3, batched), scale)
