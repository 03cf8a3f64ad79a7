"""Layer members (workers/layer_members.py): their moves, forwards, estimate and the image basis. No Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from es_service import strategy
from es_workers import kinds, layer_members, network, noise
from es_workers.evaluator import PopulationEvaluator


def dense_move(
    row: torch.Tensor, layer: int, subspace: int = 0, basis: torch.Tensor | None = None, unit: int | None = None
) -> torch.Tensor:
    """The (NUM_PARAMS,) move a layer member's table row stands for: zeros outside its layer (``unit``: a
    unit member moving that unit's column and bias)."""
    move = torch.zeros(network.NUM_PARAMS, dtype=torch.float64)
    start, stop = layer_members.param_range(layer)
    if unit is not None:
        column, bias = row[:-1].double(), float(row[-1])
        if subspace:
            column = basis.double() @ column * layer_members.input_scale(subspace, 784 if layer == 1 else 512)
        weight = torch.zeros(column.shape[0], 512, dtype=torch.float64)
        weight[:, unit] = column
        bias_move = torch.zeros(512, dtype=torch.float64)
        bias_move[unit] = bias
        move[start:stop] = torch.cat([weight.flatten(), bias_move])
        return move
    if layer == 3:
        move[start:stop] = row.double()
        return move
    a, b, e = (part.double() for part in layer_members.factors(row, layer, subspace))
    if layer == 1 and subspace:
        a = basis.double() @ a * layer_members.input_scale(subspace)
    move[start:stop] = torch.cat([(a @ b.T).flatten(), e])
    return move


def test_param_ranges_are_each_layers_weight_and_bias():
    theta = torch.arange(network.NUM_PARAMS, dtype=torch.float32)
    views = network.unflatten(theta)
    for layer in layer_members.LAYERS:
        start, stop = layer_members.param_range(layer)
        expected = torch.cat([views[2 * layer - 2].flatten(), views[2 * layer - 1]])
        assert torch.equal(theta[start:stop], expected)
    assert layer_members.param_range(3)[1] == network.NUM_PARAMS
    with pytest.raises(ValueError):
        layer_members.param_range(4)


def test_image_basis_is_orthonormal_deterministic_and_holds_most_of_the_images_energy(mnist):
    images = mnist.train_images[:20000]
    basis = layer_members.image_basis(images, 32)
    assert basis.shape == (784, 32) and basis.dtype == torch.float32
    assert torch.allclose(basis.T @ basis, torch.eye(32), atol=1e-5)
    assert torch.equal(basis, layer_members.image_basis(images, 32))
    x = images.reshape(-1, 784).double() / 255
    kept = float((x @ basis.double()).square().sum() / x.square().sum())
    assert 0.8 < kept < 1.0  # 85% at k = 32 on MNIST; random directions would keep 32/784 = 4%
    assert torch.allclose(layer_members.image_basis(images, 8), basis[:, :8], atol=1e-4)


@pytest.mark.parametrize("power", [-0.5, 0.25, 0.5])
def test_a_subspace_power_scales_each_component_by_its_energy(mnist, power):
    """Column m of the shaped basis is U's column m times lambda_m^p, normalised to mean square 1: the
    same directions, the moves' mean squared entry unchanged, and more weight on the main components."""
    images = mnist.train_images[:20000]
    plain, shaped = layer_members.image_basis(images, 16), layer_members.image_basis(images, 16, power)
    scales = shaped.norm(dim=0)
    assert torch.allclose(shaped / scales, plain, atol=1e-5)
    assert float(scales.square().mean()) == pytest.approx(1.0, rel=1e-5)
    x = images.reshape(-1, 784).double() / 255
    energy = (x @ plain.double()).square().sum(dim=0)  # lambda_m: the images' energy along component m
    expected = energy**power / (energy ** (2 * power)).mean().sqrt()
    assert torch.allclose(scales.double(), expected, rtol=1e-4)
    ordered = scales[:-1] >= scales[1:] if power > 0 else scales[:-1] <= scales[1:]
    assert bool(ordered.all()) and float(scales.max() / scales.min()) > 2  # k = 16: lambda spans 30x


@pytest.mark.parametrize("layer,subspace", [(1, 0), (1, 24), (2, 0)])
def test_a_rank1_layer_member_is_theta_plus_its_dense_move(mnist, layer, subspace):
    """The forward from shared products equals the plain forward of theta + scale * dense move, up to the
    matmuls' rounding (linear arithmetic: tight; tf-ftz: the same predictions almost everywhere)."""
    table = noise.make_table(5, 1 << 20)
    theta = network.init_theta(0)
    basis = layer_members.image_basis(mnist.train_images[:5000], subspace) if subspace else None
    x = mnist.train_images[:128].reshape(-1, 784).float() / 255
    for arithmetic in ("linear", "tf-ftz"):
        length = layer_members.noise_length(layer, subspace)
        for offset, sign in ((11, 1.0), (9000, -1.0)):
            row = table[offset : offset + length]
            scale = torch.tensor(np.float32(sign * 0.05))
            if layer == 1:
                xu = x @ basis if subspace else x
                got = layer_members.first_layer_forward(
                    xu, x @ network.unflatten(theta)[0], theta, row, scale, subspace, arithmetic
                )
            else:
                w1, b1 = network.unflatten(theta)[:2]
                h1 = network.epilogues(arithmetic).hidden1(x @ w1, b1)
                got = layer_members.second_layer_forward(
                    h1, h1 @ network.unflatten(theta)[2], theta, row, scale, arithmetic
                )
            moved = (theta.double() + float(scale) * dense_move(row, layer, subspace, basis)).float()
            expected = network.forward(x, network.unflatten(moved), arithmetic)
            if arithmetic == "linear":
                assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
            else:
                assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95
            # batched (what CUDA runs): the same members from (n, L) rows
            rows = torch.stack([row, row])
            scales = torch.stack([scale, -scale])
            if layer == 1:
                batched = layer_members.first_layer_forward(
                    xu, x @ network.unflatten(theta)[0], theta, rows, scales, subspace, arithmetic
                )
            else:
                batched = layer_members.second_layer_forward(
                    h1, h1 @ network.unflatten(theta)[2], theta, rows, scales, arithmetic
                )
            assert torch.allclose(batched[0], got, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer,subspace", [(1, 0), (1, 16), (2, 0), (3, 0)])
def test_layer_estimate_is_the_weighted_sum_of_dense_moves(mnist, layer, subspace):
    table = noise.make_table(2, 1 << 20)
    basis = layer_members.image_basis(mnist.train_images[:5000], subspace) if subspace else None
    offsets = np.array([3, 500, 70000, 123456, 9], dtype=np.int64)
    weights = np.array([0.5, -0.25, 0.125, -0.5, 0.3])
    center = kinds.Center(network.init_theta(0), basis)
    got = kinds.layer_kind(layer, "rank1", subspace).estimate(table, offsets, weights, 0.02, 10, center)
    length = layer_members.noise_length(layer, subspace)
    expected = sum(w * dense_move(table[o : o + length], layer, subspace, basis) for o, w in zip(offsets, weights))
    start, stop = layer_members.param_range(layer)
    assert got.shape == (stop - start,)
    assert torch.allclose(got.double(), expected[start:stop] / (10 * 0.02), rtol=1e-4, atol=1e-5)
    assert torch.all(expected[:start] == 0) and torch.all(expected[stop:] == 0)


def test_layer_estimate_is_a_gradient_on_average():
    """Sign and scale: for a linear fitness F = <gradient, theta> on layer 2, antithetic pairs score
    F(+) - F(-) = 2 sigma <gradient, eps>, and the estimate over many pairs has unit slope along the
    gradient and points its way (a random direction's cosine would be about 0.002)."""
    table = noise.make_table(4, 1 << 21)
    gradient = torch.outer(torch.linspace(-1, 1, 512), torch.linspace(1, 2, 512)).double()
    sigma, pairs = 0.01, 1000
    offsets = np.random.default_rng(0).integers(0, noise.max_offset(1 << 21, network.NUM_PARAMS) + 1, size=pairs)
    weights = np.empty(pairs)
    for k, offset in enumerate(offsets):
        a, b, _ = layer_members.factors(table[offset : offset + layer_members.noise_length(2)], 2)
        weights[k] = float(2 * sigma * (a.double().T @ gradient @ b.double()))
    center = kinds.Center(network.init_theta(0))
    estimate = (
        kinds.LayerRank1(layer=2).estimate(table, offsets, weights, sigma, 2 * pairs, center).double()[: 512 * 512]
    )
    flat = gradient.flatten()
    cosine = float(estimate @ flat / (estimate.norm() * flat.norm()))
    slope = float(estimate @ flat / (flat @ flat))
    assert cosine > 0.03 and slope == pytest.approx(1.0, rel=0.3)


@pytest.mark.parametrize(
    "layer,unit,subspace", [(1, False, 32), (2, False, 0), (1, True, 32), (2, True, 0), (2, True, 32)]
)
def test_evaluator_layer_members_do_not_depend_on_threads_or_tile_mates(mnist, layer, unit, subspace):
    kind = kinds.layer_kind(layer, "unit" if unit else "rank1", subspace)  # the first unit member: 600
    table = noise.make_table(7, 1 << 20)
    theta = network.init_theta(0)
    basis = layer_members.image_basis(mnist.train_images[:5000], 32) if subspace else None
    rng = np.random.default_rng(1)
    offsets = np.repeat(rng.integers(0, noise.max_offset(1 << 20, network.NUM_PARAMS) + 1, size=5), 2).astype(np.int64)
    signs = np.tile(np.array([1.0, -1.0], dtype=np.float32), 5)
    images = np.arange(3000, 3064, dtype=np.int64)
    results = []
    for threads in (1, 2):
        evaluator = PopulationEvaluator(
            table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", threads=threads, basis=basis
        )
        results.append(kind.evaluate(evaluator, theta, offsets, signs, 0.05, images, 600))
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
    assert len(set(results[0][0].tolist())) == len(offsets)
    alone = PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", basis=basis)
    for j in (0, 7):
        one = kind.evaluate(alone, theta, offsets[j : j + 1], signs[j : j + 1], 0.05, images, 600 + j)
        assert one[0][0] == results[0][0][j]
    batched = kind.evaluate(
        PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", basis=basis, batched=True),
        theta,
        offsets,
        signs,
        0.05,
        images,
        600,
    )
    assert np.allclose(batched[0], results[0][0], rtol=1e-4) and np.abs(batched[1] - results[0][1]).max() <= 1


def layer_basis(mnist, theta, layer, subspace):
    """The basis a layer's members search (None with no subspace): the images' principal components
    (layer 1), or their image in the first hidden layer at theta's W1 (layer 2)."""
    if not subspace:
        return None
    images = layer_members.image_basis(mnist.train_images[:5000], subspace)
    return images if layer == 1 else layer_members.hidden_basis(network.unflatten(theta)[0], images, subspace)


def test_hidden_basis_is_orthonormal_and_spans_the_first_layers_image_of_the_components(mnist):
    w1 = network.unflatten(network.init_theta(0))[0]
    images = layer_members.image_basis(mnist.train_images[:5000], 32)
    q = layer_members.hidden_basis(w1, images, 16)
    assert q.shape == (512, 16) and torch.allclose(q.T @ q, torch.eye(16), atol=1e-5)
    image = w1.T @ images[:, :16]  # (512, 16): the components through W1
    assert torch.allclose(q @ (q.T @ image), image, atol=1e-4 * float(image.abs().max()))
    assert not torch.allclose(q @ (q.T @ (w1.T @ images[:, 16:17])), w1.T @ images[:, 16:17], atol=1e-3)
    assert torch.equal(layer_members.hidden_basis(w1.clone(), images.clone(), 16), q)


@pytest.mark.parametrize("layer,subspace", [(1, 0), (1, 24), (2, 0), (2, 24)])
def test_a_unit_member_is_theta_plus_its_dense_move(mnist, layer, subspace):
    """A unit member's logits from the center's shared activations equal the plain forward of theta plus
    its one-column move, up to the matmuls' rounding; a batch of members gives each one's logits."""
    table = noise.make_table(5, 1 << 20)
    theta = network.init_theta(0)
    w1, b1, w2, b2, w3, _ = network.unflatten(theta)
    basis = layer_basis(mnist, theta, layer, subspace)
    x = mnist.train_images[:128].reshape(-1, 784).float() / 255
    length = layer_members.noise_length(layer, subspace, unit=True)
    assert length == (subspace or (784 if layer == 1 else 512)) + 1
    offsets, units = (11, 9000, 4242), torch.tensor([0, 300, 511])
    scales = torch.tensor([0.5, -0.5, 0.25])
    rows = torch.stack([table[o : o + length] for o in offsets])
    for arithmetic in ("linear", "tf-ftz"):
        ops = network.epilogues(arithmetic)
        h1 = ops.hidden1(x @ w1, b1)
        if layer == 1:
            shared = (x @ basis if subspace else x, x @ w1, h1, h1 @ w2)
            forward = layer_members.unit_first_layer_forward
            args = (*shared, theta, rows, units, scales, subspace, arithmetic)
        else:
            h2 = ops.hidden2(h1 @ w2, b2)
            forward = layer_members.unit_second_layer_forward
            args = (
                h1 @ basis if subspace else h1,
                h1 @ w2,
                h2,
                h2 @ w3,
                theta,
                rows,
                units,
                scales,
                subspace,
                arithmetic,
            )
        got = forward(*args)
        assert torch.equal(forward(*args, fused=True), got)  # one compiled kernel per epilogue, the same bits
        assert got.shape == (3, 128, 10)
        for k in range(3):
            move = dense_move(rows[k], layer, subspace, basis, unit=int(units[k]))
            moved = (theta.double() + float(scales[k]) * move).float()
            expected = network.forward(x, network.unflatten(moved), arithmetic)
            if arithmetic == "linear":
                assert torch.allclose(got[k], expected, rtol=1e-4, atol=1e-4)
            else:
                assert (got[k].argmax(-1) == expected.argmax(-1)).float().mean() > 0.95
            assert not torch.equal(expected, network.forward(x, network.unflatten(theta), arithmetic))


@pytest.mark.parametrize("layer,subspace", [(1, 0), (1, 16), (2, 0), (2, 16)])
def test_unit_estimate_is_the_weighted_sum_of_each_units_moves(mnist, layer, subspace):
    """Pair i moves unit i mod 512: 515 pairs put two pairs on units 0, 1 and 2."""
    table = noise.make_table(2, 1 << 20)
    basis = layer_basis(mnist, network.init_theta(0), layer, subspace)
    rng = np.random.default_rng(3)
    offsets = rng.integers(0, noise.max_offset(1 << 20, network.NUM_PARAMS) + 1, size=515)
    weights = rng.normal(size=515)
    center = kinds.Center(network.init_theta(0), layer_basis(mnist, None, 1, subspace))  # the images' components
    got = kinds.Unit(layer=layer, subspace=subspace).estimate(table, offsets, weights, 0.02, 1030, center)
    length = layer_members.noise_length(layer, subspace, unit=True)
    start, stop = layer_members.param_range(layer)
    expected = torch.zeros(stop - start, dtype=torch.float64)
    for i, (offset, weight) in enumerate(zip(offsets, weights)):
        expected += (
            weight * dense_move(table[offset : offset + length], layer, subspace, basis, unit=i % 512)[start:stop]
        )
    assert torch.allclose(got.double(), expected / (1030 * 0.02), rtol=1e-4, atol=1e-4)
    assert torch.equal(layer_members.unit_indices(1023, 4), torch.tensor([511, 0, 0, 1]))


@pytest.mark.parametrize(
    "layer,unit_from,basis_columns,message",
    [(1, None, 0, "basis"), (2, 0, 8, "basis"), (2, None, 32, "only as unit members")],
)
def test_a_subspace_the_members_cannot_search_is_refused(mnist, layer, unit_from, basis_columns, message):
    """Without enough principal components, or for layer-2 rank-1 members (which have no subspace)."""
    basis = layer_members.image_basis(mnist.train_images[:5000], basis_columns) if basis_columns else None
    evaluator = PopulationEvaluator(
        noise.make_table(7, 1 << 20), mnist.train_images, mnist.train_labels, "tf-ftz", basis=basis
    )
    with pytest.raises(ValueError, match=message):
        kinds.layer_kind(layer, "rank1" if unit_from is None else "unit", 16).evaluate(
            evaluator,
            network.init_theta(0),
            np.array([0, 0]),
            np.array([1.0, -1.0], dtype=np.float32),
            0.05,
            np.arange(8),
            unit_from or 0,
        )


def test_the_evaluator_keeps_the_hidden_basis_for_one_theta_and_rebuilds_it_when_theta_moves(mnist):
    """A generation's later tiles reuse layer 2's basis; an in-place update of theta (a new generation)
    rebuilds it, equal to the basis computed from the new W1."""
    images = layer_members.image_basis(mnist.train_images[:5000], 32)
    evaluator = PopulationEvaluator(
        noise.make_table(7, 1 << 20), mnist.train_images, mnist.train_labels, "tf-ftz", basis=images
    )
    theta = network.init_theta(0)
    first = evaluator.hidden_basis(theta, 16)
    assert evaluator.hidden_basis(theta, 16) is first
    assert evaluator.hidden_basis(theta.clone(), 16) is not first
    theta.mul_(0.5).add_(network.init_theta(1), alpha=0.5)
    moved = evaluator.hidden_basis(theta, 16)
    assert torch.equal(moved, layer_members.hidden_basis(network.unflatten(theta)[0], images, 16))
    assert not torch.allclose(moved.abs(), first.abs(), atol=1e-3)


@pytest.mark.parametrize("layer,unit_from,subspace", [(1, 0, 16), (2, 0, 16), (2, None, 0), (3, None, 0)])
def test_what_tiles_share_is_kept_only_for_the_same_theta_and_minibatch(mnist, layer, unit_from, subspace):
    """One evaluator through a sequence of tiles (another minibatch, theta moved in place) scores each as a
    fresh evaluator does: nothing kept from an earlier tile leaks into a later one."""
    table = noise.make_table(7, 1 << 20)
    basis = layer_members.image_basis(mnist.train_images[:5000], 16)

    def make():
        return PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", basis=basis)

    offsets, signs = np.array([5, 5, 900, 900]), np.array([1.0, -1.0, 1.0, -1.0], dtype=np.float32)
    theta = network.init_theta(0)
    kept = make()

    def score(evaluator, images):
        if layer == 3:
            return kinds.Output().evaluate(evaluator, theta, offsets, signs, 0.05, images)[0]
        return kinds.layer_kind(layer, "rank1" if unit_from is None else "unit", subspace).evaluate(
            evaluator, theta, offsets, signs, 0.05, images, unit_from or 0
        )[0]

    first, second = np.arange(64), np.arange(64, 128)
    for images, move in ((first, False), (first, False), (second, False), (second, True)):
        if move:
            theta.mul_(0.5).add_(network.init_theta(1), alpha=0.5)
        assert np.array_equal(score(kept, images), score(make(), images))
    assert not np.array_equal(score(kept, second), score(kept, first))


def test_input_scale_keeps_the_moves_mean_square_entry():
    assert layer_members.input_scale(0) == 1.0
    assert layer_members.input_scale(49) == pytest.approx(math.sqrt(16))


def test_a_layers_step_scale_scales_its_step_and_zero_freezes_it():
    """step_scale s on a layer: its step is s times the full one (Adam's update and decoupled decay alike
    scale with the learning rate), the other layers' steps are bit for bit unchanged; 0 freezes it."""
    theta = network.init_theta(1)
    grad = torch.randn(network.NUM_PARAMS, generator=torch.Generator().manual_seed(2))
    full = strategy.AdamES(theta, 0.01, 0.5, decoupled=True)
    half = strategy.AdamES(theta, 0.01, 0.5, decoupled=True, layer_step_scales=(1.0, 0.5, 0.0))
    for _ in range(3):
        full.step(grad, 0.01)
        half.step(grad, 0.01)
    (start2, stop2), (start3, _) = layer_members.param_range(2), layer_members.param_range(3)
    assert torch.equal(half.theta[:start2], full.theta[:start2])
    assert torch.equal(half.theta[start3:], theta[start3:])
    moved_full = full.theta.detach()[start2:stop2] - theta[start2:stop2]
    moved_half = half.theta.detach()[start2:stop2] - theta[start2:stop2]
    assert torch.allclose(moved_half, 0.5 * moved_full, rtol=1e-2, atol=1e-5)


# ---- activity members ---------------------------------------------------------------------------------


def moved_forward(x, theta, layer: int, unit: int, shift: float, arithmetic: str) -> torch.Tensor:
    """(B, 10) logits of the whole network with one unit's pre-activation (the matmul output, before its
    flush) moved by ``shift`` on every image: the definition an activity member stands for."""
    w1, b1, w2, b2, w3, b3 = network.unflatten(theta)
    ops = network.epilogues(arithmetic)
    z = torch.mm(x, w1)
    for index, (weight, bias, epilogue) in enumerate(
        [(w2, b1, ops.hidden1), (w3, b2, ops.hidden2), (None, b3, ops.logits)], start=1
    ):
        if index == layer:
            z = z.clone()
            z[:, unit] += shift
        h = epilogue(z, bias)
        if weight is None:
            return h
        z = torch.mm(h, weight)


def activity_members(theta, layer: int, mnist, arithmetic: str, sigma: float, images, unit_from: int = 0, count=None):
    evaluator = PopulationEvaluator(torch.zeros(1 << 20), mnist.train_images, mnist.train_labels, arithmetic, "cpu")
    count = 2 * network.SEED.units(layer) - unit_from if count is None else count
    signs = np.tile(np.array([1.0, -1.0], dtype=np.float32), (unit_from + count + 1) // 2)[
        unit_from : unit_from + count
    ]
    return kinds.Activity(layer=layer).evaluate(evaluator, theta, None, signs, sigma, images, unit_from)


@pytest.mark.parametrize("layer", layer_members.LAYERS)
def test_an_activity_member_is_the_network_with_one_units_pre_activation_moved(mnist, layer):
    """Each member's per-image losses are those of the network whose unit i mod units is moved by its
    sign times sigma (layers 1 and 2 read the move through the next layer's row of weights: the same up
    to float32 rounding; layer 3 moves a logit itself: bit for bit)."""
    theta = network.init_theta(0)
    images = np.arange(64, dtype=np.int64)
    x = mnist.train_images[:64].reshape(-1, 784).float() / 255.0
    y = mnist.train_labels[:64]
    loss_sums, correct, per_image = activity_members(theta, layer, mnist, "tf-ftz", 0.3, images, unit_from=6, count=14)
    assert per_image.shape == (14, 64) and per_image.dtype == np.float32
    for member in range(14):
        index = 6 + member
        logits = moved_forward(x, theta, layer, index // 2, 0.3 if index % 2 == 0 else -0.3, "tf-ftz")
        expected = torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()
        if layer == 3:
            assert np.array_equal(per_image[member], expected)
        else:
            assert np.allclose(per_image[member], expected, rtol=1e-4, atol=1e-5)
        assert correct[member] == int((logits.argmax(dim=1) == y).sum())
        assert np.isclose(loss_sums[member], per_image[member].astype(np.float64).sum())


def test_activity_estimate_is_the_gradient_where_the_network_is_smooth(mnist):
    """Without flushes the loss is smooth, so central differences of each unit's pre-activation are
    its gradient, and input^T slopes is the weight's: the activity estimate of every block matches
    minus autograd's gradient of the mean loss (cosine above 0.999). A sign slip or a wrong input
    would fail it."""
    theta = network.init_theta(1)
    images = np.arange(100, 164, dtype=np.int64)
    x = mnist.train_images[images].reshape(-1, 784).float() / 255.0
    y = mnist.train_labels[images]
    inputs = layer_members.center_inputs(x, theta, "linear")
    params = theta.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(network.forward(x, network.unflatten(params), "linear"), y).backward()
    for layer in layer_members.LAYERS:
        per_image = activity_members(theta, layer, mnist, "linear", 1e-2, images)[2]
        slopes = torch.as_tensor(strategy.activity_slopes(per_image, 1e-2))
        estimate = layer_members.activity_estimate(inputs[layer - 1], slopes.T).double()
        start, stop = layer_members.param_range(layer)
        cosine = torch.nn.functional.cosine_similarity(estimate, -params.grad[start:stop].double(), dim=0)
        assert cosine > 0.999, (layer, float(cosine))


def test_activity_members_do_not_depend_on_threads_or_tile_mates(mnist):
    theta = network.init_theta(0)
    images = np.arange(64, dtype=np.int64)
    whole = activity_members(theta, 1, mnist, "tf-ftz", 0.3, images, count=64)
    part = activity_members(theta, 1, mnist, "tf-ftz", 0.3, images, unit_from=5, count=30)
    assert np.array_equal(whole[2][5:35], part[2]) and np.array_equal(whole[1][5:35], part[1])
    one = kinds.Activity(layer=1).evaluate(
        PopulationEvaluator(torch.zeros(1 << 20), mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", threads=1),
        theta,
        None,
        np.tile(np.array([1.0, -1.0], dtype=np.float32), 32),
        0.3,
        images,
        0,
    )
    assert np.array_equal(whole[2], one[2])
    batched = kinds.Activity(layer=1).evaluate(
        PopulationEvaluator(
            torch.zeros(1 << 20), mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", batched=True
        ),
        theta,
        None,
        np.tile(np.array([1.0, -1.0], dtype=np.float32), 32),
        0.3,
        images,
        0,
    )
    assert np.allclose(batched[2], whole[2], rtol=1e-4, atol=1e-5)  # the GPU's path, in larger chunks
