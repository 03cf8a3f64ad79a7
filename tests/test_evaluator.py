"""The population evaluator: tile-independent, equal to the reference forward, scalars out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from es_workers import compiled, kinds, members, network, noise
from es_workers.evaluator import PopulationEvaluator, TileTask, accuracy, center_accuracies, set_process_arithmetic


@pytest.fixture(scope="module")
def evaluator(mnist):
    table = noise.make_table(7, 1 << 20)
    return PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu")


def _members(count, seed=0):
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, noise.max_offset(1 << 20, network.NUM_PARAMS) + 1, size=count).astype(np.int64)
    signs = np.where(np.arange(count) % 2 == 0, 1.0, -1.0).astype(np.float32)
    return offsets, signs


def _at_thread_counts(counts, run):
    """[run(n) for n in counts], each with torch set to n intra-op threads; the count restored after."""
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in counts:
            torch.set_num_threads(threads)
            results.append(run(threads))
        return results
    finally:
        torch.set_num_threads(saved)


def test_member_results_do_not_depend_on_tile_mates(evaluator):
    theta = network.init_theta(0)
    offsets, signs = _members(6)
    images = np.arange(100, 164, dtype=np.int64)
    together = kinds.Whole().evaluate(evaluator, theta, offsets, signs, 0.02, images)
    for j in range(6):
        alone = kinds.Whole().evaluate(evaluator, theta, offsets[j : j + 1], signs[j : j + 1], 0.02, images)
        assert alone[0][0] == together[0][j] and alone[1][0] == together[1][j]
    shuffled = kinds.Whole().evaluate(evaluator, theta, offsets[::-1].copy(), signs[::-1].copy(), 0.02, images)
    assert np.array_equal(shuffled[0][::-1], together[0])


def test_results_match_the_reference_forward(evaluator, mnist):
    theta = network.init_theta(0)
    offsets, signs = _members(2)
    images = np.arange(64, dtype=np.int64)
    loss_sums, correct = kinds.Whole().evaluate(evaluator, theta, offsets, signs, 0.05, images)
    table = evaluator.table
    x = mnist.train_images[:64].reshape(-1, 784).float() / 255.0
    y = mnist.train_labels[:64]
    with network.single_threaded():  # as the evaluator's members run (MKL's bits vary with threads)
        logits_of = [
            network.forward(
                x,
                network.unflatten(
                    theta + (signs[j] * np.float32(0.05)) * table[offsets[j] : offsets[j] + network.NUM_PARAMS]
                ),
                "tf-ftz",
            )
            for j in range(2)
        ]
    for j, logits in enumerate(logits_of):
        losses = torch.nn.functional.cross_entropy(logits, y, reduction="none").double().tolist()
        assert loss_sums[j] == math.fsum(losses)
        assert correct[j] == int((logits.argmax(1) == y).sum())
    assert loss_sums.dtype == np.float64 and correct.dtype == np.int64


def test_overflowing_members_give_nonfinite_loss(evaluator):
    theta = network.init_theta(0) * 1e13  # logits overflow float32 after the 2**125 rescale
    offsets, signs = _members(2)
    loss_sums, _ = kinds.Whole().evaluate(evaluator, theta, offsets, signs, 0.02, np.arange(32, dtype=np.int64))
    assert not np.isfinite(loss_sums).all()


def test_tile_task_asserts_dtypes_at_the_boundary():
    with pytest.raises(AssertionError):
        TileTask(0, 0, np.array([1, 2], dtype=np.int32), np.ones(2, np.float32), 0.1, np.arange(3), kinds.Whole())


def test_cpu_ftz_refused_on_cuda():
    with pytest.raises(ValueError, match="does nothing on CUDA"):
        PopulationEvaluator(torch.zeros(10), torch.zeros(1, 784, dtype=torch.uint8), torch.zeros(1), "cpu-ftz", "cuda")


def test_center_accuracy_is_chance_level_at_init(mnist):
    value = accuracy(network.init_theta(0), mnist.test_images, mnist.test_labels, "tf-ftz")
    assert 0.0 <= value < 0.3


def test_center_accuracies_add_the_unflushed_test_score_only_where_there_are_flushes(mnist):
    theta = network.init_theta(0)
    sets = {
        "train": (mnist.train_images[:2000], mnist.train_labels[:2000]),
        "test": (mnist.test_images[:2000], mnist.test_labels[:2000]),
    }
    flushed, linear = center_accuracies(theta, sets, "tf-ftz"), center_accuracies(theta, sets, "linear")
    assert set(linear) == {"train_accuracy", "test_accuracy"}
    assert flushed["test_accuracy_unflushed"] == linear["test_accuracy"]
    assert flushed["test_accuracy"] == accuracy(theta, *sets["test"], "tf-ftz")
    assert flushed["test_accuracy"] != linear["test_accuracy"]  # at init the flushes change most predictions


@pytest.mark.parametrize("arithmetic", ["tf-ftz", "linear"])
def test_fused_member_is_bitwise_equal_to_the_reference(mnist, arithmetic):
    """The compiled member region (perturbation, matmuls, fused epilogues) and the compiled per-layer
    epilogues against eager reference ops, on CPU."""
    table = noise.make_table(7, 1 << 20)
    eager = PopulationEvaluator(table, mnist.train_images, mnist.train_labels, arithmetic, "cpu", fused=False)
    fused = PopulationEvaluator(table, mnist.train_images, mnist.train_labels, arithmetic, "cpu", fused=True)
    theta = network.init_theta(0)
    offsets, signs = _members(4, seed=3)
    images = np.arange(200, 328, dtype=np.int64)
    expected = kinds.Whole().evaluate(eager, theta, offsets, signs, 0.02, images)
    got = kinds.Whole().evaluate(fused, theta, offsets, signs, 0.02, images)
    assert np.array_equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    x = mnist.test_images[:500].reshape(-1, 784).float() / 255.0
    params = network.unflatten(theta)
    assert torch.equal(network.forward(x, params, arithmetic, fused=True), network.forward(x, params, arithmetic))
    built = compiled.compiled_functions()
    assert arithmetic != "tf-ftz" or ("member", "tf-ftz", network.SEED) in compiled.CACHE  # tf-ftz members: one region
    assert not any(fn.failed for fn in built)  # really compiled, not the eager fallback


def test_batched_path_equals_member_loop_on_cpu(mnist):
    """The CUDA code path (batched matmuls over a chunk of members), run on CPU, agrees with the member
    loop. Not bitwise: MKL's bmm blocks the reduction differently from mm (why CPU uses the loop)."""
    table = noise.make_table(7, 1 << 20)
    loop = PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", batched=False)
    batched = PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", batched=True)
    theta = network.init_theta(0)
    offsets, signs = _members(5, seed=4)
    images = np.arange(64, dtype=np.int64)
    expected, got = (
        kinds.Whole().evaluate(loop, theta, offsets, signs, 0.02, images),
        kinds.Whole().evaluate(batched, theta, offsets, signs, 0.02, images),
    )
    assert np.allclose(expected[0], got[0], rtol=1e-6, atol=0) and np.array_equal(expected[1], got[1])


def test_batched_fused_path_is_bitwise_equal_to_batched_eager(mnist):
    """The CUDA code path on CPU: the one-pass compiled gather+scale+add and the compiled epilogues
    give the same bits as index_select, mul_, add_ and eager epilogues around the same bmm calls."""
    table = noise.make_table(7, 1 << 20)
    eager, fused = (
        PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", fused=flag, batched=True)
        for flag in (False, True)
    )
    theta = network.init_theta(0)
    offsets, signs = _members(6, seed=5)
    images = np.arange(300, 364, dtype=np.int64)
    expected, got = (
        kinds.Whole().evaluate(eager, theta, offsets, signs, 0.03, images),
        kinds.Whole().evaluate(fused, theta, offsets, signs, 0.03, images),
    )
    assert np.array_equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    scales = torch.tensor([0.03, -0.03, 0.01])
    rows = fused.perturbed(theta, offsets[:3], scales)
    assert torch.equal(rows, eager.perturbed(theta, offsets[:3], scales))
    assert not compiled.CACHE[("perturb_rows",)].failed


@pytest.mark.parametrize("arithmetic,fused", [("tf-ftz", True), ("tf-ftz", False), ("cpu-ftz", False)])
def test_member_results_do_not_depend_on_the_thread_count(mnist, arithmetic, fused):
    """A 1-CPU Ray worker, a 2-CPU worker and --executor local on a 16-core driver must score a member
    alike: MKL's matmul gives other bits with 2 threads than with 1 (at 128 rows here), so members run
    with single-threaded ops, spread over threads."""
    table = noise.make_table(7, 1 << 20)
    # cpu-ftz: larger weights, or the hardware flush zeroes every member's activations alike
    theta = network.init_theta(0) * (8.0 if arithmetic == "cpu-ftz" else 1.0)
    offsets, signs = _members(5, seed=6)
    images = np.arange(1000, 1128, dtype=np.int64)

    def run(threads):
        evaluator = PopulationEvaluator(table, mnist.train_images, mnist.train_labels, arithmetic, "cpu", fused=fused)
        assert evaluator.threads == threads
        result = kinds.Whole().evaluate(evaluator, theta, offsets, signs, 0.02, images)
        assert torch.get_num_threads() == threads  # restored after the evaluation
        return result

    set_process_arithmetic(arithmetic)  # this thread's flag, as the worker and the driver set theirs
    try:
        results = _at_thread_counts((1, 2, 3), run)
    finally:
        torch.set_flush_denormal(False)
    assert len(set(results[0][0].tolist())) == len(offsets)  # members really differ
    for loss_sums, correct in results[1:]:
        assert np.array_equal(loss_sums, results[0][0]) and np.array_equal(correct, results[0][1])


@pytest.mark.parametrize("fused", [True, False])
def test_low_rank_members_do_not_depend_on_threads_or_tile_mates(mnist, fused):
    table = noise.make_table(7, 1 << 20)
    theta = network.init_theta(0)
    offsets, signs = _members(5, seed=8)
    images = np.arange(2000, 2128, dtype=np.int64)

    def evaluator():  # one per thread count: it sizes its member threads from torch's count
        return PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", fused=fused)

    results = _at_thread_counts(
        (1, 2, 3), lambda _: kinds.whole_kind(rank=1).evaluate(evaluator(), theta, offsets, signs, 0.02, images)
    )
    alone = kinds.whole_kind(rank=1).evaluate(evaluator(), theta, offsets[3:4], signs[3:4], 0.02, images)
    assert len(set(results[0][0].tolist())) == len(offsets)
    for loss_sums, correct in results[1:]:
        assert np.array_equal(loss_sums, results[0][0]) and np.array_equal(correct, results[0][1])
    assert alone[0][0] == results[0][0][3]


@pytest.mark.parametrize("fused", [True, False])
def test_shared_first_layer_members_do_not_depend_on_threads_or_tile_mates(mnist, fused):
    """Pairs share x E1; a member split from its pair, or the pair reordered, scores the same bits."""
    table = noise.make_table(7, 1 << 20)
    theta = network.init_theta(0)
    offsets, signs = np.repeat(_members(3, seed=8)[0], 2), np.tile(np.array([1.0, -1.0], np.float32), 3)
    images = np.arange(2000, 2128, dtype=np.int64)

    def evaluator():  # one per thread count: it sizes its member threads from torch's count
        return PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", fused=fused)

    def evaluate(ev, members):
        return kinds.whole_kind(shared_first_layer=True).evaluate(
            ev, theta, offsets[members], signs[members], 0.02, images
        )

    results = _at_thread_counts((1, 2, 3), lambda _: evaluate(evaluator(), slice(None)))
    assert len(set(results[0][0].tolist())) == len(offsets)
    for loss_sums, correct in results[1:]:
        assert np.array_equal(loss_sums, results[0][0]) and np.array_equal(correct, results[0][1])
    ev = evaluator()
    assert evaluate(ev, slice(3, 4))[0][0] == results[0][0][3]
    swapped = evaluate(ev, np.array([3, 2, 1, 0]))[0]
    assert np.array_equal(swapped, results[0][0][[3, 2, 1, 0]])
    dense = kinds.Whole().evaluate(ev, theta, offsets, signs, 0.02, images)[0]
    assert np.allclose(dense, results[0][0], rtol=1e-5) and not np.array_equal(dense, results[0][0])


def test_shared_first_layer_batched_path_agrees_with_the_member_loop(mnist):
    """The CUDA code path on CPU (x E1 per distinct slice as one batched matmul) against the member loop."""
    table = noise.make_table(7, 1 << 20)
    loop = PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", batched=False)
    batched = {
        fused: PopulationEvaluator(
            table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", batched=True, fused=fused
        )
        for fused in (False, True)
    }
    theta = network.init_theta(0)
    offsets = np.append(
        np.repeat(_members(3, seed=9)[0], 2), noise.max_offset(1 << 20, network.NUM_PARAMS)
    )  # the last offset too
    signs = np.append(np.tile(np.array([1.0, -1.0], np.float32), 3), np.float32(-1.0))
    images = np.arange(500, 756, dtype=np.int64)
    expected = kinds.whole_kind(shared_first_layer=True).evaluate(loop, theta, offsets, signs, 0.03, images)
    eager, fused = (
        kinds.whole_kind(shared_first_layer=True).evaluate(batched[f], theta, offsets, signs, 0.03, images)
        for f in (False, True)
    )
    assert np.array_equal(eager[0], fused[0]) and np.array_equal(eager[1], fused[1])
    assert np.allclose(expected[0], fused[0], rtol=1e-4, atol=0) and np.abs(expected[1] - fused[1]).max() <= 1
    # whole pairs take the no-copy layout (x E1 broadcast over each pair): the same bits as the copy
    for f in (False, True):
        pairs = kinds.whole_kind(shared_first_layer=True).evaluate(
            batched[f], theta, offsets[:6], signs[:6], 0.03, images
        )
        assert np.array_equal(pairs[0], fused[0][:6]) and np.array_equal(pairs[1], fused[1][:6])


@pytest.mark.parametrize("rank", [1, 2])
def test_low_rank_batched_path_agrees_with_the_member_loop_and_the_dense_member(mnist, rank):
    """The CUDA code path on CPU (one GEMM per layer over all members) against the per-member loop,
    and both against the network evaluated at theta + scale * dense(perturbation)."""
    table = noise.make_table(7, 1 << 20)
    loop = PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", batched=False)
    batched = PopulationEvaluator(
        table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", batched=True, fused=True
    )
    theta = network.init_theta(0)
    offsets, signs = _members(6, seed=9)
    images = np.arange(500, 756, dtype=np.int64)
    expected = kinds.whole_kind(rank=rank).evaluate(loop, theta, offsets, signs, 0.03, images)
    got = kinds.whole_kind(rank=rank).evaluate(batched, theta, offsets, signs, 0.03, images)
    assert np.allclose(expected[0], got[0], rtol=1e-4, atol=0) and np.abs(expected[1] - got[1]).max() <= 1
    x, y = loop.batch(images)
    for j in range(len(offsets)):
        perturbation = members.low_rank_dense(table[offsets[j] : offsets[j] + members.noise_length(rank)], rank)
        logits = network.forward(x, network.unflatten(theta + float(signs[j] * 0.03) * perturbation), "tf-ftz")
        loss = float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        assert loss == pytest.approx(expected[0][j], rel=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_head_members_are_full_members_whose_slice_moves_only_the_output_layer(mnist, fused):
    """A layer-3 member scores bit for bit as the full member theta + scale * (zeros, then its head slice),
    alike with 1 and 2 threads and whoever shares its tile; fused equals eager. 70 members: two chunks."""
    table = noise.make_table(7, 1 << 20)
    theta = network.init_theta(0)
    offsets, signs = _members(70, seed=9)
    images = np.arange(2000, 2096, dtype=np.int64)

    def evaluator():  # one per thread count: it sizes its member threads from torch's count
        return PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", fused=fused)

    results = _at_thread_counts(
        (1, 2), lambda _: kinds.Output().evaluate(evaluator(), theta, offsets, signs, 0.05, images)
    )
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
    assert len(set(results[0][0].tolist())) == len(offsets)
    # the batched path (what CUDA runs) agrees: same chunks, ops on all threads
    batched = kinds.Output().evaluate(
        PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu", fused=fused, batched=True),
        theta,
        offsets,
        signs,
        0.05,
        images,
    )
    assert np.allclose(batched[0], results[0][0], rtol=1e-4) and np.abs(batched[1] - results[0][1]).max() <= 1
    eager = PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu")
    x, y = eager.batch(images)
    for j in (0, 1, 63, 64, 69):
        padded = torch.zeros(network.NUM_PARAMS)
        padded[-network.OUTPUT_LAYER_SIZE :] = table[offsets[j] : offsets[j] + network.OUTPUT_LAYER_SIZE]
        with network.single_threaded():
            logits = members.member_forward(x, theta, padded, torch.tensor(np.float32(signs[j] * 0.05)), "tf-ftz")
        loss_sums, correct = eager.score(logits, y)
        assert loss_sums[0] == results[0][0][j] and correct[0] == results[0][1][j]
        alone = kinds.Output().evaluate(evaluator(), theta, offsets[j : j + 1], signs[j : j + 1], 0.05, images)
        assert alone[0][0] == results[0][0][j]


@pytest.mark.parametrize("variant", [{"rank": 1}, {"shared_first_layer": True}])
def test_x_w1_is_reused_only_for_the_same_unmodified_theta_and_images(mnist, variant):
    """Later tiles reuse x W1; a theta changed in place, or other images, must not see the old one."""
    table = noise.make_table(7, 1 << 20)
    make = lambda: PopulationEvaluator(table, mnist.train_images, mnist.train_labels, "tf-ftz", "cpu")  # noqa: E731
    offsets, signs = np.repeat(_members(2, seed=3)[0], 2), np.tile(np.array([1.0, -1.0], np.float32), 2)
    theta = network.init_theta(0)
    images = np.arange(64, dtype=np.int64)
    ev = make()
    first = kinds.whole_kind(**variant).evaluate(ev, theta, offsets, signs, 0.02, images)
    assert np.array_equal(
        kinds.whole_kind(**variant).evaluate(ev, theta, offsets[2:], signs[2:], 0.02, images)[0], first[0][2:]
    )
    other_images = kinds.whole_kind(**variant).evaluate(ev, theta, offsets, signs, 0.02, images + 64)[0]
    assert np.array_equal(
        other_images, kinds.whole_kind(**variant).evaluate(make(), theta, offsets, signs, 0.02, images + 64)[0]
    )
    kinds.whole_kind(**variant).evaluate(ev, theta, offsets, signs, 0.02, images)
    theta.mul_(1.5)  # an optimizer step in place: same object, new values
    moved = kinds.whole_kind(**variant).evaluate(ev, theta, offsets, signs, 0.02, images)[0]
    assert np.array_equal(moved, kinds.whole_kind(**variant).evaluate(make(), theta, offsets, signs, 0.02, images)[0])
    assert not np.array_equal(moved, first[0])
