"""ES math: centered ranks, the gradient estimate from noise slices, schedules, Adam's sign."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from es_service import plan as planning
from es_service import strategy
from es_workers import kinds, members, network, noise


def test_centered_ranks_span_and_order():
    shaped = strategy.centered_ranks(np.array([3.0, -1.0, 10.0, 0.5]))
    assert shaped.tolist() == pytest.approx([1 / 6, -0.5, 0.5, -1 / 6])
    assert shaped.sum() == pytest.approx(0.0)


def test_nonfinite_fitness_ranks_worst():
    shaped = strategy.centered_ranks(np.array([np.nan, 1.0, -np.inf, np.inf, 0.0]))
    assert shaped[1] == 0.5  # the best finite member
    assert max(shaped[0], shaped[2], shaped[3]) < shaped[4]  # every non-finite ranks below all finite


def test_slice_weights_antithetic_pairs():
    shaped = np.array([0.5, -0.5, 0.1, 0.2])
    assert strategy.slice_weights(shaped, antithetic=True).tolist() == pytest.approx([1.0, -0.1])
    assert strategy.slice_weights(shaped, antithetic=False) is shaped


def test_grad_estimate_equals_explicit_sum():
    table = noise.make_table(0, network.NUM_PARAMS + 5000)
    offsets = np.array([0, 17, 4999, 17, 3], dtype=np.int64)
    weights = np.array([0.5, -0.25, 0.125, 1.0, -1.0])
    got = kinds.Whole().estimate(table, offsets, weights, 0.1, 10, None)
    expected = sum(w * table[o : o + network.NUM_PARAMS].double() for w, o in zip(weights, offsets)) / (10 * 0.1)
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_noise_windows_are_zero_copy_slices():
    table = noise.make_table(1, network.NUM_PARAMS + 10)
    view = noise.windows(table, network.NUM_PARAMS)
    assert view.data_ptr() == table.data_ptr() and view.shape == (11, network.NUM_PARAMS)
    assert torch.equal(view[7], table[7 : 7 + network.NUM_PARAMS])
    assert torch.equal(noise.make_table(1, 100), noise.make_table(1, 100))


def test_sign_convention_on_a_quadratic():
    """Fitness F(theta) = -|theta[:k] - target|^2 is maximised: ES + Adam must move theta[:k] to target."""
    n, k = network.NUM_PARAMS, 10
    table = noise.make_table(2, n + 100_000)
    target = torch.ones(k)
    adam = strategy.AdamES(torch.zeros(n), learning_rate=0.05, weight_decay=0.0)
    rng = np.random.default_rng(0)
    start = float(torch.linalg.vector_norm(adam.theta.detach()[:k] - target))
    for _ in range(30):
        offsets = rng.integers(0, 100_001, size=8)
        fitness = []
        for offset in offsets:
            eps = table[offset : offset + k]
            for sign in (1.0, -1.0):
                fitness.append(-float(((adam.theta.detach()[:k] + sign * 0.1 * eps - target) ** 2).sum()))
        weights = strategy.slice_weights(strategy.centered_ranks(np.array(fitness)), antithetic=True)
        grad = kinds.Whole().estimate(table, offsets, weights, 0.1, 16, None)
        assert float(grad[:k] @ (target - adam.theta.detach()[:k])) > 0  # an ascent direction
        adam.step(grad, 0.05)
    assert float(torch.linalg.vector_norm(adam.theta.detach()[:k] - target)) < 0.7 * start


def test_weight_decay_shrinks_theta_when_gradient_is_zero():
    adam = strategy.AdamES(torch.full((4,), 2.0), learning_rate=0.1, weight_decay=0.5)
    adam.step(torch.zeros(4), 0.1)
    assert (adam.theta.detach() < 2.0).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_move_from_start_to_final(schedule):
    assert planning.scheduled(1.0, 0.1, 0.0, schedule) == pytest.approx(1.0)
    assert planning.scheduled(1.0, 0.1, 1.0, schedule) == pytest.approx(0.1)
    assert 0.1 < planning.scheduled(1.0, 0.1, 0.5, schedule) < 1.0
    assert planning.scheduled(1.0, None, 0.7, schedule) == 1.0


def test_decoupled_weight_decay_is_adamw():
    theta = torch.full((4,), 2.0)
    adam = strategy.AdamES(theta, learning_rate=0.1, weight_decay=0.5, decoupled=True)
    reference = torch.nn.Parameter(theta.clone())
    adamw = torch.optim.AdamW([reference], lr=0.1, weight_decay=0.5)
    grad = torch.tensor([1.0, -1.0, 0.5, 0.0])
    adam.step(grad, 0.1)
    reference.grad = -grad
    adamw.step()
    assert torch.equal(adam.theta.detach(), reference.detach())
    assert isinstance(adam.optimizer, torch.optim.AdamW)


def test_adam_betas_come_from_the_config():
    from es_service.config import ESConfig

    theta = torch.linspace(-1.0, 1.0, 6)
    grads = [torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0]) * k for k in (1.0, -0.5, 2.0)]
    results = {}
    for beta1 in (0.9, 0.99):
        adam = strategy.AdamES.from_config(theta, ESConfig(learning_rate=0.1, adam_beta1=beta1, adam_beta2=0.95))
        reference = torch.nn.Parameter(theta.clone())
        torch_adam = torch.optim.Adam([reference], lr=0.1, betas=(beta1, 0.95))
        for grad in grads:
            adam.step(grad, 0.1)
            reference.grad = -grad
            torch_adam.step()
        assert torch.equal(adam.theta.detach(), reference.detach())
        results[beta1] = adam.theta.detach()
    assert not torch.equal(results[0.9], results[0.99])


def test_weight_norm_cap_scales_big_matrices_back_and_leaves_the_rest():
    theta = network.init_theta(3)
    w1, b1, w2, b2, w3, b3 = network.unflatten(theta)
    w1.mul_(3.0)  # far above 1.5 x its init norm sqrt(2 * 512) = 32
    b1.fill_(7.0)  # biases are never capped
    kept = theta.clone()
    adam = strategy.AdamES(theta, learning_rate=0.01, weight_decay=0.0, weight_norm_cap=1.5)
    adam.step(torch.zeros(network.NUM_PARAMS), 0.0)  # a zero step: only the cap acts
    capped = network.unflatten(adam.theta.detach())
    assert float(torch.linalg.vector_norm(capped[0])) == pytest.approx(1.5 * 32.0, rel=1e-5)
    assert torch.allclose(capped[0], network.unflatten(kept)[0] * (1.5 * 32.0 / float(w1.norm())), rtol=1e-5)
    for index in (1, 2, 3, 4, 5):  # W2 and W3 start near their init norms, below 1.5x: untouched
        assert torch.equal(capped[index], network.unflatten(kept)[index])


def test_weight_norm_cap_does_not_depend_on_the_thread_count():
    theta = network.init_theta(4) * 2.0
    results = []
    for threads in (1, 2):
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            copy = theta.clone()
            strategy.cap_weight_norms(copy, 1.0)
            results.append(copy)
        finally:
            torch.set_num_threads(saved)
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], theta)


def test_normalized_shaping_keeps_differences_and_puts_nonfinite_last():
    shaped = strategy.shape_fitness(np.array([1.0, 3.0, -np.inf, 2.0, np.nan]), "normalized")
    assert abs(shaped.mean()) < 1e-12 and abs(shaped.std() - 1.0) < 1e-12
    assert shaped[2] == shaped[4] == shaped.min() and shaped[1] == shaped.max()
    # unlike ranks, the size of a difference survives: 1 -> 2 is half of 1 -> 3
    assert np.isclose(shaped[3] - shaped[0], (shaped[1] - shaped[0]) / 2)
    assert np.array_equal(strategy.shape_fitness(np.full(4, 2.5), "normalized"), np.zeros(4))
    assert np.array_equal(strategy.shape_fitness(np.full(3, np.nan), "normalized"), np.zeros(3))
    with pytest.raises(ValueError, match="allowed: centered_rank, normalized"):
        strategy.shape_fitness(np.zeros(2), "softmax")


@pytest.mark.parametrize("rank", [1, 4])
def test_low_rank_grad_estimate_equals_the_sum_of_dense_perturbations(rank):
    table = noise.make_table(2, network.NUM_PARAMS + 5000)
    offsets = np.array([0, 17, 4999, 17, 3], dtype=np.int64)
    weights = np.array([0.5, -0.25, 0.125, 1.0, -1.0])
    got = kinds.whole_kind(rank).estimate(table, offsets, weights, 0.1, 10, None)
    length = members.noise_length(rank)
    expected = sum(w * members.low_rank_dense(table[o : o + length].double(), rank) for w, o in zip(weights, offsets))
    assert torch.allclose(got.double(), expected / (10 * 0.1), atol=1e-5)


def test_low_rank_estimate_is_a_gradient_on_average():
    """E[(a^T G b) a b^T] = G for independent standard normal a, b: over many rank-1 slices the estimate of
    a linear fitness <G, theta> points along G (the same property the full-rank estimate has)."""
    table = noise.make_table(3, 1 << 22)
    target = torch.randn(network.NUM_PARAMS, generator=torch.Generator().manual_seed(4))
    rng = np.random.default_rng(5)
    offsets = rng.integers(0, noise.max_offset(table.numel(), network.NUM_PARAMS) + 1, size=4000)
    rows = noise.windows(table, network.NUM_PARAMS)[:, : members.noise_length(1)].index_select(
        0, torch.as_tensor(offsets)
    )
    # F(+) - F(-) over 2 sigma, one slice at a time: stacked, the 4,000 dense perturbations would take 10.7 GB
    slopes = torch.tensor([float(members.low_rank_dense(row, 1) @ target) for row in rows])
    got = kinds.LowRank(rank=1).estimate(table, offsets, slopes.numpy(), 1.0, len(offsets), None)
    cosine = float(torch.nn.functional.cosine_similarity(got, target, dim=0))
    assert cosine > 0.5 * (len(offsets) / network.NUM_PARAMS) ** 0.5  # chance is ~0; the expected value ~0.077


def test_low_rank_estimate_does_not_depend_on_the_thread_count():
    """From 256 slices on, MKL's two-thread GEMM of the stacked factors gave other bits than one thread
    (a driver on 2 cores and one on 16 would walk different thetas): the estimate runs single-threaded."""
    table = noise.make_table(1, 1 << 22)
    rng = np.random.default_rng(0)
    offsets = rng.integers(0, noise.max_offset(table.numel(), network.NUM_PARAMS) + 1, size=512)
    weights = rng.standard_normal(512)
    saved = torch.get_num_threads()
    try:
        estimates = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            estimates.append(kinds.LowRank(rank=1).estimate(table, offsets, weights, 0.02, 1024, None))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(estimates[0], estimates[1])
