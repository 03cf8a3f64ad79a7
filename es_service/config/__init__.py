"""The run configuration: its schema (schema.py, es.py, with what every section shares in base.py),
reading it from YAML and ``--set`` (load.py), its digest (digest.py), and whether a run fits in memory
(memory.py)."""

from es_service.config.base import ConfigError, shown
from es_service.config.digest import digest_of
from es_service.config.es import ESConfig
from es_service.config.load import from_dict, load, parse_override
from es_service.config.memory import check_fits_memory
from es_service.config.schema import (
    DEVICES,
    GRADIENTS,
    WARM_START_STAGES,
    Config,
    WarmStartConfig,
    WorkersConfig,
)

__all__ = [
    "DEVICES",
    "GRADIENTS",
    "WARM_START_STAGES",
    "Config",
    "ConfigError",
    "ESConfig",
    "WarmStartConfig",
    "WorkersConfig",
    "check_fits_memory",
    "digest_of",
    "from_dict",
    "load",
    "parse_override",
    "shown",
]
