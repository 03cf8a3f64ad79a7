"""The Python entry points: ``train`` and ``resume`` a run of the seed's network or of your own ``Problem``.

    from es_service import Config, Problem, train

They are the CLI's `es-service train` and `es-service resume` (es_service/runner.py) with a problem
argument: the same run directory, checkpoints, metrics (metrics.jsonl and TensorBoard events) and
executors.
"""

from __future__ import annotations

from pathlib import Path

from es_service import runner
from es_service.config import Config, load
from es_workers.problem import Problem


def train(
    config: Config | str | Path,
    problem: Problem | None = None,
    run_dir: str | Path | None = None,
    *,
    force: bool = False,
    address: str | None = None,
    stop_after: int | None = None,
    time_budget_s: float | None = None,
    init_from: str | Path | None = None,
    quiet: bool = True,
) -> dict:
    """Train ``problem`` (default: the seed's network on MNIST) as ``config`` (a Config or a YAML
    file) says, in ``run_dir`` (default runs/<config>-<time>); returns the last generation and the
    center's metrics. ``force`` replaces an existing run directory; ``address``: a Ray cluster's
    (with ``workers.executor: ray``; default a local embedded Ray, shut down on return; a Ray you
    started with ``ray.init`` is used and left running); ``stop_after`` generations or
    ``time_budget_s`` seconds, then checkpoint; ``init_from``: start from a checkpoint's theta."""
    if not isinstance(config, Config):
        config_path, config = Path(config), load(config)
        run_dir = run_dir or runner.default_run_dir(config_path)
    run_dir = Path(run_dir or runner.default_run_dir("run"))
    init_from = None if init_from is None else Path(init_from)
    return runner.train(
        config, run_dir, force, address, stop_after, time_budget_s, quiet, init_from=init_from, problem=problem
    )


def resume(
    run_dir: str | Path,
    problem: Problem | None = None,
    *,
    overrides: list[str] = (),
    address: str | None = None,
    stop_after: int | None = None,
    time_budget_s: float | None = None,
    quiet: bool = True,
) -> dict:
    """Continue the run in ``run_dir`` from its checkpoint; ``problem``: the one it trained, when not
    the seed's network. ``overrides``: --set style fields that do not change theta's path."""
    return runner.resume(Path(run_dir), list(overrides), address, stop_after, time_budget_s, quiet, problem)
