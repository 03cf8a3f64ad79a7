"""es-service: OpenAI-style evolution strategies as a Ray population service, and as a library.

    from es_service import Config, Problem, train

``Problem`` is what a population is evaluated on (the seed's network is one: es_workers.ftz_mnist);
``OpenES`` is the strategy (ask, tell, the estimate and Adam's step); ``train`` and ``resume`` run it
through the in-process or the Ray executor, with run directories, checkpoints and metrics.
"""

from es_service.api import resume, train
from es_service.config import Config, ConfigError
from es_service.config import load as load_config
from es_service.strategy import OpenES
from es_workers.problem import Problem

__all__ = ["Config", "ConfigError", "OpenES", "Problem", "load_config", "resume", "train"]
