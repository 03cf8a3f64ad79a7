"""es-service: OpenAI-style evolution strategies as a Ray population service, and as a library.

    from es_service import Config, Problem, train

``Problem`` is what a population is evaluated on (the seed's network is one: es_workers.ftz_mnist);
``OpenES`` is the strategy (ask, tell, the estimate and Adam's step); ``train`` and ``resume`` run it
through the in-process or the Ray executor, with run directories, checkpoints and metrics.

The names load on first use, so that ``import es_service.config`` or the CLI's light commands do not
import torch and Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Config": ("es_service.config", "Config"),
    "ConfigError": ("es_service.config", "ConfigError"),
    "load_config": ("es_service.config", "load"),
    "OpenES": ("es_service.strategy", "OpenES"),
    "Problem": ("es_workers.problem", "Problem"),
    "ProblemError": ("es_workers.problem", "ProblemError"),
    "train": ("es_service.api", "train"),
    "resume": ("es_service.api", "resume"),
}
__all__ = ["Config", "ConfigError", "OpenES", "Problem", "ProblemError", "load_config", "resume", "train"]

if TYPE_CHECKING:
    from es_service.api import resume, train
    from es_service.config import Config, ConfigError
    from es_service.config import load as load_config
    from es_service.strategy import OpenES
    from es_workers.problem import Problem, ProblemError


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'es_service' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
