"""Population-evaluation throughput against its ceilings, in one run on one device.

    python -m benchmarks.pop_eval [--device auto|cpu|cuda] [--shapes 64x256,...] [--rank R] [--json out.json]

For each (P members, B images) shape it times the evaluator's full tile evaluation (perturbed weights
built from the noise table on the device, fused tf-ftz forward, losses), and the ceilings on the same
shape: the same matmuls with no flushing and no perturbation, and torch.mm's peak. Float32, TF32 off.

``--rank R`` times low-rank members (es.rank) instead, beside full-rank members in the same rounds.
FLOP/s then count the dense network's FLOPs (what a full-rank member costs), so they read as
"effective": the member throughput a full-rank evaluator would need that many FLOP/s for. The
ceiling is the low-rank matmuls alone (shared x W1, per-member h W and the rank-R corrections).
``--shared-first-layer`` does the same for es.shared_first_layer (antithetic pairs): its ceiling is
its own matmuls alone (x W1 once, x E1 per pair, h W2 and h W3 per member on prebuilt weights).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from benchmarks.common import FLOP_PER_IMAGE, device_facts, interleaved_times, median_time, write_json
from es_workers import kinds, members, network, noise
from es_workers.evaluator import PopulationEvaluator

DEFAULT_SHAPES = {"cpu": "32x256,64x256", "cuda": "512x512,2048x1024"}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        members, _, images = item.partition("x")
        shapes.append((int(members), int(images)))
    return shapes


def matmul_ceiling(evaluator, params: list[torch.Tensor], x: torch.Tensor):
    """The evaluator's matmuls alone, run as it runs them (CPU: member threads; CUDA: batched): no
    flushing, no bias, no perturbation."""
    w1, _, w2, _, w3, _ = params
    if evaluator.batched:
        return lambda: torch.matmul(torch.matmul(torch.matmul(x, w1), w2), w3)

    def member(j: int):
        return torch.mm(torch.mm(torch.mm(x, w1[j]), w2[j]), w3[j])

    return lambda: evaluator.map_members(member, w1.shape[0])


def low_rank_ceiling(evaluator, theta: torch.Tensor, noise_rows: torch.Tensor, x: torch.Tensor, rank: int):
    """The low-rank evaluation's matmuls and correction adds, no flushing, no bias, run as the evaluator
    runs them (CPU: member threads; CUDA: batched)."""
    w1, _, w2, _, w3, _ = network.unflatten(theta)
    c = torch.tensor(0.02, device=x.device)

    def plus_correction(z, h, a, f):
        u, v = members.low_rank_correction(h, a, f, c)
        return z + u * v

    def layers(xw1, rows):
        (a1, f1, _), (a2, f2, _), (a3, f3, _) = members.low_rank_factors(rows, rank)
        h1 = plus_correction(xw1, x, a1, f1)
        h2 = plus_correction(torch.matmul(h1, w2), h1, a2, f2)
        return plus_correction(torch.matmul(h2, w3), h2, a3, f3)

    def run():
        xw1 = torch.mm(x, w1)
        if evaluator.batched:
            return layers(xw1, noise_rows)
        return evaluator.map_members(lambda j: layers(xw1, noise_rows[j]), noise_rows.shape[0])

    return run


def shared_first_layer_ceiling(
    evaluator, theta: torch.Tensor, offsets: np.ndarray, tails: torch.Tensor, x: torch.Tensor
):
    """The shared-first-layer evaluation's matmuls alone, no flushing, no bias, run as the evaluator runs
    them: x W1 once, x E1 once per distinct slice, then each member's h1 W2 and h2 W3 (prebuilt)."""
    w1 = network.unflatten(theta)[0]
    _, w2, _, w3, _ = network.unflatten(tails, first=1)
    distinct, which = np.unique(offsets, return_inverse=True)
    e1 = members.first_layer_noise(noise.slices(evaluator.table, distinct, network.W1_SIZE))
    sharers = [np.flatnonzero(which.reshape(-1) == k) for k in range(len(distinct))]  # members of each slice
    which = torch.as_tensor(which.reshape(-1), device=x.device)

    def run():
        xw1 = torch.mm(x, w1)
        if evaluator.batched:
            return torch.matmul(torch.matmul(xw1 + torch.matmul(x, e1).index_select(0, which), w2), w3)

        def pair(k: int):
            xe1 = torch.mm(x, e1[k])
            return [torch.mm(torch.mm(xw1 + xe1, w2[j]), w3[j]) for j in sharers[k]]

        return evaluator.map_members(pair, len(distinct))

    return run


def mm_peak_call(device: torch.device, seconds_hint: float):
    """(callable, FLOP per call): torch.mm on the first layer's shape at 1024 images (CPU) or a large
    square (CUDA), repeated so one call lasts about as long as the evaluation it is compared with."""
    m, k, n = (8192, 8192, 8192) if device.type == "cuda" else (1024, 784, 512)
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    flop = 2 * m * k * n
    once = median_time(lambda: torch.mm(a, b), device, 20)
    count = max(1, round(seconds_hint / once))

    def run():
        for _ in range(count):
            torch.mm(a, b)

    return run, count * flop


def bench_shape(
    evaluator, pop: int, images: int, repeats: int, rank: int = 0, shared_first_layer: bool = False
) -> dict:
    """Evaluation, the no-flush ceiling and torch.mm's peak, taking turns in each round; ratios are
    medians of the per-round ratios. Low rank or a shared first layer: full-rank evaluation takes a turn too."""
    device = evaluator.device
    rng = np.random.default_rng(0)
    offsets = np.repeat(
        rng.integers(0, noise.max_offset(evaluator.table.numel(), network.NUM_PARAMS) + 1, size=(pop + 1) // 2), 2
    )[:pop].astype(np.int64)  # antithetic pairs, as the planner lays them out
    signs = np.where(np.arange(pop) % 2 == 0, 1.0, -1.0).astype(np.float32)
    indices = rng.choice(evaluator.images.shape[0], size=images, replace=False).astype(np.int64)
    theta = network.init_theta(0).to(device)
    flop = FLOP_PER_IMAGE * pop * images
    kind = kinds.whole_kind(rank, shared_first_layer)
    evaluate = lambda: kind.evaluate(evaluator, theta, offsets, signs, 0.02, indices)  # noqa: E731
    x = torch.rand(images, 784, device=device)
    prebuilt = None
    if rank:
        index = torch.as_tensor(offsets, device=device)
        noise_rows = evaluator.windows[:, : members.noise_length(rank)].index_select(0, index)
        ceiling = low_rank_ceiling(evaluator, theta, noise_rows, x, rank)
    elif shared_first_layer:
        prebuilt = evaluator.perturbed(theta, offsets, torch.full((pop,), 0.02, device=device), network.W1_SIZE)
        ceiling = shared_first_layer_ceiling(evaluator, theta, offsets, prebuilt, x)
    else:  # the same matmuls on the same distinct per-member weights, prebuilt; no flushing
        prebuilt = evaluator.perturbed(theta, offsets, torch.full((pop,), 0.02, device=device))
        ceiling = matmul_ceiling(evaluator, network.unflatten(prebuilt), x)
    peak, peak_flop = mm_peak_call(device, median_time(evaluate, device, 1, warmup=1))
    turns = {"evaluate": evaluate, "ceiling": ceiling, "peak": peak}
    if rank or shared_first_layer:
        turns["full_rank"] = lambda: kinds.Whole().evaluate(evaluator, theta, offsets, signs, 0.02, indices)
    times = interleaved_times(turns, device, repeats)
    del prebuilt
    evaluate_s, ceiling_s, peak_s = (statistics.median(times[name]) for name in ("evaluate", "ceiling", "peak"))
    extra = {}
    if "full_rank" in times:
        extra = {
            "full_rank_s": statistics.median(times["full_rank"]),
            "speedup_over_full_rank": statistics.median(f / e for f, e in zip(times["full_rank"], times["evaluate"])),
        }
    return {
        "members": pop,
        "images": images,
        "rank": rank,
        "shared_first_layer": shared_first_layer,
        **extra,
        "evaluate_s": evaluate_s,
        "evaluate_flops": flop / evaluate_s,
        "forward_passes_per_s": pop * images / evaluate_s,
        "noflush_matmul_s": ceiling_s,
        "noflush_matmul_flops": flop / ceiling_s,
        "mm_peak_flops": peak_flop / peak_s,
        "ratio_to_noflush": statistics.median(c / e for c, e in zip(times["ceiling"], times["evaluate"])),
        "ratio_to_mm_peak": statistics.median(
            (flop / e) / (peak_flop / p) for e, p in zip(times["evaluate"], times["peak"])
        ),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--shapes", help="comma-separated PxB, e.g. 64x256,512x512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-fused", action="store_true", help="eager epilogues (the reference path)")
    parser.add_argument("--rank", type=int, default=0, help="low-rank members (es.rank), timed beside full rank")
    parser.add_argument(
        "--shared-first-layer", action="store_true", help="es.shared_first_layer members, timed beside full rank"
    )
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args(argv)
    if args.rank and args.shared_first_layer:
        parser.error("--rank and --shared-first-layer exclude each other (low-rank members already share x W1)")
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    from es_service.data import load_mnist

    data = load_mnist()
    table = noise.make_table(0, 1 << 24)
    evaluator = PopulationEvaluator(
        table, data.train_images, data.train_labels, "tf-ftz", device, fused=not args.no_fused
    )
    rows = []
    variant = "low rank" if args.rank else ("shared first layer" if args.shared_first_layer else "")
    print(
        f"device {device}  fused={not args.no_fused}  rank={args.rank}  shared_first_layer={args.shared_first_layer}  "
        "(evaluation, ceiling and mm peak take turns each round)"
    )
    print(
        f"{'P x B':>12} {'eval ms':>9} {'GFLOP/s':>9} {'fwd/s':>11} {'noflush GFLOP/s':>16} "
        f"{'mm GFLOP/s':>11} {'eval/noflush':>13} {'eval/mm':>8}"
    )
    for pop, images in parse_shapes(args.shapes or DEFAULT_SHAPES[device.type]):
        row = bench_shape(evaluator, pop, images, args.repeats, args.rank, args.shared_first_layer)
        rows.append(row)
        print(
            f"{pop:>6} x {images:<5} {row['evaluate_s'] * 1e3:9.2f} {row['evaluate_flops'] / 1e9:9.1f} "
            f"{row['forward_passes_per_s']:11.0f} {row['noflush_matmul_flops'] / 1e9:16.1f} "
            f"{row['mm_peak_flops'] / 1e9:11.1f} {row['ratio_to_noflush']:13.3f} {row['ratio_to_mm_peak']:8.3f}"
            + (
                f"   full rank {row['full_rank_s'] * 1e3:.2f} ms, {variant} {row['speedup_over_full_rank']:.2f}x faster"
                if variant
                else ""
            )
        )
    payload = {
        "benchmark": "pop_eval",
        **device_facts(device),
        "fused": not args.no_fused,
        "rank": args.rank,
        "shared_first_layer": args.shared_first_layer,
        "rows": rows,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
