"""The torch.compile cache (es_workers/compiled.py): many closures of one factory each compile."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from es_workers.compiled import Compiled


def _scaled_by(k: float):
    inner = eval(f"lambda z: z * {k}")  # a function of its own per closure, as each layer's epilogue is

    def layer(z, b):
        return inner(z) + b

    return layer


def test_closures_of_one_factory_each_get_a_compiled_graph():
    """Past dynamo's recompile limit (8 graphs per code object) a shared code object would run eager."""
    functions = [Compiled(_scaled_by(float(k))) for k in range(10)]
    z, b = torch.arange(4.0), torch.ones(4)
    before = counters["stats"]["unique_graphs"]
    for k, fn in enumerate(functions):
        assert torch.equal(fn(z, b), z * k + b)
    assert counters["stats"]["unique_graphs"] - before == len(functions)
    assert not any(fn.failed for fn in functions)
