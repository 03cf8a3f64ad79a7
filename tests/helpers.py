"""Plain helpers shared by the config, checkpoint and CLI tests (no fixtures: conftest.py owns those)."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from es_service import plan as planning
from es_service.driver import Trainer, TrainState
from es_service.executors import LocalExecutor
from workers import layer_members, noise

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # where `ray` and `es-service` are installed
# Client settings that would point a test's commands at some other Ray (or its token)
CLIENT_UNSET = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")

# The smallest config that still exercises every part of a run: 669,706 parameters need a table of at
# least that many floats, so 2**20; pop 4 and a 32-image batch keep one generation well under a second.
TINY: dict[str, Any] = {
    "seed": 3,
    "generations": 3,
    "network": {"arithmetic": "tf-ftz"},
    "es": {"pop_size": 4, "batch_size": 32, "noise_std": 0.02, "learning_rate": 0.01},
    "noise": {"table_size": 1 << 20},
    "workers": {"executor": "local", "device": "cpu", "fused": False},
    "eval": {"every": 2, "train_size": 500},
    "checkpoint": {"every": 2},
}


def tiny_dict(**sections: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of TINY with some sections' fields replaced, e.g. ``tiny_dict(es={"pop_size": 6})``."""
    data = copy.deepcopy(TINY)
    for name, fields in sections.items():
        if isinstance(fields, dict) and isinstance(data.get(name), dict):
            data[name].update(fields)
        else:
            data[name] = fields
    return data


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mnist_dir() -> Path:
    """The real MNIST folder from ES_DATA_DIR, or skip (CI sets it; never hard-coded here)."""
    env = os.environ.get("ES_DATA_DIR")
    if not env or not Path(env).is_dir():
        pytest.skip("ES_DATA_DIR is not set to a folder with the four MNIST files")
    return Path(env)


def cli_env(cache_home: Path) -> dict[str, str]:
    """The subprocess environment: real ES_DATA_DIR, MNIST cache under the test's tmp dir, no cluster."""
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(cache_home)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m es_service.cli ARGS`` exactly as a user would run it; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "es_service.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``es-service: error: ...`` line of a refused command (asserting there is exactly one)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("es-service: error: ")]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0], f"the error should be the last thing printed:\n{result.stderr}"
    return errors[0]


# --- private Ray heads started by tests (test_jobs, test_local_cluster) ---

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def get_json(url: str, token: str | None, timeout: float = 20) -> dict:
    """GET a Ray dashboard API URL, with a bearer token when given."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def own_processes(session: int | None, marker: bytes, temp: str) -> dict[int, str]:
    """Live (non-zombie) processes of a test's own Ray: in its session, carrying its marker variable,
    or with its temp dir in their command line or working directory (Linux /proc). pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            mine = session is not None and os.getsid(pid) == session
            mine = mine or marker in (entry / "environ").read_bytes()
            mine = mine or temp in cmdline or os.readlink(entry / "cwd").startswith(temp)
        except (OSError, ValueError):
            continue
        if mine:
            found[pid] = cmdline[:200]
    return found


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# --- the driver loop in-process (test_driver, test_ray_executor, test_report, test_rundir, test_cli_e2e) ---

def basis_of(config, mnist):
    """Layer-1 members' subspace, as the runner computes it (None when the config has none)."""
    subspace = config.es.w1.subspace
    return layer_members.image_basis(mnist.train_images, subspace) if subspace else None


def run_local(config, mnist, run_dir, generations=None, state=None, merge_tiles=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    noise_seed = planning.noise_seed(config.seed)
    table = noise.make_table(noise_seed, config.noise.table_size)
    basis = basis_of(config, mnist)
    executor = LocalExecutor(table, mnist.train_images, mnist.train_labels, config.network.arithmetic, "cpu",
                             merge_tiles=merge_tiles, basis=basis)
    if state is None:
        state = TrainState(planning.seed_theta(config.seed), None, 0)
    trainer = Trainer(config, run_dir, mnist, table, noise_seed, executor, state, basis=basis)
    trainer.run(stop_after=generations)
    return trainer
