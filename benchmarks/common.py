"""Shared benchmark helpers: timing medians, device facts, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from es_workers import network

FLOP_PER_IMAGE = 2 * sum(a * b for a, b in zip(network.LAYER_SIZES[:-1], network.LAYER_SIZES[1:]))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved_times(fns: dict, device: torch.device, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall seconds of each ``fns[name]()`` over ``repeats`` rounds, the functions taking turns in every
    round, so that drift on a shared machine hits them alike and per-round ratios stay meaningful."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - started)
    return times


def device_facts(device: torch.device) -> dict:
    facts = {
        "device": str(device),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["tf32"] = torch.backends.cuda.matmul.allow_tf32
        facts["triton_default_fp_fusion"] = os.environ.get("TRITON_DEFAULT_FP_FUSION")
    return facts


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
