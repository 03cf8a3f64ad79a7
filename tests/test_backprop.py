"""The backprop row's two gradients: autograd through the flushes, and the seed's straight-through one."""

from __future__ import annotations

import pytest
import torch

from es_service.backprop import logits_fn
from es_workers import network


def _theta_with_biases(seed: int = 0) -> torch.Tensor:
    """The init theta with nonzero biases, so every epilogue's flushes (and its bias paths) are exercised."""
    theta = network.init_theta(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for view, (name, _) in zip(network.unflatten(theta), network.PARAM_SHAPES):
        if name.startswith("b"):
            view.copy_(torch.randn(view.shape, generator=generator) * 0.5)
    return theta


def _loss_and_grads(theta, x, y, gradient, arithmetic="tf-ftz"):
    theta = theta.clone().requires_grad_(True)
    logits = logits_fn(arithmetic, gradient)(x, network.unflatten(theta))
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    return logits.detach(), network.unflatten(theta.grad)


@pytest.fixture(scope="module")
def batch(mnist):
    return mnist.train_images[:256].reshape(-1, 784).float() / 255.0, mnist.train_labels[:256]


def test_straight_through_logits_are_the_flushing_forward_bit_for_bit(batch):
    x, y = batch
    for theta in (network.init_theta(0), _theta_with_biases()):
        logits, _ = _loss_and_grads(theta, x, y, "straight-through")
        expected = network.forward(x, network.unflatten(theta), "tf-ftz")
        assert torch.equal(logits, expected)
        assert (expected == 0).any()  # the flushes do act on this batch


def test_straight_through_gradient_is_the_linear_networks_at_the_flushed_activations(batch):
    x, y = batch
    theta = _theta_with_biases()
    logits, grads = _loss_and_grads(theta, x, y, "straight-through")
    w1, b1, w2, b2, w3, b3 = network.unflatten(theta)
    ops = network.epilogues("tf-ftz")
    h2 = ops.hidden2(ops.hidden1(x @ w1, b1) @ w2, b2)  # flushed activations, scaled frame
    delta = (torch.softmax(logits, dim=-1) - torch.nn.functional.one_hot(y, 10)) / len(y)
    torch.testing.assert_close(grads[4], h2.T @ delta)  # no mask: the logits' flushes pass the gradient
    torch.testing.assert_close(grads[5], delta.sum(0))


def test_masked_gradient_leaves_a_zero_bias_where_straight_through_moves_it(batch):
    x, y = batch
    theta = network.init_theta(0)  # biases exactly 0: flush(0) is the constant 0, with no gradient
    _, masked = _loss_and_grads(theta, x, y, "masked")
    _, straight = _loss_and_grads(theta, x, y, "straight-through")
    for index in (1, 3, 5):
        assert not masked[index].any()
        assert straight[index].any()
    assert not torch.equal(masked[0], straight[0])  # the masked W1 gradient skips the flushed units


def test_linear_arithmetic_has_one_gradient(batch):
    x, y = batch
    theta = _theta_with_biases()
    _, masked = _loss_and_grads(theta, x, y, "masked", "linear")
    _, straight = _loss_and_grads(theta, x, y, "straight-through", "linear")
    assert all(torch.equal(a, b) for a, b in zip(masked, straight))


def test_unknown_gradient_is_refused():
    with pytest.raises(ValueError, match="allowed: masked, straight-through"):
        logits_fn("tf-ftz", "sign")
