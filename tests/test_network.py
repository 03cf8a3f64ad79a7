"""The network's arithmetic: the seed's FTZ examples exactly, the scaled frame against the literal
native formula, and the nonlinearity at initialisation on real MNIST."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from es_workers import members, network
from es_workers.network import MIN_NORMAL, SCALE, flush

m = torch.tensor(MIN_NORMAL, dtype=torch.float32)


def ftz_add(a, b):
    return flush(flush(a) + flush(b))


def ftz_mul(a, b):
    return flush(flush(a) * flush(b))


def test_seed_example_distributivity_fails_under_ftz():
    c = 1 / m  # 2**126, exact
    a = torch.tensor(1.9, dtype=torch.float32) * m  # normal
    b = -1.0 * m
    assert flush(a) == a and flush(b) == b  # both inputs survive
    assert ftz_mul(ftz_add(a, b), c) == 0.0  # a + b = 0.9 m is denormal: flushed
    expected = torch.tensor(1.9, dtype=torch.float32) - 1.0  # float32 0.9000001
    assert ftz_add(ftz_mul(a, c), ftz_mul(b, c)) == expected
    assert abs(float(expected) - 0.9) < 1e-6


def test_seed_example_associativity_fails_under_ftz():
    a, b, c = 1.5 * m, -1.0 * m, 1.0 * m
    left = ftz_add(ftz_add(a, b), c)  # (a + b) = 0.5 m flushed, then + c = m
    right = ftz_add(ftz_add(b, c), a)  # (b + c) = 0, then + a = 1.5 m
    assert left == m and right == 1.5 * m and left != right
    assert (a + b) + c == (b + c) + a  # with denormals kept, both are 1.5 m


def test_flush_keeps_normals_inf_nan_and_zeroes_denormals():
    x = torch.tensor([MIN_NORMAL, MIN_NORMAL / 2, -MIN_NORMAL / 4, 2.0**-149, 1.0, float("inf"), -float("inf")])
    assert flush(x).tolist() == [MIN_NORMAL, 0.0, 0.0, 0.0, 1.0, float("inf"), -float("inf")]
    assert torch.isnan(flush(torch.tensor([float("nan")]))).all()


def test_flush_divide_is_exactly_native_divide_then_flush():
    boundary = torch.tensor([0.5, 0.5 - 2**-26, 0.5 - 2**-25, 0.5 - 3 * 2**-26, 0.25, 0.0, 2.0**-126, 3.0])
    spread = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    spread = spread * torch.exp2(torch.randint(-40, 4, (200_000,), generator=torch.Generator().manual_seed(1)).float())
    values = torch.cat([boundary, -boundary, spread])
    native = flush(flush(values) / SCALE) * SCALE
    assert torch.equal(network.flush_divide(values), native)
    # the two floats just below 0.5 round up to 2**-126 natively and survive the flush
    assert network.flush_divide(torch.tensor([0.5 - 2**-26])).item() == 0.5


def test_layout_and_init():
    assert network.NUM_PARAMS == 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    theta = network.init_theta(0)
    assert theta.dtype == torch.float32 and torch.equal(theta, network.init_theta(0))
    w1, b1, w2, b2, w3, b3 = network.unflatten(theta)
    assert w1.shape == (784, 512) and w3.shape == (512, 10)
    assert float(w1.std()) == pytest.approx((2 / 784) ** 0.5, rel=0.02)
    assert float(w2.std()) == pytest.approx((2 / 512) ** 0.5, rel=0.02)
    assert not b1.any() and not b2.any() and not b3.any()
    assert not torch.equal(theta, network.init_theta(1))


def _test_images(mnist, count):
    return mnist.test_images[:count].reshape(-1, 784).float() / 255.0


def test_tf_ftz_is_nonlinear_and_linear_is_exact_at_init(mnist):
    params = network.unflatten(network.init_theta(0))
    x = mnist.test_images.reshape(-1, 784).float() / 255.0
    exact = network.exact_linear_logits(x, params).argmax(dim=1)
    ftz = network.forward(x, params, "tf-ftz")
    linear = network.forward(x, params, "linear")
    ftz_agree = float((ftz.argmax(dim=1) == exact).float().mean())
    assert ftz_agree < 0.8, ftz_agree  # ~45% measured with the native formula (docs/design.md)
    assert float((ftz == 0).float().mean()) > 0.2  # many logits flushed to exactly 0
    assert torch.equal(linear.argmax(dim=1), exact)  # the control is a linear map: agrees on all 10,000


def test_scaled_frame_matches_native_formula(mnist):
    """``forward`` differs from the literal formula only in denormal rounding inside matmuls."""
    torch.manual_seed(0)
    theta = network.init_theta(0) + 0.01 * torch.randn(network.NUM_PARAMS)
    params = network.unflatten(theta)
    x = _test_images(mnist, 1000)
    fast, native = network.forward(x, params, "tf-ftz"), network.forward_native(x, params, "tf-ftz")
    assert float((fast.argmax(1) == native.argmax(1)).float().mean()) >= 0.999
    assert float(((fast == 0) == (native == 0)).float().mean()) > 0.99
    # with no matmul denormals involved (first layer + linear mode) they are bitwise equal
    assert torch.equal(
        network.forward(x, params, "linear").argmax(1), network.forward_native(x, params, "linear").argmax(1)
    )


def test_batched_forward_equals_member_forward():
    torch.manual_seed(1)
    thetas = network.init_theta(0) + 0.02 * torch.randn(3, network.NUM_PARAMS)
    x = torch.rand(16, 784)
    batched = network.forward(x, network.unflatten(thetas), "tf-ftz")
    single = torch.stack([network.forward(x, network.unflatten(t), "tf-ftz") for t in thetas])
    assert torch.equal(batched, single)


CPU_FTZ_SCRIPT = """
import torch
from es_workers.evaluator import set_process_arithmetic
set_process_arithmetic("cpu-ftz")
tiny = torch.tensor([2.0**-126]) / 4
print(float(tiny[0]), float((torch.tensor([3.0 * 2**-127]) + torch.tensor([-2.0**-126]))[0]))
"""


def test_cpu_ftz_flag_flushes_in_its_own_process():
    out = subprocess.run([sys.executable, "-c", CPU_FTZ_SCRIPT], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0.0", "0.0"]
    assert float(torch.tensor([2.0**-126]) / 4) > 0  # this process keeps denormals


def test_unknown_arithmetic_is_refused():
    with pytest.raises(ValueError, match="unknown arithmetic"):
        network.forward(torch.zeros(1, 784), network.unflatten(network.init_theta(0)), "bf16")


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("arithmetic", ["tf-ftz", "linear"])
def test_low_rank_member_is_the_dense_member_up_to_matmul_rounding(mnist, arithmetic, rank):
    """A low-rank member computed as x W + ((x A) c) B^T is the network at theta + scale * dense(noise):
    the same function, the matmuls only rounded differently (never bitwise: the sums are reordered)."""
    torch.manual_seed(2)
    theta = network.init_theta(0)
    noise_rows = torch.randn(3, members.noise_length(rank))
    scales = torch.tensor([0.05, -0.05, 0.02])
    x = _test_images(mnist, 500)
    xw1 = x @ network.unflatten(theta)[0]
    batched = members.low_rank_forward(x, xw1, theta, noise_rows, scales, rank, arithmetic)
    for j in range(3):
        dense = network.forward(
            x, network.unflatten(theta + scales[j] * members.low_rank_dense(noise_rows[j], rank)), arithmetic
        )
        single = members.low_rank_forward(x, xw1, theta, noise_rows[j], scales[j], rank, arithmetic)
        # a rounding difference next to a flush threshold flips that one flush: compare almost all logits
        for other in (dense, batched[j]):
            assert float(torch.isclose(single, other, rtol=1e-4, atol=1e-4).float().mean()) >= 0.99
            assert float((single.argmax(1) == other.argmax(1)).float().mean()) >= 0.998
    assert not torch.equal(batched[0], batched[1])  # members really differ


def test_low_rank_layout():
    assert members.noise_length(0) == network.NUM_PARAMS
    assert members.noise_length(1) == (784 + 512 + 512) + (512 + 512 + 512) + (512 + 10 + 10) == 3876
    noise_slice = torch.arange(members.noise_length(2), dtype=torch.float32)
    (a1, b1, e1), _, (a3, b3, e3) = members.low_rank_factors(noise_slice, 2)
    assert a1.shape == (784, 2) and b1.shape == (512, 2) and e1.shape == (512,) and b3.shape == (10, 2)
    assert a1[0, 1] == 1 and b1[0, 0] == 784 * 2 and e3[-1] == members.noise_length(2) - 1  # contiguous, in order
    dense = members.low_rank_dense(noise_slice, 2)
    w1, bias1 = network.unflatten(dense)[:2]
    assert torch.equal(bias1, e1) and torch.allclose(w1, a1 @ b1.T / 2**0.5)


@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_fused_epilogues_are_bitwise_equal_to_eager(mnist, rank):
    theta = network.init_theta(0)
    noise_rows = torch.randn(2, members.noise_length(rank), generator=torch.Generator().manual_seed(3))
    x = _test_images(mnist, 64)
    xw1 = x @ network.unflatten(theta)[0]
    scales = torch.tensor([0.02, -0.02])
    for rows, s in ((noise_rows, scales), (noise_rows[1], scales[1])):
        eager = members.low_rank_forward(x, xw1, theta, rows, s, rank, "tf-ftz")
        assert torch.equal(members.low_rank_forward(x, xw1, theta, rows, s, rank, "tf-ftz", fused=True), eager)


def test_low_rank_refuses_cpu_ftz():
    with pytest.raises(ValueError, match="scaled frame"):
        members.low_rank_forward(
            torch.zeros(1, 784),
            torch.zeros(1, 512),
            network.init_theta(0),
            torch.zeros(members.noise_length(1)),
            torch.tensor(0.1),
            1,
            "cpu-ftz",
        )


def _shared_members(mnist, count=3, seed=4):
    torch.manual_seed(seed)
    theta = network.init_theta(0)
    noise_rows = torch.randn(count, network.NUM_PARAMS)
    x = _test_images(mnist, 256)
    xw1 = x @ network.unflatten(theta)[0]
    return theta, noise_rows, x, xw1


@pytest.mark.parametrize("arithmetic", ["tf-ftz", "linear"])
def test_shared_first_layer_member_is_the_dense_member_up_to_matmul_rounding(mnist, arithmetic):
    """x W1 + scale * (x E1) is x (W1 + scale * E1) with the first layer's sums rounded differently."""
    theta, noise_rows, x, xw1 = _shared_members(mnist)
    scales = torch.tensor([0.05, -0.05, 0.02])
    xe1 = torch.stack([x @ members.first_layer_noise(row) for row in noise_rows])
    tails = members.perturb(theta[network.W1_SIZE :], noise_rows[:, network.W1_SIZE :], scales[:, None])
    batched = members.shared_first_layer_forward(xw1, xe1, tails, scales, arithmetic)
    for j in range(3):
        dense = network.forward(x, network.unflatten(members.perturb(theta, noise_rows[j], scales[j])), arithmetic)
        single = members.shared_first_layer_member(xw1, xe1[j], theta, noise_rows[j], scales[j], arithmetic)
        assert not torch.equal(single, dense)  # really another rounding, not the dense path in disguise
        for other in (dense, batched[j]):
            assert float(torch.isclose(single, other, rtol=1e-4, atol=1e-4).float().mean()) >= 0.99
            assert float((single.argmax(1) == other.argmax(1)).float().mean()) >= 0.998


def test_shared_first_layer_fused_is_bitwise_equal_to_eager(mnist):
    theta, noise_rows, x, xw1 = _shared_members(mnist, count=2, seed=5)
    scales = torch.tensor([0.02, -0.02])
    xe1 = x @ members.first_layer_noise(noise_rows[0])
    for j in range(2):  # one slice, both signs: the antithetic pair sharing x E1
        eager = members.shared_first_layer_member(xw1, xe1, theta, noise_rows[0], scales[j], "tf-ftz")
        fused = members.shared_first_layer_member(xw1, xe1, theta, noise_rows[0], scales[j], "tf-ftz", fused=True)
        assert torch.equal(fused, eager)
    tails = members.perturb(theta[network.W1_SIZE :], noise_rows[:, network.W1_SIZE :], scales[:, None])
    pair = xe1.expand(2, -1, -1)
    assert torch.equal(
        members.shared_first_layer_forward(xw1, pair, tails, scales, "tf-ftz", fused=True),
        members.shared_first_layer_forward(xw1, pair, tails, scales, "tf-ftz"),
    )


def test_shared_first_layer_refuses_cpu_ftz_and_unflatten_checks_the_tail():
    with pytest.raises(ValueError, match="scaled frame"):
        members.shared_first_layer_forward(
            torch.zeros(1, 512),
            torch.zeros(1, 512),
            torch.zeros(network.NUM_PARAMS - network.W1_SIZE),
            torch.tensor(0.1),
            "cpu-ftz",
        )
    tail = torch.arange(network.NUM_PARAMS - network.W1_SIZE, dtype=torch.float32)
    b1, w2, _, _, b3 = network.unflatten(tail, first=1)
    assert b1.shape == (512,) and w2.shape == (512, 512) and w2[0, 0] == 512 and b3[-1] == tail[-1]
    with pytest.raises(ValueError, match="expected 268298 parameters"):
        network.unflatten(torch.zeros(network.NUM_PARAMS), first=1)
