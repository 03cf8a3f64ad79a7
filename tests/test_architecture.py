"""The seed network's shape as its config: other hidden widths and another scale exponent, through
every member kind, the epilogues, a run, its checkpoint and its resume."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import es_service
from es_service import checkpoint
from es_service.backprop import train_backprop
from es_service.config import ConfigError, from_dict
from es_service.runner import evaluate_checkpoint
from es_workers import kinds, network, noise
from es_workers.architecture import Architecture
from es_workers.evaluator import PopulationEvaluator

SMALL = Architecture((784, 40, 24, 10), 120)


def test_the_seed_architecture_is_the_networks_constants():
    assert network.SEED == Architecture((784, 512, 512, 10), 125)
    assert (network.NUM_PARAMS, network.W1_SIZE, network.OUTPUT_LAYER_SIZE) == (669_706, 401_408, 5_130)
    assert SMALL.num_params == 784 * 40 + 40 + 40 * 24 + 24 + 24 * 10 + 10
    assert [name for name, _ in SMALL.param_shapes] == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert network.init_theta(3, SMALL).shape == (SMALL.num_params,)


@pytest.mark.parametrize("bad", [((784, 512, 10), 125), ((784, 0, 512, 10), 125), ((784, 512, 512, 10), 128)])
def test_an_architecture_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="layer sizes|scale exponent"):
        Architecture(*bad)


@pytest.mark.parametrize("exponent", [1, 64, 100, 120, 125, 127])
def test_flush_divide_is_the_native_divide_then_flush_at_every_exponent(exponent):
    """The scaled frame's thresholds move with the exponent: exactly flush(flush(x) / s) * s."""
    threshold = 2.0 ** (exponent - 126)
    steps = [0.0, 2.0**-26, 2.0**-25, 3 * 2.0**-26, 2.0**-24, 0.5]
    boundary = torch.tensor([threshold * (1 - step) for step in steps] + [0.0, 3.0 * threshold], dtype=torch.float32)
    generator = torch.Generator().manual_seed(exponent)
    spread = torch.randn(100_000, generator=generator) * threshold
    spread = spread * torch.exp2(torch.randint(-30, 4, (100_000,), generator=generator).float())
    values = torch.cat([boundary, -boundary, spread])
    scale = 2.0**exponent
    native = network.flush(network.flush(values) / scale) * scale
    assert torch.equal(network.flush_divide(values, exponent), native)


def test_the_linear_network_is_the_same_at_every_exponent(mnist):
    """Without flushes the scale cancels: h1 = (x W1 + b1) / s, h2 = h1 W2 + b2 / s, o = (h2 W3 + b3 / s) s
    is x W1 W2 W3 + ...; the scaled frame computes it without s at all, so every exponent's bits agree,
    and the exact float64 map agrees with them up to rounding."""
    x = mnist.test_images[:64].reshape(-1, 784).float() / 255.0
    params = network.unflatten(network.init_theta(1, SMALL), arch=SMALL)
    logits = [network.forward(x, params, "linear", arch=Architecture(SMALL.layer_sizes, e)) for e in (1, 120, 127)]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[1], logits[2])
    exact = network.exact_linear_logits(x, params, SMALL)
    assert torch.allclose(logits[0].double(), exact, rtol=1e-4, atol=1e-4)


def _members(pairs: int, length: int, table_size: int):
    offsets = np.random.default_rng(5).integers(0, table_size - length, size=pairs)
    return offsets, np.repeat(offsets, 2), np.tile(np.array([1.0, -1.0], dtype=np.float32), pairs)


@pytest.mark.parametrize(
    "kind",
    [
        kinds.Whole(arch=SMALL),
        kinds.LowRank(rank=2, arch=SMALL),
        kinds.SharedFirstLayer(arch=SMALL),
        kinds.LayerRank1(layer=1, arch=SMALL),
        kinds.LayerRank1(layer=2, arch=SMALL),
        kinds.Unit(layer=1, arch=SMALL),
        kinds.Unit(layer=2, arch=SMALL),
        kinds.Output(arch=SMALL),
    ],
    ids=lambda kind: f"{type(kind).__name__}{kind.layer or ''}",
)
def test_every_kind_of_another_architecture_is_the_native_formula(mnist, kind):
    """Each member's loss, as its kind evaluates it in the scaled frame, is the seed's formula at native
    scale (network.forward_native) for theta moved by the member's move (what its estimate adds up), at
    this architecture's widths and exponent, up to the matmuls' rounding."""
    table = noise.make_table(11, 1 << 18)
    evaluator = PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", arch=SMALL)
    theta, sigma = network.init_theta(2, SMALL), 0.05
    pairs, images = 3, np.arange(100, 132, dtype=np.int64)
    slices, offsets, signs = _members(pairs, kind.noise_length(), table.shape[0])
    losses, _ = kind.evaluate(evaluator, theta, offsets, signs, sigma, images)
    x, y = evaluator.batch(images)
    start, stop = kind.param_range
    center = kinds.Center(theta, arch=SMALL)

    def reference(exponent: int) -> np.ndarray:
        arch = Architecture(SMALL.layer_sizes, exponent)
        expected = []
        for pair in range(pairs):
            move = kind.estimate(table, slices, np.eye(pairs)[pair], 1.0, 1, center)
            for sign in (1.0, -1.0):
                moved = theta.clone()
                moved[start:stop] += sign * sigma * move
                logits = network.forward_native(x, network.unflatten(moved, arch=arch), "tf-ftz", arch)
                expected.append(float(torch.nn.functional.cross_entropy(logits.double(), y, reduction="sum")))
        return np.array(expected)

    assert np.allclose(losses, reference(SMALL.scale_exponent), rtol=1e-5, atol=1e-5)
    assert not np.allclose(losses, reference(125), rtol=1e-3)  # the exponent is the network's, not the seed's


def test_activity_members_of_another_architecture_cover_every_unit(mnist):
    evaluator = PopulationEvaluator(
        noise.make_table(1, 1 << 16), mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", arch=SMALL
    )
    theta, images = network.init_theta(2, SMALL), np.arange(64, dtype=np.int64)
    for layer in (1, 2, 3):
        count = 2 * SMALL.units(layer)
        signs = np.tile(np.array([1.0, -1.0], dtype=np.float32), count // 2)
        losses, _, per_image = kinds.Activity(layer=layer, arch=SMALL).evaluate(
            evaluator, theta, None, signs, 1e-3, images
        )
        assert per_image.shape == (count, len(images)) and np.isfinite(per_image).all()


def test_an_evaluator_refuses_a_tile_of_another_architecture(mnist):
    from es_workers.evaluator import TileTask

    evaluator = PopulationEvaluator(noise.make_table(1, 1 << 20), mnist.train_images, mnist.train_labels, "tf-ftz")
    task = TileTask(
        0, 0, np.array([1, 1]), np.array([1.0, -1.0], np.float32), 0.1, np.arange(4), kinds.Whole(arch=SMALL)
    )
    with pytest.raises(ValueError, match="evaluator of"):
        evaluator.run_tile(network.init_theta(0), task)


def small_config(tmp_path, **changes) -> dict:
    config = {
        "seed": 4,
        "generations": 6,
        "network": {"layer_sizes": [784, 40, 24, 10], "scale_exponent": 120},
        "es": {"pop_size": 16, "batch_size": 64, "noise_std": 0.05, "learning_rate": 0.01, "w3": {"pop_size": 8}},
        "noise": {"table_size": 1 << 18},
        "workers": {"executor": "local", "fused": False},
        "eval": {"every": 3, "train_size": 1000},
        "checkpoint": {"every": 2},
    }
    config.update(changes)
    return config


def test_a_run_of_another_architecture_trains_checkpoints_and_resumes(tmp_path, monkeypatch):
    config = from_dict(small_config(tmp_path))
    whole = es_service.train(config, run_dir=tmp_path / "whole")
    state = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    assert state["theta"].shape == (SMALL.num_params,) and whole["generation"] == 6
    assert state["layout"][0] == ["W1", [784, 40]]
    es_service.train(config, run_dir=tmp_path / "parts", stop_after=3)
    es_service.resume(tmp_path / "parts")
    resumed = checkpoint.load(tmp_path / "parts" / "checkpoint.pt")["theta"]
    assert torch.equal(resumed, state["theta"])
    evaluated = evaluate_checkpoint(tmp_path / "whole" / "checkpoint.pt", device="cpu")  # `es-service eval`
    assert evaluated["test_accuracy"] == whole["test_accuracy"]


def test_backprop_trains_another_architecture(tmp_path, mnist):
    """The warm start's backprop builds the configured network: its autograd sees the widths and the
    exponent (a masked gradient through flushes at 2**-120)."""
    data = dataclasses.replace(mnist, train_images=mnist.train_images[:2000], train_labels=mnist.train_labels[:2000])
    record = train_backprop(from_dict(small_config(tmp_path)), tmp_path, data, "cpu", epochs=1, batch_size=100)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["theta"].shape == (SMALL.num_params,) and record["test_accuracy"] > 0.5


def test_the_seed_configs_digest_does_not_name_the_new_fields():
    seed = from_dict({})
    assert seed.digest() == from_dict({"network": {"layer_sizes": [784, 512, 512, 10], "scale_exponent": 125}}).digest()
    assert seed.digest() != from_dict({"network": {"scale_exponent": 124}}).digest()
    assert seed.digest() != from_dict({"network": {"layer_sizes": [784, 512, 256, 10]}}).digest()


@pytest.mark.parametrize(
    "network_section, message",
    [
        ({"layer_sizes": [784, 512, 10]}, r"network.layer_sizes: \[784, 512, 10\]; use \[784, H1, H2, 10\]"),
        ({"layer_sizes": [785, 512, 512, 10]}, "MNIST's pixels"),
        ({"layer_sizes": [784, 512, 512, 9]}, "10 classes"),
        ({"scale_exponent": 0}, "network.scale_exponent: 0; use an integer from 1 to 127"),
    ],
)
def test_a_network_section_out_of_range_is_refused_in_one_line(network_section, message):
    with pytest.raises(ConfigError, match=message) as refused:
        from_dict({"network": network_section})
    assert "\n" not in str(refused.value)


def test_a_table_too_small_for_the_configured_widths_is_refused():
    with pytest.raises(
        ConfigError, match=r"noise.table_size: 1500000; must exceed the parameter count 1863690 of network.layer_sizes"
    ):
        from_dict({"network": {"layer_sizes": [784, 1024, 1024, 10]}, "noise": {"table_size": 1_500_000}})
    from_dict({"network": {"layer_sizes": [784, 64, 64, 10]}, "noise": {"table_size": 100_000}})


def test_activity_members_count_the_configured_units():
    with pytest.raises(ConfigError, match="es.w2.pop_size: 1024 .* set es.w2.pop_size: 48"):
        from_dict({"network": {"layer_sizes": [784, 40, 24, 10]}, "es": {"w2": {"pop_size": 1024, "kind": "activity"}}})


@pytest.mark.ray
def test_a_run_of_another_architecture_gives_the_in_process_theta_on_ray(tmp_path, ray_cluster):
    """Ray's workers rebuild the network from the problem they are sent (its widths and exponent), and
    with replay step their replica of theta with the configured optimizer: theta bit for bit (replay
    covers what broadcast does, and the replicas' update)."""
    local = es_service.train(from_dict(small_config(tmp_path, generations=4)), run_dir=tmp_path / "local")
    workers = {"executor": "ray", "fused": False, "count": 2, "theta_sync": "replay"}
    on_ray = es_service.train(
        from_dict(small_config(tmp_path, generations=4, workers=workers)), run_dir=tmp_path / "ray"
    )
    assert local["generation"] == on_ray["generation"] == 4
    theta = [checkpoint.load(tmp_path / name / "checkpoint.pt")["theta"] for name in ("local", "ray")]
    assert torch.equal(*theta)
