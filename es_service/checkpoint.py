"""Checkpoints: one dict, written atomically (temporary file, then os.replace).

Holds theta, the Adam state, the generation, the seeds (the only RNG state: every generation's
randomness derives from (seed, generation), see plan.py), the config and its digest, and the noise
table's seed and size. Loading refuses a checkpoint whose layout or trajectory config does not match.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from es_service import network
from es_service.config import Config, ConfigError, digest_of, from_dict

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what is wrong and what to do."""


def build(
    config: Config, theta: torch.Tensor, optimizer_state: dict, generation: int, noise_seed: int
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "theta": theta.detach().cpu().clone(),
        "optimizer": optimizer_state,
        "generation": generation,
        "rng": {"seed": config.seed, "scheme": "numpy PCG64 per generation from (derived seed, generation)"},
        "noise": {"seed": noise_seed, "table_size": config.noise.table_size},
        "config": config.to_dict(),
        "config_digest": config.digest(),
        "layout": [[name, list(shape)] for name, shape in network.PARAM_SHAPES],
    }


def save(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint; raise CheckpointError naming the problem and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass a checkpoint.pt from a run directory")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:200]}); "
            "it is corrupt or not a checkpoint: use another one from the run directory"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not an es-service checkpoint of format {FORMAT_VERSION}"
        )
    layout = [[name, list(shape)] for name, shape in network.PARAM_SHAPES]
    theta = state.get("theta")
    if state.get("layout") != layout or not isinstance(theta, torch.Tensor) or theta.shape != (network.NUM_PARAMS,):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has a parameter layout other than this network's {network.LAYER_SIZES}"
        )
    if theta.dtype != torch.float32:
        raise CheckpointError(f"checkpoint {str(path)!r}: theta is {theta.dtype}, expected torch.float32")
    try:
        config = from_dict(state["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} holds an invalid config: {err}") from None
    if digest_of(state["config"]) != state.get("config_digest"):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its config does not match its digest (edited by hand?); "
            "restore the original config or start a new run"
        )
    state["config"] = config
    return state
