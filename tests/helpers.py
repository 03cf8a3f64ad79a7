"""What the tests share besides fixtures (conftest.py owns those): the one tiny config, the real CLI
in a subprocess, a private ``ray start --head``, and the driver loop in-process."""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from es_service.config import Config, from_dict
from es_service.driver import Trainer
from es_service.runs import seed_problem

REPO = Path(__file__).resolve().parents[1]
CLI_DATA_LIMIT_MB = 1536
"""The memory cap of a CLI fed a config that once took 3.4 GB: torch and MNIST fit below it, the config's
expansion would not (RLIMIT_DATA counts the heap and anonymous mappings, not mapped libraries)."""
NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}
"""For a CLI under the cap: the CUDA driver's own reservations are not what the cap measures."""


def cap_cli_memory() -> None:
    """A subprocess's preexec_fn: its RLIMIT_DATA at CLI_DATA_LIMIT_MB."""
    limit = CLI_DATA_LIMIT_MB << 20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


FUZZ_EXAMPLES: Counter[str] = Counter()
"""Examples the fuzz tests (test_fuzz_inputs) passed, by where they ran and how they ended; conftest
prints the totals."""
BIN = Path(sys.executable).parent  # where `ray` and `es-service` are installed
# Client settings that would point a test's commands at some other Ray (or its token)
CLIENT_UNSET = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")

# The one tiny config of the suite, the smallest that still exercises every part of a run: 669,706
# parameters need a noise table of more than that many floats, so 2**20; pop 8 in tiles of 3 members
# spreads a generation over several tiles; a 64-image batch keeps one generation well under a second.
TINY: dict[str, Any] = {
    "seed": 3,
    "generations": 4,
    "es": {"pop_size": 8, "batch_size": 64, "noise_std": 0.02, "learning_rate": 0.01},
    "noise": {"table_size": 1 << 20},
    "workers": {"executor": "local", "device": "cpu", "members_per_tile": 3, "fused": False},
    "eval": {"every": 2, "train_size": 500},
    "checkpoint": {"every": 2},
}


# Activity members on every layer (one pair per unit), with the sigma and step they train with
ACTIVITY = (
    "es.pop_size=0",
    "es.w1.pop_size=1024",
    "es.w1.kind=activity",
    "es.w2.pop_size=1024",
    "es.w2.kind=activity",
    "es.w3.pop_size=20",
    "es.w3.kind=activity",
    "es.noise_std=0.3",
    "es.learning_rate=0.001",
)


def tiny_config(*overrides: str) -> Config:
    """TINY, validated; overrides as in --set (``es.pop_size=4``)."""
    return from_dict(TINY, list(overrides))


def write_config(path: Path, data: Config | dict[str, Any]) -> Path:
    """A YAML config file holding ``data``: a Config, or a raw mapping (which may be invalid on purpose)."""
    if isinstance(data, Config):
        data = data.to_dict()
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mnist_dir() -> Path:
    """The real MNIST folder from ES_DATA_DIR, or skip (CI sets it; never hard-coded here)."""
    env = os.environ.get("ES_DATA_DIR")
    if not env or not Path(env).is_dir():
        pytest.skip("ES_DATA_DIR is not set to a folder with the four MNIST files")
    return Path(env)


# --- the real CLI in a subprocess ---


def cli_env(cache_home: Path | None = None, **extra: str) -> dict[str, str]:
    """A CLI subprocess's environment: this one (real ES_DATA_DIR) without any setting that would point
    the command at some other Ray, the checkout first on PYTHONPATH, the MNIST cache under ``cache_home``
    when given, then ``extra``."""
    env = {name: value for name, value in os.environ.items() if name not in CLIENT_UNSET}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if cache_home is not None:
        env["XDG_CACHE_HOME"] = str(cache_home)
    env.update(extra)
    return env


def _cli_command(args: tuple[Any, ...]) -> list[str]:
    return [sys.executable, "-m", "es_service.cli", *map(str, args)]


def cli(
    *args: Any,
    env: dict[str, str] | None = None,
    cwd: Path | str | None = None,
    check: bool = True,
    timeout: float = 600,
    preexec_fn=None,
) -> subprocess.CompletedProcess:
    """``es-service ARGS`` (as ``python -m es_service.cli``) in a subprocess, as a user runs it, output
    captured as text; ``env`` defaults to ``cli_env()``. ``check``: fail unless it exits 0, showing its output.
    ``preexec_fn`` runs in the child before the command (e.g. to set a resource limit)."""
    result = subprocess.run(
        _cli_command(args),
        env=cli_env() if env is None else env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"es-service {' '.join(map(str, args))}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def start_cli(
    *args: Any, env: dict[str, str] | None = None, cwd: Path | str | None = None, preexec_fn=None
) -> subprocess.Popen:
    """The same command left running: stdout and stderr piped, as text."""
    return subprocess.Popen(
        _cli_command(args),
        env=cli_env() if env is None else env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def finished_run(folder: Path, env: dict[str, str], *overrides: str) -> Path:
    """folder/run: TINY (with ``overrides``) trained to the end by the CLI, for tests that check what
    other commands leave beside them."""
    config = write_config(folder / "tiny.yaml", tiny_config(*overrides))
    cli("train", "--config", config, "--run-dir", folder / "run", "--quiet", env=env, cwd=folder)
    return folder / "run"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path: what "left byte for byte as it was" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``es-service: error: ...`` line of a refused command (asserting there is exactly one)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("es-service: error: ")]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0], f"the error should be the last thing printed:\n{result.stderr}"
    return errors[0]


# --- private Ray heads: their own session, temp dir, ports and token (test_jobs, test_local_cluster) ---


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


@dataclass
class RayHead:
    """A running private head: its dashboard (jobs API) address, auth token and temp dir."""

    address: str
    token: str
    token_file: Path
    temp: Path

    def get(self, path: str, token: str | None = "default") -> dict:
        """GET a dashboard API path with the head's token (or ``token``; None: without one)."""
        return get_json(self.address + path, self.token if token == "default" else token, timeout=10)

    def wait_status(self, job_id: str, wanted: tuple[str, ...], timeout_s: float = 300) -> dict:
        """The job's info once its status is one of ``wanted``; fail, with its logs, if it ends otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.get(f"/api/jobs/{job_id}")
            if info["status"] in wanted:
                return info
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(1)
        logs = self.get(f"/api/jobs/{job_id}/logs").get("logs", "")
        raise AssertionError(f"job {job_id}: {info['status']} ({info.get('message')}), wanted {wanted}\n{logs[-3000:]}")


@contextmanager
def ray_head(num_cpus: int = 3) -> Iterator[RayHead]:
    """``ray start --head --block`` in a session of its own, with its own temp dir, free ports and token
    (``RAY_AUTH_MODE=token``), so it never meets ``~/.ray/auth_token`` or another Ray on the machine;
    jobs write their default run dirs under its temp dir (``ES_RESULTS_ROOT``).

    It is never stopped with ``ray stop``, which kills every Ray process of the user: on exit its
    ``ray start --block`` process gets SIGTERM, which shuts its own node down, then whatever is left of
    it is SIGKILLed: processes in its session, carrying its marker variable or running in its temp dir
    (job drivers run in their own sessions)."""
    pytest.importorskip("ray")
    if not (BIN / "ray").exists() or not (BIN / "es-service").exists():
        pytest.skip(f"`ray` and `es-service` must be installed next to {sys.executable}")
    temp = Path(tempfile.mkdtemp(prefix="esh-", dir="/tmp" if os.path.isdir("/tmp") else None))  # short: sockets
    token = secrets.token_hex(32)
    token_file = temp / "token"
    token_file.write_text(token)
    marker = f"ES_TEST_RAY_HEAD={temp.name}"
    gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics, node_manager = free_ports(8)
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_UNSET + ("ES_DATA_DIR",)}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        ES_TEST_RAY_HEAD=temp.name,
        ES_RESULTS_ROOT=str(temp / "results"),
    )  # jobs inherit the head's environment
    log = open(temp / "head.log", "wb")
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--port={gcs}",
            f"--temp-dir={temp}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}",
            "--disable-usage-stats",
        ],
        cwd=temp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    head = RayHead(f"http://127.0.0.1:{dashboard}", token, token_file, temp)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}: {(temp / 'head.log').read_text()[-3000:]}")
            try:
                head.get("/api/version")
                break
            except (OSError, urllib.error.URLError) as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no jobs API after 180 s: {(temp / 'head.log').read_text()[-3000:]}") from err
                time.sleep(1)
        yield head
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts down its own node on SIGTERM
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        kill_all(own_processes(proc.pid, marker.encode(), str(temp)))
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


# --- the driver loop in-process (test_driver, test_ray_executor, test_report, test_rundir, test_cli_e2e) ---


def run_local(config, mnist, run_dir, generations=None, state=None, merge_tiles=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer.in_process(config, run_dir, seed_problem(config, mnist), state, merge_tiles)
    trainer.run(stop_after=generations)
    return trainer
