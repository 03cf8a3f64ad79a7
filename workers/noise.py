"""The shared noise table (Salimans et al. 2017, "Evolution Strategies as a Scalable Alternative to
Reinforcement Learning"; OpenAI's evolution-strategies-starter).

One float32 table of standard normals generated from a seed. Member i's perturbation is the slice
``table[offset_i : offset_i + length]``, ``length`` what its kind reads (theta's length for a whole
member); only offsets travel between processes. It knows no network. No Ray, no I/O.
"""

from __future__ import annotations

import numpy as np
import torch


def make_table(seed: int, size: int) -> torch.Tensor:
    """A reproducible table of ``size`` standard-normal float32 entries (CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=generator, dtype=torch.float32)


def max_offset(table_size: int, length: int) -> int:
    """Largest valid start (inclusive) of a slice of ``length`` floats (theta's)."""
    return table_size - length


def windows(table: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-copy (table_size - length + 1, length) view: row k is the slice starting at k (its first
    ``length`` floats)."""
    return table.as_strided((table.numel() - length + 1, length), (1, 1))


def slices(table: torch.Tensor, offsets: np.ndarray | torch.Tensor, length: int) -> torch.Tensor:
    """The perturbation rows for ``offsets``, their first ``length`` floats (a low-rank member reads
    fewer), gathered into one (len(offsets), length) tensor."""
    index = torch.as_tensor(np.asarray(offsets, dtype=np.int64)).to(table.device)
    return windows(table, length).index_select(0, index)


GRAD_CHUNK_ROWS = {"cpu": 8, "cuda": 64}
"""Slices gathered per matrix-vector product of an estimate: fixed per device type, so the sum order is
fixed. On CPU small chunks stay memory-friendly (8 rows: ~3x faster than 64 on the 2-core machine); on
CUDA larger chunks mean fewer launches."""


def weight_vector(weights, device: torch.device) -> torch.Tensor:
    """An update's float32 weights (numpy or a sequence) as a tensor on ``device``."""
    return torch.as_tensor(np.asarray(weights, dtype=np.float32)).to(device)


def weighted_sum(table, offsets, weights, noise_std: float, count: int, length: int) -> torch.Tensor:
    """(1 / (count * sigma)) sum_k weights_k table[offset_k : offset_k + length], on the table's device:
    slices gathered from a zero-copy strided view a fixed number of rows at a time, one matrix-vector
    product per chunk, no Python loop over members."""
    weight_tensor = weight_vector(weights, table.device)
    total = torch.zeros(length, dtype=torch.float32, device=table.device)
    chunk = GRAD_CHUNK_ROWS.get(table.device.type, 64)
    for start in range(0, len(offsets), chunk):
        rows = slices(table, offsets[start : start + chunk], length)
        total += torch.mv(rows.T, weight_tensor[start : start + chunk])
    return total / (count * noise_std)
