"""Checkpoints: one dict, written atomically (rundir.atomic_write).

Holds theta, the Adam state, the generation, the seeds (the only RNG state: every generation's
randomness derives from (seed, generation), see plan.py), the config and its digest, and the noise
table's seed and size. Loading checks every field, and refuses a checkpoint whose layout or trajectory
config does not match, or whose theta or Adam state holds inf or nan.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch

from es_service import rundir
from es_service.config import Config, ConfigError, digest_of, from_dict

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what is wrong and what to do."""


Layout = list[tuple[str, tuple[int, ...]]]
"""theta's named blocks (es_workers.problem.Problem.layout)."""


def build(
    config: Config,
    theta: torch.Tensor,
    optimizer_state: dict,
    generation: int,
    noise_seed: int,
    layout: Layout | None = None,
) -> dict[str, Any]:
    """A checkpoint's contents; ``layout``: theta's (None: the config's network's)."""
    layout = layout or config.network.architecture().param_shapes
    return {
        "format_version": FORMAT_VERSION,
        "theta": theta.detach().cpu().clone(),
        "optimizer": optimizer_state,
        "generation": generation,
        "rng": {"seed": config.seed, "scheme": "numpy PCG64 per generation from (derived seed, generation)"},
        "noise": {"seed": noise_seed, "table_size": config.noise.table_size},
        "config": config.to_dict(),
        "config_digest": config.digest(),
        "layout": _listed(layout),
    }


def _config(path: Path, state: dict[str, Any]) -> Config:
    try:
        return from_dict(state["config"])
    except (ConfigError, KeyError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} holds an invalid config: {err}") from None


def _listed(layout: Layout) -> list:
    return [[name, list(shape)] for name, shape in layout]


def save(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # serialised first: a pickling error then never touches the disk
    torch.save(state, buffer)
    rundir.atomic_write(path, buffer.getbuffer())


def load(path: str | Path, layout: Layout | None = None) -> dict[str, Any]:
    """Read and check a checkpoint of a theta laid out as ``layout`` (None: the seed's network, shaped
    as the checkpoint's config says); raise CheckpointError naming the problem and the fix."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a directory; pass the checkpoint file in it, e.g. {str(path / 'checkpoint.pt')!r}"
        )
    if path.exists() and not path.is_file():  # a pipe or a device: reading it could block or never end
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a regular file; pass a checkpoint.pt from a run directory"
        )
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
        raise CheckpointError(f"checkpoint {str(path)!r} is not an es-service checkpoint of format {FORMAT_VERSION}")
    if layout is None:
        arch = _config(path, state).network.architecture()
        layout, expected = arch.param_shapes, arch.layer_sizes
    else:
        expected = [name for name, _ in layout]
    theta, num_params = state.get("theta"), sum(math.prod(shape) for _, shape in layout)
    if state.get("layout") != _listed(layout) or not isinstance(theta, torch.Tensor) or theta.shape != (num_params,):
        raise CheckpointError(f"checkpoint {str(path)!r} has a parameter layout other than this network's {expected}")
    if theta.dtype != torch.float32:
        raise CheckpointError(f"checkpoint {str(path)!r}: theta is {theta.dtype}, expected torch.float32")
    config = _config(path, state)
    if digest_of(state["config"]) != state.get("config_digest"):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its config does not match its digest (edited by hand?); "
            "restore the original config or start a new run"
        )
    problem = _field_problem(state, config, num_params)
    if problem:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {problem}; it is damaged or was not written by "
            "es-service: use another checkpoint"
        )
    if not bool(torch.isfinite(theta).all()):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a theta with inf or nan (the run diverged); "
            "use an earlier checkpoint or start a new run with a smaller es.learning_rate"
        )
    if not _finite_moments(state["optimizer"]):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds an optimizer state with inf or nan; "
            "use an earlier checkpoint or start a new run"
        )
    state["config"] = config
    return state


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _field_problem(state: dict[str, Any], config: Config, num_params: int) -> str | None:
    """What is wrong with the fields besides theta and the config, or None."""
    if not _is_count(state.get("generation")):
        return f"generation is {state.get('generation')!r}, expected an integer >= 0"
    noise = state.get("noise")
    if not isinstance(noise, dict) or not _is_count(noise.get("seed")):
        return f"noise is {noise!r}, expected {{'seed': integer >= 0, 'table_size': integer}}"
    if noise.get("table_size") != config.noise.table_size:
        return f"noise.table_size is {noise.get('table_size')!r} but its config says {config.noise.table_size}"
    optimizer = state.get("optimizer")
    if (
        not isinstance(optimizer, dict)
        or not isinstance(optimizer.get("state"), dict)
        or not isinstance(optimizer.get("param_groups"), list)
        or len(optimizer["param_groups"]) != 1
    ):
        return "optimizer is not the state of one torch Adam over theta"
    for moments in optimizer["state"].values():
        for name in ("exp_avg", "exp_avg_sq"):
            value = moments.get(name) if isinstance(moments, dict) else None
            if not isinstance(value, torch.Tensor) or value.shape != (num_params,) or value.dtype != torch.float32:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                return f"optimizer {name} is {shape}, expected float32 of shape ({num_params},)"
        if not isinstance(moments.get("step"), (torch.Tensor, int, float)):
            return "optimizer step count is missing"
    return None


def _finite_moments(optimizer: dict) -> bool:
    return all(
        bool(torch.isfinite(torch.as_tensor(value)).all())
        for moments in optimizer["state"].values()
        for value in moments.values()
    )
