"""benchmarks/diagnostics.py: the estimate's alignment with the masked gradient, and weight displacement."""

from __future__ import annotations

import dataclasses
import json

import torch

from benchmarks import diagnostics
from es_service import plan as planning
from es_workers import network
from tests.helpers import tiny_config


def test_block_cosines_are_one_for_minus_the_gradient_and_skip_empty_blocks():
    gradient = torch.randn(network.NUM_PARAMS, generator=torch.Generator().manual_seed(0))
    gradient[network.W1_SIZE : network.W1_SIZE + 512] = 0  # b1: no gradient, no cosine
    cosines = diagnostics.block_cosines(-gradient, gradient)
    assert set(cosines) == {"W1", "W2", "b2", "W3", "b3"}
    assert all(abs(value - 1.0) < 1e-6 for value in cosines.values())
    assert diagnostics.block_cosines(gradient, gradient)["W1"] < -0.999


def test_the_service_estimate_points_along_the_masked_gradient(mnist):
    """Layer-3 members (5,130 parameters, 256 of them) estimate W3's gradient far better than chance
    (about 0.014 for a random direction): the estimate and the gradient use the same minibatch, and the
    sign convention (fitness is maximised, the gradient is of the loss) holds."""
    config = tiny_config("es.rank=1", "es.w3.pop_size=256", "es.batch_size=128")
    result = diagnostics.alignment(config, planning.seed_theta(config.seed), mnist, generations=(0, 1))
    assert len(result["per_generation"]) == 2
    assert result["mean"]["W3"] > 0.1
    assert abs(result["mean"]["W2"]) < 0.05  # 8 whole rank-1 members: W2's estimate is noise


def test_alignment_of_activity_members_reads_the_images(mnist):
    """Layer-3 activity members (one pair per logit) need the training images for their estimate
    (input^T slopes): at the seed's initialisation W3's estimate is close to minus the gradient."""
    config = tiny_config(
        "es.pop_size=0", "es.w1.step_scale=0", "es.w2.step_scale=0", "es.w3.pop_size=20", "es.w3.kind=activity"
    )
    result = diagnostics.alignment(config, planning.seed_theta(config.seed), mnist)
    assert result["mean"]["W3"] > 0.5
    assert set(result["mean"]) == {"W3"}  # b3 starts at 0, which the flushes pass no gradient


def test_displacement_of_a_random_walk_is_at_the_noise_share():
    start = planning.seed_theta(0)
    walk = start + 0.01 * torch.randn(network.NUM_PARAMS, generator=torch.Generator().manual_seed(1))
    moved = diagnostics.displacement(walk, start)
    noise = diagnostics.noise_top10_shares()
    for name in ("W1", "W2"):
        assert abs(moved[name]["top10_share"] - noise[name]) < 0.02
    structured = start.clone()
    w1 = network.unflatten(structured)[0]
    w1 += torch.outer(torch.randn(784), torch.randn(512))  # a rank-1 move: all its energy in one direction
    assert diagnostics.displacement(structured, start)["W1"]["top10_share"] > 0.99
    confined = diagnostics.noise_top10_shares(subspace=32)["W1 in 32 dims"]
    assert 0.3 < confined < 0.5 and confined > 5 * noise["W1"]  # 10 of 32 directions, against 10 of 512


def test_cli_appends_one_json_line(tmp_path, capsys):
    out = tmp_path / "moved.jsonl"
    from es_service import checkpoint, strategy

    config = tiny_config()
    theta = planning.seed_theta(config.seed)
    adam = strategy.AdamES.from_config(theta, config.es)
    checkpoint.save(checkpoint.build(config, theta, adam.state_dict(), 0, 1), tmp_path / "checkpoint.pt")
    diagnostics.main(["displacement", f"start={tmp_path / 'checkpoint.pt'}", "--out", str(out)])
    row = json.loads(out.read_text())
    assert row["start"]["W1"]["displacement"] == 0.0 and "noise_top10_share" in row
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row


def test_capacity_of_the_subspace_learns_with_backprop(mnist):
    """One epoch of masked backprop in the layer members' search space (2,000 training images, 16
    steps, W2 frozen) lands far above chance (10%) on the held-out images."""
    small = dataclasses.replace(mnist, train_images=mnist.train_images[:3000], train_labels=mnist.train_labels[:3000])
    rows = diagnostics.capacity(small.hold_out(1000), subspace=16, freeze_w2=True, epochs=1)
    assert len(rows) == 1 and rows[0]["validation_accuracy"] > 0.3 and rows[0]["train_accuracy"] > 0.3
    projected = diagnostics.capacity(small.hold_out(1000), subspace=16, freeze_w2=True, epochs=1, project_init=True)
    assert projected[0]["validation_accuracy"] > 0.3 and projected != rows  # another start, another result


def test_the_gradients_energy_lies_in_the_inputs_top_directions(mnist):
    """At the seed's initialisation most of W1's and W2's gradient lies in a few input directions (a
    random 16 of 784 or 512 would hold 2-3%), and span(W1^T U_k) holds nearly as much of W2's as h1's
    own top k; shares grow with k and stay in [0, 1]."""
    result = diagnostics.energy(planning.seed_theta(0), mnist, subspaces=(4, 16), batches=2, sample=2048)
    share = result["share"]
    assert 0 < result["flushed_h1"] < 1
    for name in ("W1", "W2", "W3", "W2 via W1"):
        assert 0 <= share[name]["4"] <= share[name]["16"] <= 1 + 1e-9
    assert share["W1"]["16"] > 0.5 and share["W2"]["16"] > 0.5
    assert share["W2 via W1"]["16"] > 0.8 * share["W2"]["16"]
