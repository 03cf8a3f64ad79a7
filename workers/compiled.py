"""The torch.compile cache: each compiled function is built once per process, and falls back to
eager (same bits, slower) where compiling fails. No Ray, no I/O."""

from __future__ import annotations

import logging
import os
import types
import warnings
from collections.abc import Callable

import torch

# Compiled CUDA kernels are Triton, whose default lets ptxas contract a * b + c into one FMA (one
# rounding instead of two): the perturbation theta + scale * slice would then differ from eager torch.
# Off for this process, before anything compiles; the flushing epilogues have no products to contract.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

CACHE: dict[tuple, object] = {}


def cached(key: tuple, build: Callable):
    """One object per key, built on first use: compiled functions are compiled once per process."""
    if key not in CACHE:
        CACHE[key] = build()
    return CACHE[key]


def compiled_functions() -> list[Compiled]:
    """Every compiled function built so far, alone or inside a cached group such as an Epilogues
    (tests check that none fell back to eager)."""
    found = []
    for value in CACHE.values():
        if isinstance(value, Compiled):
            found.append(value)
        else:
            found += [fn for fn in getattr(value, "__dict__", {}).values() if isinstance(fn, Compiled)]
    return found


class Compiled:
    """torch.compile'd function that falls back to eager (same bits, slower) where compiling fails,
    e.g. on a machine without a C++ compiler."""

    def __init__(self, fn: Callable):
        # inductor on a CPU-only machine warns that it found no CUDA runtime: true, and of no use here
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self.eager = fn
        self.compiled = torch.compile(_own_code(fn), dynamic=None)
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as err:  # inductor raises many types; eager is always correct
                warnings.warn(f"torch.compile failed ({type(err).__name__}); using eager", stacklevel=2)
                self.failed = True
        return self.eager(*args)


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps its compiled graphs per code object, at most 8
    (torch._dynamo.config.recompile_limit), and guards a closure's captured functions: the closures one
    factory makes (an epilogue per layer, exponent and arithmetic) would share one code object, and the
    ninth would run eager, with a warning. A copy of the code gives each its own entries."""
    if not isinstance(fn, types.FunctionType):
        return fn
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return copy
