"""The GPU device check, in-process without Ray (the GPU machines have none). Under 5 minutes.

    python -m benchmarks.device_check [--theta CHECKPOINT] [--json out.json] [--small]

1. pop-eval throughput against its ceilings (benchmarks.pop_eval), fused and eager;
2. fused (torch.compile) against the eager reference path: bitwise, on this device;
3. CPU against CUDA: the tf-ftz network with the same theta gives the same argmax on >= 99.9% of the
   MNIST test set;
4. whether a member's result depends on its chunk mates on CUDA (batched vs one at a time);
5. the driver's update on this device: gradient from 512/1024 noise slices, and an Adam step;
6. low-rank members (es.rank 1): throughput beside full rank, fused against eager (bitwise), and the
   device's batched pass against the CPU member loop;
7. the same for a shared first layer (es.shared_first_layer).
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch

from benchmarks import pop_eval
from benchmarks.common import device_facts, median_time, write_json
from es_service import strategy
from es_service.data import load_mnist
from es_workers import kinds, network, noise
from es_workers.evaluator import PopulationEvaluator


def _members(count: int, table_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, noise.max_offset(table_size, network.NUM_PARAMS) + 1, size=count).astype(np.int64)
    signs = np.where(np.arange(count) % 2 == 0, 1.0, -1.0).astype(np.float32)
    return offsets, signs, rng


def check_fused_bitwise(table, data, device, members, images) -> dict:
    eager = PopulationEvaluator(table, data.train_images, data.train_labels, "tf-ftz", device, fused=False)
    fused = PopulationEvaluator(table, data.train_images, data.train_labels, "tf-ftz", device, fused=True)
    offsets, signs, rng = _members(members, table.numel(), 1)
    index = rng.choice(60000, size=images, replace=False).astype(np.int64)
    theta = network.init_theta(0).to(device)
    a = kinds.Whole().evaluate(eager, theta, offsets, signs, 0.02, index)
    b = kinds.Whole().evaluate(fused, theta, offsets, signs, 0.02, index)
    x = data.test_images.reshape(-1, 784)[:2000].to(device).float() / 255.0
    params = network.unflatten(theta)
    logits_equal = torch.equal(network.forward(x, params, "tf-ftz", True), network.forward(x, params, "tf-ftz"))
    return {
        "members": members,
        "images": images,
        "loss_sums_equal": bool(np.array_equal(a[0], b[0])),
        "correct_equal": bool(np.array_equal(a[1], b[1])),
        "logits_equal": bool(logits_equal),
    }


def check_cpu_vs_device(theta, data, device) -> dict:
    x = data.test_images.reshape(-1, 784).float() / 255.0
    cpu = network.forward(x, network.unflatten(theta), "tf-ftz").argmax(1)
    dev = network.forward(x.to(device), network.unflatten(theta.to(device)), "tf-ftz", fused=True).argmax(1).cpu()
    agree = float((cpu == dev).float().mean())
    return {
        "images": len(x),
        "argmax_agreement": agree,
        "passes_99_9": agree >= 0.999,
        "cpu_test_accuracy": float((cpu == data.test_labels).float().mean()),
        "device_test_accuracy": float((dev == data.test_labels).float().mean()),
    }


def check_chunk_independence(table, data, device, members=64, images=512) -> dict:
    kwargs = dict(arithmetic="tf-ftz", device=device, fused=True)
    batched = PopulationEvaluator(table, data.train_images, data.train_labels, batched=True, **kwargs)
    single = PopulationEvaluator(table, data.train_images, data.train_labels, batched=False, **kwargs)
    offsets, signs, rng = _members(members, table.numel(), 2)
    index = rng.choice(60000, size=images, replace=False).astype(np.int64)
    theta = network.init_theta(0).to(device)
    a = kinds.Whole().evaluate(batched, theta, offsets, signs, 0.02, index)
    b = kinds.Whole().evaluate(single, theta, offsets, signs, 0.02, index)
    return {
        "members": members,
        "bitwise_equal": bool(np.array_equal(a[0], b[0])),
        "max_rel_diff": float(np.max(np.abs(a[0] - b[0]) / np.abs(b[0]))),
        "correct_equal": bool(np.array_equal(a[1], b[1])),
    }


def check_variant(table, data, device, members, images, rank=0, shared_first_layer=False) -> dict:
    """Low-rank or shared-first-layer members of antithetic pairs: fused against eager on this device
    (bitwise), and this device's batched pass against the CPU member loop."""
    make = lambda **kw: PopulationEvaluator(table, data.train_images, data.train_labels, "tf-ftz", **kw)  # noqa: E731
    eager, fused = make(device=device, fused=False), make(device=device, fused=True)
    loop = make(device="cpu", fused=True, batched=False)
    offsets, signs, rng = _members(members // 2, table.numel(), 4)
    offsets, signs = np.repeat(offsets, 2), np.tile(np.array([1.0, -1.0], dtype=np.float32), members // 2)
    index = rng.choice(60000, size=images, replace=False).astype(np.int64)
    theta = network.init_theta(0)
    a, b = (
        kinds.whole_kind(rank, shared_first_layer).evaluate(evaluator, theta.to(device), offsets, signs, 0.02, index)
        for evaluator in (eager, fused)
    )
    c = kinds.whole_kind(rank, shared_first_layer).evaluate(loop, theta, offsets, signs, 0.02, index)
    return {
        "members": members,
        "images": images,
        "rank": rank,
        "shared_first_layer": shared_first_layer,
        "fused_equals_eager": bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])),
        "max_rel_diff_vs_cpu_loop": float(np.max(np.abs(b[0] - c[0]) / np.abs(c[0]))),
        "max_correct_diff_vs_cpu_loop": int(np.max(np.abs(b[1] - c[1]))),
    }


def check_update(table, device, repeats) -> dict:
    rows = {}
    for slices in (512, 1024, 2048):
        offsets, _, rng = _members(slices, table.numel(), 3)
        weights = rng.standard_normal(slices)
        for rank in (0, 1):
            seconds = median_time(
                functools.partial(kinds.whole_kind(rank).estimate, table, offsets, weights, 0.02, 2 * slices, None),
                device,
                repeats,
            )
            rows[f"grad_{slices}_slices{'_rank1' if rank else ''}_s"] = seconds
    adam = strategy.AdamES(network.init_theta(0).to(device), 0.001, 0.005)
    grad = torch.randn(network.NUM_PARAMS, device=device)
    rows["adam_step_s"] = median_time(lambda: adam.step(grad, 0.001), device, repeats)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--theta", help="checkpoint whose theta the CPU-vs-device check uses (default: init)")
    parser.add_argument("--json")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a dry run on CPU")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    started = time.monotonic()
    data = load_mnist()
    table = noise.make_table(0, 1 << 24).to(device)
    report = {"facts": device_facts(device)}
    print(report["facts"], flush=True)
    shapes = "16x64" if args.small else "512x512,2048x1024"
    for fused in (True, False):
        flags = ["--device", device.type, "--shapes", shapes, "--repeats", "3" if args.small else "5"]
        report[f"pop_eval_{'fused' if fused else 'eager'}"] = pop_eval.main(flags + ([] if fused else ["--no-fused"]))
    sizes = (8, 64) if args.small else (256, 1024)
    report["fused_bitwise"] = check_fused_bitwise(table, data, device, *sizes)
    print("fused vs reference:", report["fused_bitwise"], flush=True)
    theta = network.init_theta(0)
    if args.theta:
        theta = torch.load(args.theta, map_location="cpu", weights_only=True)["theta"]
    report["cpu_vs_device"] = check_cpu_vs_device(theta, data, device)
    print("cpu vs device:", report["cpu_vs_device"], flush=True)
    report["chunk_independence"] = check_chunk_independence(
        table, data, device, *((8, 64) if args.small else (64, 512))
    )
    print("chunk independence:", report["chunk_independence"], flush=True)
    report["update"] = check_update(table, device, 3 if args.small else 10)
    print("driver update:", report["update"], flush=True)
    report["pop_eval_low_rank"] = pop_eval.main(flags + ["--rank", "1"])
    report["low_rank"] = check_variant(table, data, device, *((8, 64) if args.small else (256, 1024)), rank=1)
    print("low rank:", report["low_rank"], flush=True)
    report["pop_eval_shared_first_layer"] = pop_eval.main(flags + ["--shared-first-layer"])
    report["shared_first_layer"] = check_variant(
        table, data, device, *((8, 64) if args.small else (256, 1024)), shared_first_layer=True
    )
    print("shared first layer:", report["shared_first_layer"], flush=True)
    report["check_wall_s"] = time.monotonic() - started
    print(f"device check took {report['check_wall_s']:.0f}s", flush=True)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
