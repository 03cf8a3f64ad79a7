"""Layer members: population members that move one layer of the network only.

A whole member moves all 669,706 parameters at once, and its fitness change is dominated by the
layers with the largest share of the gradient (W2 and W3 hold about 81% of its squared norm at an ES
theta), so the estimate of W1 drowns. A layer member moves one layer (its weight and its bias), and
each layer's estimate comes from its own members, ranked among themselves, with its own sigma: a
block-structured population (block-coordinate ES; compare Salimans et al. 2017 for the estimator).

  * layer 1: a rank-1 move ``c * (U a) b^T`` of W1 and ``e`` of b1. With ``subspace`` k > 0 the
    input factor ``U a`` lies in the span of the training images' top-k uncentered principal
    components (``U``: 784 x k, orthonormal; ``a``: k standard normals), where nearly all of W1's
    gradient lies (an image x only sees W1 through x^T W1, and x lies close to that span). With
    k = 0, ``U`` is the identity. ``c = sqrt(784 / k)`` keeps the move's mean squared entry at
    sigma^2, as for a whole member. Unsupervised image statistics only: no labels, no gradients.
  * layer 2: a rank-1 move ``a b^T`` of W2 and ``e`` of b2, from the center's first hidden layer.
  * layer 3: a full move of W3 and b3 (5,130 floats), from the center's last hidden layer.

Layers 1 and 2 have a second kind, **unit members** (``kind: unit``): a member moves one hidden unit's
incoming weights (one column of W, ``c * U a`` for layer 1, ``a`` for layer 2) and that unit's bias,
nothing else. Layer 2's may search a subspace too: ``c * Q a`` with Q (512 x k) an orthonormal basis of
span(W1^T U_k), where the first hidden layer carries the images' top-k principal components
(``hidden_basis``, recomputed from theta's W1 each generation; c = sqrt(512 / k)). Antithetic pair i moves unit ``i mod 512``, so the units share the pairs evenly. The
later layers then see a change in one unit: layer 2's pre-activation moves by an outer product
(delta h1_j) W2[j, :], layer 3's by (delta h2_j) W3[j, :]. No 512 x 512 matmul per member: 4-5
times cheaper than a rank-1 member, so at equal compute the estimate is better aligned
(docs/lab-notes/2026-11-30-es-alone-layer-and-unit-members.md).

**Activity members** (``kind: activity``, every layer) are not weight-space ES but activity
perturbation (node perturbation; Widrow and Lehr 1990), forward passes only: pair i moves unit i's
pre-activation (the matmul output, before its flush) by +sigma and by -sigma on every image, and
every image's loss comes back. Image n's central difference is its slope along that unit; the layer's
estimate is (layer input)^T slopes (``activity_estimate``), B nearly independent samples per pair
where a weight-space member sums its B losses into one. They read no noise table rows; the
forward is a unit member's (``activity_forward``).

A rank-1 layer-1 member costs the second and third layers' matmuls (x W1 and x U are shared by the
tile); layer-2 and layer-3 members and unit members cost only elementwise work and small matmuls.
No Ray, no I/O.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch

from es_workers import members, network
from es_workers.architecture import Architecture
from es_workers.network import SEED

LAYERS = (1, 2, 3)


def param_range(layer: int, arch: Architecture = SEED) -> tuple[int, int]:
    """[start, stop) of the layer's weight and bias in theta (they are adjacent: W_l then b_l)."""
    start = 0
    shapes = arch.param_shapes
    for index, (name, shape) in enumerate(shapes):
        if name == f"W{layer}":
            size = math.prod(shape) + math.prod(shapes[index + 1][1])
            return start, start + size
        start += math.prod(shape)
    raise ValueError(f"no layer {layer}; layers are {LAYERS}")


def noise_length(layer: int, subspace: int = 0, unit: bool = False, arch: Architecture = SEED) -> int:
    """Table floats one member of ``layer`` reads: its factors (a, b) and its bias move e; a unit
    member: its column's factor a (k floats in a k-dimensional subspace) and its unit's bias move e."""
    if layer not in LAYERS:
        raise ValueError(f"no layer {layer}; layers are {LAYERS}")
    if layer == 3:
        return arch.output_layer_size
    fan_in, units = arch.fan_in(layer), arch.units(layer)
    if unit:
        return (subspace or fan_in) + 1
    return (subspace or fan_in) + 2 * units


def input_scale(subspace: int, fan_in: int = SEED.inputs) -> float:
    """c: sqrt(fan_in / k), so a move in a k-dimensional subspace has the mean squared entry sigma^2
    (1 with no subspace). fan_in: the layer's inputs (the seed's: 784 for layer 1, 512 for layer 2)."""
    return math.sqrt(fan_in / subspace) if subspace else 1.0


def hidden_basis(w1: torch.Tensor, images_basis: torch.Tensor, subspace: int) -> torch.Tensor:
    """(512, k) orthonormal basis of span(W1^T U_k), the first hidden layer's image of the training
    images' top-k principal components (U_k: the first k columns of layer 1's basis; their scales do
    not change the span): layer-2 unit members' input subspace at this W1. An image x near span(U_k)
    gives x W1 in it, so W2's gradient, sum over images of h1^T (dL/dz2), lies mostly there too (about
    91% of its squared norm at k = 32, docs/lab-notes/2026-12-01-es-alone-compute.md). Recomputed from theta's W1 wherever it is
    needed (workers and the estimate), in float64 on one thread on CPU: the same W1, the same bits."""
    with network.single_threaded() if w1.device.type == "cpu" else contextlib.nullcontext():
        q, _ = torch.linalg.qr(w1.double().T @ images_basis[:, :subspace].double())
        return q.float().contiguous()


def image_basis(images: torch.Tensor, subspace: int, power: float = 0.0) -> torch.Tensor:
    """(784, k) float32: the top-k eigenvectors of X^T X over the uint8 images (k uncentered principal
    components), each signed so its largest-magnitude entry is positive. Float64 on one thread: the same
    images give the same basis, bit for bit, on this machine.

    ``power`` p > 0 scales component m by lambda_m^p (lambda_m: its eigenvalue, the images' energy
    along it), normalised so the scales' mean square is 1: a member's coefficients a ~ N(0, I) then
    move W1 along U diag(s) a, a search distribution with variance lambda_m^(2p) (up to one factor)
    along component m, and the same mean squared entry as with p = 0."""
    pixels = math.prod(images.shape[1:])
    if not 1 <= subspace <= pixels:
        raise ValueError(f"subspace {subspace}: use 1 to {pixels} principal components")
    with network.single_threaded():
        x = images.reshape(-1, pixels).double() / 255.0
        values, vectors = torch.linalg.eigh(x.T @ x)
        basis = vectors[:, -subspace:].flip(-1)
        peak = basis.gather(0, basis.abs().argmax(dim=0, keepdim=True))
        basis = basis * torch.sign(peak)
        if power:
            scales = values[-subspace:].flip(-1).clamp_min(1e-12) ** power  # > 0: the top k of X^T X
            basis = basis * (scales / scales.square().mean().sqrt())
        return basis.float().contiguous()


def factors(
    noise: torch.Tensor, layer: int, subspace: int = 0, arch: Architecture = SEED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views (a (..., m, 1), b (..., n, 1), e (..., n)) of rank-1 members' table rows (layers 1 and 2)."""
    size_a, units = (subspace or arch.fan_in(layer)) if layer == 1 else arch.fan_in(layer), arch.units(layer)
    a = noise[..., :size_a]
    b = noise[..., size_a : size_a + units]
    e = noise[..., size_a + units : size_a + 2 * units]
    return a.unsqueeze(-1), b.unsqueeze(-1), e


def _scale(scales: torch.Tensor, batched: bool) -> torch.Tensor:
    return scales.reshape(-1, 1, 1) if batched else scales


def first_layer_forward(
    xu: torch.Tensor,
    xw1: torch.Tensor,
    theta: torch.Tensor,
    noise: torch.Tensor,
    scales: torch.Tensor,
    subspace: int,
    arithmetic: str,
    fused: bool = False,
    arch: Architecture = SEED,
) -> torch.Tensor:
    """Logits of layer-1 members: noise (L,) with a 0-d scale (one member, (B, 10)) or (n, L) with
    scales (n,) ((n, B, 10)). ``xu = x U`` (x itself with no subspace) and ``xw1 = x W1`` are shared."""
    _, b1, w2, b2, w3, b3 = network.unflatten(theta, arch=arch)
    a, b, e = factors(noise, 1, subspace, arch)
    batched = noise.dim() == 2
    scale = _scale(scales, batched)
    moved = members.low_rank_epilogues(arithmetic, fused, arch)
    ops = network.epilogues(arithmetic, fused, arch)
    h1 = moved.hidden1(
        xw1,
        *members.low_rank_correction(xu, a, b, scale * input_scale(subspace, arch.inputs)),
        b1,
        network._bias(e, batched),
        scale,
    )
    h2 = ops.hidden2(torch.matmul(h1, w2), b2)
    return ops.logits(torch.matmul(h2, w3), b3)


def second_layer_forward(
    h1: torch.Tensor,
    h1w2: torch.Tensor,
    theta: torch.Tensor,
    noise: torch.Tensor,
    scales: torch.Tensor,
    arithmetic: str,
    fused: bool = False,
    arch: Architecture = SEED,
) -> torch.Tensor:
    """Logits of layer-2 members (shapes as ``first_layer_forward``) from the center's first hidden
    layer ``h1`` and ``h1w2 = h1 W2``, both shared."""
    _, _, _, b2, w3, b3 = network.unflatten(theta, arch=arch)
    a, b, e = factors(noise, 2, arch=arch)
    batched = noise.dim() == 2
    scale = _scale(scales, batched)
    moved = members.low_rank_epilogues(arithmetic, fused, arch)
    h2 = moved.hidden2(h1w2, *members.low_rank_correction(h1, a, b, scale), b2, network._bias(e, batched), scale)
    return network.epilogues(arithmetic, fused, arch).logits(torch.matmul(h2, w3), b3)


def unit_indices(
    first_member: int, count: int, device: torch.device | str = "cpu", units: int = SEED.units(1)
) -> torch.Tensor:
    """The unit each of ``count`` members from ``first_member`` on moves: pair i moves unit i mod ``units``."""
    return torch.div(torch.arange(first_member, first_member + count, device=device), 2, rounding_mode="floor") % units


def unit_factors(noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (a (m, K), e (m,)) of unit members' table rows (m, K + 1)."""
    return noise[:, :-1], noise[:, -1]


def unit_first_layer_forward(
    xu: torch.Tensor,
    z1: torch.Tensor,
    h1: torch.Tensor,
    z2: torch.Tensor,
    theta: torch.Tensor,
    noise: torch.Tensor,
    units: torch.Tensor,
    scales: torch.Tensor,
    subspace: int,
    arithmetic: str,
    fused: bool = False,
    arch: Architecture = SEED,
) -> torch.Tensor:
    """(m, B, 10) logits of m layer-1 unit members (noise (m, K + 1), units and scales (m,)). Shared by
    the tile: ``xu = x U`` (x with no subspace), the center's ``z1 = x W1``, ``h1`` and ``z2 = h1 W2``.
    Member i adds ``scales_i * c * x U a_i`` to column units_i of z1 and ``scales_i * e_i`` to that bias;
    layer 2's pre-activation moves by the outer product of that unit's change with its row of W2."""
    b1 = network.unflatten(theta, arch=arch)[1]
    a, e = unit_factors(noise)
    column = z1[:, units].T + (scales * input_scale(subspace, arch.inputs))[:, None] * torch.mm(a, xu.T)
    bias = (b1[units] + scales * e)[:, None]
    return _first_layer_unit_moved(column, bias, units, h1, z2, theta, arithmetic, fused, arch)


def _first_layer_unit_moved(column, bias, units, h1, z2, theta, arithmetic, fused, arch) -> torch.Tensor:
    """(m, B, 10) logits with first-layer unit units_i's pre-activation (before its flush) set to
    column_i (m, B) and its bias to bias_i: layer 2's pre-activation moves by the outer product of the
    unit's change with its row of W2."""
    _, _, w2, b2, w3, b3 = network.unflatten(theta, arch=arch)
    ops = network.epilogues(arithmetic, fused, arch)
    change = ops.hidden1(column, bias) - h1[:, units].T
    h2 = ops.hidden2_moved(z2, change, w2[units], b2)  # fused: one kernel, no (m, B, 512) temporary
    return ops.logits(torch.matmul(h2, w3), b3)


def _second_layer_unit_moved(column, bias, units, h2, z3, theta, arithmetic, fused, arch) -> torch.Tensor:
    """(m, B, 10) logits with second-layer unit units_i's pre-activation set to column_i and its bias to
    bias_i: the logits' pre-activation moves by the unit's change times its row of W3."""
    w3, b3 = network.unflatten(theta, arch=arch)[4:]
    ops = network.epilogues(arithmetic, fused, arch)
    change = ops.hidden2(column, bias) - h2[:, units].T
    return ops.logits(network.moved(z3, change, w3[units]), b3)


def unit_second_layer_forward(
    h1q: torch.Tensor,
    z2: torch.Tensor,
    h2: torch.Tensor,
    z3: torch.Tensor,
    theta: torch.Tensor,
    noise: torch.Tensor,
    units: torch.Tensor,
    scales: torch.Tensor,
    subspace: int,
    arithmetic: str,
    fused: bool = False,
    arch: Architecture = SEED,
) -> torch.Tensor:
    """(m, B, 10) logits of m layer-2 unit members, from the center's ``h1q = h1 Q`` (``h1`` itself with
    no subspace; Q: ``hidden_basis``), ``z2 = h1 W2``, ``h2`` and ``z3 = h2 W3`` (shared by the tile):
    member i adds ``scales_i * c * h1 Q a_i`` to column units_i of z2."""
    b2 = network.unflatten(theta, arch=arch)[3]
    a, e = unit_factors(noise)
    column = z2[:, units].T + (scales * input_scale(subspace, arch.fan_in(2)))[:, None] * torch.mm(a, h1q.T)
    bias = (b2[units] + scales * e)[:, None]
    return _second_layer_unit_moved(column, bias, units, h2, z3, theta, arithmetic, fused, arch)


def activity_forward(
    layer: int,
    center: tuple[torch.Tensor, ...],
    theta: torch.Tensor,
    units: torch.Tensor,
    scales: torch.Tensor,
    arithmetic: str,
    fused: bool = False,
    arch: Architecture = SEED,
) -> torch.Tensor:
    """(m, B, 10) logits of m activity members of ``layer``: member i moves unit units_i's pre-activation
    (the matmul output, before its flush) by scales_i on every image, and nothing else. ``center``: the
    unperturbed network's (x W1, h1, z2 = h1 W2, h2, z3 = h2 W3) on the images, shared by the tile.
    Layer 1's and 2's are unit members whose column moves by a constant; layer 3's move one logit."""
    xw1, h1, z2, h2, z3 = center
    _, b1, _, b2, _, b3 = network.unflatten(theta, arch=arch)
    shift = scales[:, None]
    if layer == 1:
        return _first_layer_unit_moved(
            xw1[:, units].T + shift, b1[units, None], units, h1, z2, theta, arithmetic, fused, arch
        )
    if layer == 2:
        return _second_layer_unit_moved(
            z2[:, units].T + shift, b2[units, None], units, h2, z3, theta, arithmetic, fused, arch
        )
    one_hot = torch.nn.functional.one_hot(units, arch.outputs).to(z3.dtype)  # z + s * 0 is z, bit for bit
    logits = network.epilogues(arithmetic, fused, arch).logits
    return logits(network.moved(z3, shift.expand(-1, z3.shape[0]), one_hot), b3)


def center_inputs(
    x: torch.Tensor, theta: torch.Tensor, arithmetic: str, arch: Architecture = SEED
) -> tuple[torch.Tensor, ...]:
    """Each layer's input at the center, (x, h1, h2) in the scaled frame: what an activity estimate
    multiplies its per-image slopes by (eager epilogues, equal bit for bit to the fused ones)."""
    w1, b1, w2, b2 = network.unflatten(theta, arch=arch)[:4]
    ops = network.epilogues(arithmetic, arch=arch)
    h1 = ops.hidden1(torch.mm(x, w1), b1)
    return x, h1, ops.hidden2(torch.mm(h1, w2), b2)


def activity_estimate(layer_input: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """The ascent direction on fitness (minus the mean loss) of one layer's weight and bias, flat in
    theta's order, from ``slopes`` (B, units): d loss_n / d (unit j's pre-activation on image n), as
    activity members measure them. The pre-activation is layer_input W (+ the bias), so its weight's
    gradient is layer_input^T slopes and its bias's the slopes' sum: exact float32 algebra of the
    matmul, no error carried back through any weight (Widrow and Lehr 1990, node perturbation)."""
    batch = layer_input.shape[0]
    with network.single_threaded() if slopes.device.type == "cpu" else contextlib.nullcontext():
        weight = torch.mm(layer_input.T, slopes)
        return torch.cat([weight.flatten(), slopes.sum(dim=0)]).div_(-batch)


def weighted_moves(
    rows: torch.Tensor,
    weights: torch.Tensor,
    layer: int,
    subspace: int = 0,
    basis: torch.Tensor | None = None,
    unit: bool = False,
    arch: Architecture = SEED,
) -> torch.Tensor:
    """sum_k weights_k * (layer's move of member k), flat in theta's order for that layer (weight, then
    bias). ``basis``: the input subspace's basis (layer 1: U; layer-2 unit members: ``hidden_basis``). Rank-1 layers: one (m, K) @ (K, n) matmul of the stacked factors, then U (784 x k) once; unit
    members: each unit's pairs summed in pair order. On CPU single-threaded, so the bits do not depend on
    the thread count."""
    if layer == 3:
        return torch.mv(rows.T, weights)
    if unit:
        return _unit_weighted_moves(rows, weights, layer, subspace, basis, arch)
    a, b, e = factors(rows, layer, subspace, arch)
    with network.single_threaded() if rows.device.type == "cpu" else contextlib.nullcontext():
        weight = torch.mm(a.squeeze(-1).T, b.squeeze(-1) * weights[:, None])
        if layer == 1 and subspace:
            weight = torch.mm(basis, weight).mul_(input_scale(subspace, arch.inputs))
        return torch.cat([weight.flatten(), torch.mv(e.T, weights)])


def _unit_weighted_moves(
    rows: torch.Tensor,
    weights: torch.Tensor,
    layer: int,
    subspace: int,
    basis: torch.Tensor | None,
    arch: Architecture,
) -> torch.Tensor:
    """``weighted_moves`` for unit members: pair i's weighted factor lands in column i mod (the layer's units)."""
    a, e = unit_factors(rows)
    units = arch.units(layer)
    pad = -rows.shape[0] % units
    with network.single_threaded() if rows.device.type == "cpu" else contextlib.nullcontext():
        weighted = torch.nn.functional.pad(torch.cat([a, e[:, None]], dim=1) * weights[:, None], (0, 0, 0, pad))
        per_unit = weighted.reshape(-1, units, a.shape[1] + 1).sum(dim=0)  # (units, K + 1)
        weight = per_unit[:, :-1].T.contiguous()
        if subspace:
            weight = torch.mm(basis, weight).mul_(input_scale(subspace, arch.fan_in(layer)))
        return torch.cat([weight.flatten(), per_unit[:, -1]])


class Center:
    """What layer kinds' estimates read at the generation's center: theta, layer 1's basis (on theta's
    device), and the training images (uint8) with the minibatch's indices, in the network's arithmetic."""

    def __init__(
        self,
        theta: torch.Tensor,
        basis: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        batch_indices: np.ndarray | None = None,
        arithmetic: str = "tf-ftz",
        arch: Architecture = SEED,
    ):
        self.theta, self.basis, self.arithmetic, self.arch = theta, basis, arithmetic, arch
        self.images, self.batch_indices = images, batch_indices

    @functools.cached_property
    def layer_inputs(self) -> tuple[torch.Tensor, ...]:
        """Each layer's input at the center on the minibatch (layer_members.center_inputs), once."""
        if self.images is None:
            raise ValueError("activity members' estimate needs the training images")
        index = torch.as_tensor(self.batch_indices).to(self.images.device)
        x = self.images.reshape(-1, self.arch.inputs).index_select(0, index).to(self.theta.device).float() / 255.0
        with network.single_threaded() if self.theta.device.type == "cpu" else contextlib.nullcontext():
            return center_inputs(x, self.theta, self.arithmetic, self.arch)
