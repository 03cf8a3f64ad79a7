"""θ's SHA-256 after each shipped config's first generations, through the public `train` entry point.

A refactor must keep these bits (on one machine: θ's bits depend on the CPU's kernels). Run it before
and after a change and compare the lines:

    python -m benchmarks.theta_bits              # every config in configs/
    python -m benchmarks.theta_bits quick.yaml   # one

Each config trains in-process (``workers.executor=local``: the Ray executor gives the same θ, a test
checks it) in a temporary run directory; a config with a backprop warm start skips it
(``warm_start.epochs=0``), so its ES stage starts from the seed's initialisation.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

from es_service import checkpoint, runner
from es_service.config import load

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GENERATIONS = {"mnist_seed.yaml": 1}  # 1024 full-rank members: a minute a generation on 2 cores
DEFAULT_GENERATIONS = 3


def theta_sha(path: Path, generations: int) -> str:
    overrides = ["workers.executor=local", "warm_start.epochs=0", "warm_start.finetune_epochs=0"]
    config = load(path, overrides)
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        runner.train(config, run_dir, stop_after=generations, quiet=True)
        theta = checkpoint.load(run_dir / "checkpoint.pt")["theta"]
    return hashlib.sha256(theta.contiguous().numpy().tobytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="config file names in configs/ (default: all)")
    names = parser.parse_args().configs or sorted(path.name for path in CONFIGS.glob("*.yaml"))
    for name in names:
        generations = GENERATIONS.get(name, DEFAULT_GENERATIONS)
        print(f"{name} generations={generations} theta_sha256={theta_sha(CONFIGS / name, generations)}", flush=True)


if __name__ == "__main__":
    main()
