"""The fake autoscaling cluster of ``cluster/local.sh`` end to end: zero workers to elastic and back.

``cluster/local.sh start`` brings up a head with 2 CPUs and the fake autoscaler (``cluster/local.yaml``:
up to 3 fake 1-CPU worker nodes). An ES job submitted with ``es-service submit`` and ``workers.count=0``
asks the autoscaler for ``workers.max_count`` 1-CPU bundles through ``request_resources``; fake nodes
join, the job's pool grows past the 2 workers the head alone can hold (``workers_alive`` in
``metrics.jsonl``), the job succeeds and withdraws its request, and the idle nodes leave again.
``cluster/local.sh stop`` then leaves no process of the cluster behind and touches nothing else.

The cluster is the module's own: its temp dir, state file, GCS/dashboard/client ports and auth token
(``RAY_AUTH_TOKEN_PATH``) are fresh, so it never meets ``/tmp/ray``, ``~/.ray/auth_token`` or another
Ray instance on the machine, and it is never stopped with ``ray stop`` (which kills every Ray process of
the user). Every process of it carries a marker variable in its environment, which the final check and
the emergency cleanup use besides its session id and temp dir.

The second test is the workflow exactly as ``local.sh start`` prints it, as a new user runs it: a fresh
HOME (local.sh creates ``~/.ray/auth_token`` there, mode 0600), the printed ``es-service submit`` line
with no ``--run-dir`` and no token option, and fake nodes joining while the job runs. Every fake node
shares the head's session dir; before the fix a joining node's runtime-env agent re-extracted the job's
working_dir there, deleting the driver's current directory (the relative run dir failed with
FileNotFoundError) and the one workers were starting in (MKL aborts torch's import without a current
directory). Asserted: the job succeeds, its run dir is under the default results root, no generation
counts a worker failure, no worker actor was ever replaced, and no worker log has MKL's fatal error.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import (
    BIN,
    CLIENT_UNSET,
    REPO,
    cli,
    cli_env,
    free_ports,
    get_json,
    kill_all,
    mnist_dir,
    own_processes,
)

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

LOCAL_SH = REPO / "cluster" / "local.sh"
HEAD_CPUS = 2  # cluster/local.sh's default; 1-CPU workers, so the head alone holds 2
MAX_WORKERS = 3
# Long enough that the job outlives a fake node's start and its worker's start (~10-15 s after submitting on a
# busy 2-core machine) with room to spare: a generation of this size takes ~0.06 s. No eval but the final one.
GENERATIONS = 400
OVERRIDES = [
    f"generations={GENERATIONS}",
    "seed=11",
    "es.pop_size=8",
    "es.batch_size=64",
    "noise.table_size=1048576",
    "eval.train_size=500",
    f"eval.every={GENERATIONS}",
    "checkpoint.every=100",
    "workers.members_per_tile=2",
    "workers.count=0",
    "workers.min_count=1",
    f"workers.max_count={MAX_WORKERS}",
    "workers.cpus_per_worker=1",
    "workers.fused=false",
]
FAKE_NODE_PREFIX = "fffffffffffffffffffffffffffffffffffffffffffffffffff"  # the fake provider's node ids


class LocalCluster:
    """``cluster/local.sh`` run with the module's own temp dir, state file, ports and token."""

    def __init__(self, root: Path, user_home: Path | None = None):
        """``user_home``: run as a user with that HOME and no token yet (local.sh makes ~/.ray/auth_token);
        otherwise the module's own token file, through RAY_AUTH_TOKEN_PATH."""
        self.root = root
        self.temp = root / "ray"  # the cluster's --temp-dir (short: Ray's unix sockets live under it)
        self.state = root / "state"
        if user_home is None:
            self.token = secrets.token_hex(32)
            self.token_file = root / "token"
            self.token_file.write_text(self.token)
        else:
            self.token = ""  # read once local.sh has made it
            self.token_file = user_home / ".ray" / "auth_token"
        self.marker = f"ES_LOCAL_CLUSTER_TEST={root.name}"
        dashboard, gcs, client = free_ports(3)
        self.address = f"http://127.0.0.1:{dashboard}"
        env = {k: v for k, v in os.environ.items() if k not in CLIENT_UNSET + ("ES_DATA_DIR",)}
        env.update(
            ES_LOCAL_TEMP_DIR=str(self.temp),
            ES_LOCAL_STATE=str(self.state),
            ES_LOCAL_DASHBOARD_PORT=str(dashboard),
            ES_LOCAL_GCS_PORT=str(gcs),
            ES_LOCAL_CLIENT_PORT=str(client),
            ES_LOCAL_AGENT_PORT="0",
            ES_LOCAL_HEAD_CPUS=str(HEAD_CPUS),
            RAY=str(BIN / "ray"),
            RAY_USAGE_STATS_ENABLED="0",
            XDG_CACHE_HOME=str(root / "cache"),
            TMPDIR=str(root),
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            ES_LOCAL_CLUSTER_TEST=root.name,
        )
        env.pop("ES_RESULTS_ROOT", None)
        if user_home is None:
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        else:
            env["HOME"] = str(user_home)
        self.env = env
        self.pgid: int | None = None
        self.gcs_address = ""

    def sh(self, command: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(LOCAL_SH), command], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )

    def start(self) -> str:
        result = self.sh("start")
        state = self.read_state()  # also after a failed start: the emergency cleanup needs the group id
        assert result.returncode == 0, f"local.sh start: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        assert state.get("TEMP_DIR_USED") == str(self.temp), state
        return result.stdout

    def read_state(self) -> dict[str, str]:
        if not self.state.is_file():
            return {}
        state = dict(line.split("=", 1) for line in self.state.read_text().splitlines() if "=" in line)
        if state.get("PGID", "").isdigit():
            self.pgid = int(state["PGID"])
        self.gcs_address = state.get("ADDRESS", "")
        return state

    def processes(self) -> dict[int, str]:
        return own_processes(self.pgid, self.marker.encode(), str(self.temp))

    def get(self, path: str, token: str | None = "default"):
        return get_json(self.address + path, self.token if token == "default" else token)

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes from the state API: node_id, is_head_node, resources_total, ..."""
        reply = self.get("/api/v0/nodes?limit=100&detail=true")
        return [node for node in reply["data"]["result"]["result"] if node["state"] == "ALIVE"]

    def emergency_cleanup(self) -> None:
        """After a failed test: local.sh stop, then SIGKILL whatever of the cluster is still alive."""
        try:
            if self.state.is_file():
                self.sh("stop", timeout=120)
        except subprocess.TimeoutExpired:
            pass
        kill_all(self.processes())


def first_nodes(cluster) -> list:
    """The alive nodes, once a new head's state API answers (within 60 s)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return cluster.alive_nodes()
        except (OSError, urllib.error.URLError, KeyError):
            assert time.monotonic() < deadline, "the state API of the new head never answered"
            time.sleep(1)


def fake_workers(nodes: list[dict]) -> list[dict]:
    return [node for node in nodes if not node["is_head_node"]]


def ray_status_active(output: str) -> dict[str, int]:
    """``Active:`` node counts by node type from ``ray status`` output, e.g. {"ray.head.default": 1}."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Active:")
    active = {}
    for line in lines[start + 1 :]:
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            break
        active[parts[1]] = int(parts[0])
    return active


def sentinels(root: Path) -> list[subprocess.Popen]:
    """Two processes that are not the cluster's: a plain sleep, and one that `ray stop` would kill (its
    executable is named ``raylet`` and lives in a ``.../ray/...`` folder), each in a session of its own."""
    fake_ray = root / "other" / "ray" / "raylet"
    fake_ray.parent.mkdir(parents=True)
    shutil.copy(shutil.which("sleep"), fake_ray)
    env = {k: v for k, v in os.environ.items()}
    return [
        subprocess.Popen(
            [str(exe), "600"], env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for exe in (shutil.which("sleep"), fake_ray)
    ]


def _cluster_fixture(own_home: bool):
    pytest.importorskip("ray")
    if not (BIN / "ray").exists() or not (BIN / "es-service").exists():
        pytest.skip(f"`ray` and `es-service` must be installed next to {sys.executable}")
    if sys.platform != "linux":
        pytest.skip("the process checks read /proc")
    root = Path(tempfile.mkdtemp(prefix="esl-", dir="/tmp" if os.path.isdir("/tmp") else None))
    home = root / "home" if own_home else None
    if home is not None:
        home.mkdir()
    cluster = LocalCluster(root, home)
    try:
        yield cluster
    finally:
        cluster.emergency_cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def local_cluster():
    yield from _cluster_fixture(own_home=False)


@pytest.fixture
def new_user_cluster():
    yield from _cluster_fixture(own_home=True)


def test_zero_workers_to_elastic_job_and_clean_teardown(local_cluster, tmp_path):
    data_dir = mnist_dir()
    cluster = local_cluster
    user_token = Path("~/.ray/auth_token").expanduser()
    user_token_before = user_token.read_bytes() if user_token.is_file() else None
    others = sentinels(cluster.root)
    timings = {}
    try:
        # -- start: the head alone, token auth on ---------------------------------------------------------
        started = time.monotonic()
        out = cluster.start()
        timings["start"] = time.monotonic() - started
        assert f"temp dir {cluster.temp}" in out and cluster.pgid and cluster.gcs_address, out
        assert cluster.gcs_address.endswith(f":{cluster.env['ES_LOCAL_GCS_PORT']}"), cluster.gcs_address
        nodes = first_nodes(cluster)
        assert len(nodes) == 1 and nodes[0]["is_head_node"], nodes
        assert nodes[0]["resources_total"]["CPU"] == HEAD_CPUS, nodes
        with pytest.raises(urllib.error.HTTPError) as refused:
            cluster.get("/api/jobs/", token=None)
        assert refused.value.code == 401  # token authentication is on (and the token is the module's own)
        deadline = time.monotonic() + 60
        while True:  # `ray status` says "No cluster status" until the autoscaler's first report
            status = cluster.sh("status", timeout=120)
            assert status.returncode == 0, status
            if "Active:" in status.stdout:
                break
            assert time.monotonic() < deadline, status.stdout
            time.sleep(2)
        assert ray_status_active(status.stdout) == {"ray.head.default": 1}, status.stdout

        # -- submit: the job asks the autoscaler for 3 one-CPU workers -------------------------------------
        run_dir = tmp_path / "run"
        client_env = cli_env(ES_DATA_DIR=str(data_dir), HOME=str(tmp_path))  # no ~/.ray/auth_token to fall back on
        submit = cli(
            "submit",
            "--address",
            cluster.address,
            REPO / "configs" / "quick.yaml",
            "--run-dir",
            run_dir,
            "--no-wait",
            "--token-file",
            cluster.token_file,
            *[arg for item in OVERRIDES for arg in ("--set", item)],
            env=client_env,
            cwd=tmp_path,
            timeout=120,
        )
        job_id = submit.stdout.splitlines()[0].strip()
        submitted = time.monotonic()

        # -- watch: fake nodes join while the job runs -------------------------------------------------------
        most_fake, job = 0, {}
        deadline = submitted + 240
        while time.monotonic() < deadline:
            job = cluster.get(f"/api/jobs/{job_id}")
            joined = fake_workers(cluster.alive_nodes())
            assert all(node["resources_total"]["CPU"] == 1 for node in joined), joined
            most_fake = max(most_fake, len(joined))
            if most_fake and "first_node" not in timings:
                timings["first_node"] = time.monotonic() - submitted
            if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(1)
        timings["job"] = time.monotonic() - submitted
        logs = cluster.get(f"/api/jobs/{job_id}/logs").get("logs", "")
        assert job["status"] == "SUCCEEDED", f"job {job_id}: {job['status']} ({job.get('message')})\n{logs[-3000:]}"
        assert most_fake >= 1, f"no fake worker node joined during the job\n{logs[-3000:]}"
        assert most_fake <= MAX_WORKERS
        timings["fake_nodes"] = most_fake

        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["generation"] for r in records] == list(range(1, GENERATIONS + 1))
        alive = [r["workers_alive"] for r in records]
        assert max(alive) > HEAD_CPUS, f"workers_alive never exceeded the head's {HEAD_CPUS}: {alive}"
        assert max(alive) <= MAX_WORKERS, alive
        assert [r["worker_failures"] for r in records] == [0] * GENERATIONS, [r["worker_failures"] for r in records]
        assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
        runs = []  # run-length summary, e.g. "1x16 2x42 3x342"
        for count in alive:
            if runs and runs[-1][0] == count:
                runs[-1][1] += 1
            else:
                runs.append([count, 1])
        timings["workers_alive"] = " ".join(f"{count}x{length}" for count, length in runs)

        # -- after the job: its request is withdrawn, so the idle fake nodes leave (idle timeout 12 s) -------
        deadline = time.monotonic() + 90
        while fake_workers(cluster.alive_nodes()):
            assert time.monotonic() < deadline, (
                "fake worker nodes still up 90 s after the job ended (request_resources not withdrawn?)\n"
                + cluster.sh("status", timeout=120).stdout
            )
            time.sleep(1)
        timings["scale_down"] = time.monotonic() - submitted - timings["job"]

        # -- stop: nothing of the cluster is left, nothing else was touched -----------------------------------
        assert cluster.processes(), "the cluster's processes are not found by the check below"
        stopped = time.monotonic()
        result = cluster.sh("stop", timeout=120)
        timings["stop"] = time.monotonic() - stopped
        assert result.returncode == 0, f"local.sh stop: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        assert "stopped: no process of the cluster" in result.stdout, result.stdout
        assert not cluster.processes(), cluster.processes()
        assert not cluster.state.exists()
        for proc in others:
            assert proc.poll() is None, f"local.sh stop killed an unrelated process: {proc.args}"
        assert (user_token.read_bytes() if user_token.is_file() else None) == user_token_before
        print("timings (s):", {k: round(v, 1) if isinstance(v, float) else v for k, v in timings.items()})
    finally:
        for proc in others:
            proc.kill()
            proc.wait()


def test_printed_workflow_with_the_default_run_dir_and_nodes_joining_mid_run(new_user_cluster):
    data_dir = mnist_dir()
    cluster = new_user_cluster
    home = Path(cluster.env["HOME"])
    out = cluster.start()
    assert stat.S_IMODE(cluster.token_file.stat().st_mode) == 0o600, oct(cluster.token_file.stat().st_mode)
    assert stat.S_IMODE(cluster.token_file.parent.stat().st_mode) == 0o700
    cluster.token = cluster.token_file.read_text().strip()
    (submit_line,) = [line.strip() for line in out.splitlines() if line.strip().startswith("es-service submit")]
    assert submit_line == f"es-service submit --address {cluster.address} configs/quick.yaml", out
    nodes = first_nodes(cluster)
    assert not fake_workers(nodes), nodes  # every fake node that shows up below joined because of the job

    # the printed line, from the repository root, by a user whose only token is the one local.sh made
    client_env = {k: v for k, v in os.environ.items() if k not in CLIENT_UNSET + ("ES_RESULTS_ROOT",)}
    client_env.update(
        HOME=str(home),
        ES_DATA_DIR=str(data_dir),
        PATH=cluster.env["PATH"],
        XDG_CACHE_HOME=str(cluster.root / "client-cache"),
    )
    generations = 30
    submit = subprocess.Popen(
        shlex.split(submit_line) + ["--set", f"generations={generations}"],
        env=client_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        most_fake, joined_while_running = 0, False
        deadline = time.monotonic() + 600
        while submit.poll() is None:
            assert time.monotonic() < deadline, "the submitted job did not end within 10 minutes"
            joined = len(fake_workers(cluster.alive_nodes()))
            most_fake = max(most_fake, joined)
            if joined:
                jobs = cluster.get("/api/jobs/")
                joined_while_running |= any(job.get("status") == "RUNNING" for job in jobs)
            time.sleep(1)
        stdout, stderr = submit.communicate(timeout=60)
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.communicate()
    assert submit.returncode == 0, f"submit: exit {submit.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    job_id = stdout.splitlines()[0].strip()
    assert f"job {job_id} SUCCEEDED" in stderr, stderr
    assert joined_while_running and 1 <= most_fake <= MAX_WORKERS, (most_fake, joined_while_running)

    run_dir = home / "es-service-runs" / f"quick-{job_id}"  # the default results root under the head's HOME
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == list(range(1, generations + 1))
    assert [r["worker_failures"] for r in records] == [0] * generations, records
    alive = [r["workers_alive"] for r in records]
    assert max(alive) > HEAD_CPUS, f"the pool never grew past the head's {HEAD_CPUS} workers: {alive}"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    status = json.loads(
        cli("status", "--address", cluster.address, job_id, env=client_env, cwd=REPO, timeout=120).stdout
    )
    assert status["run_dir"] == f"${{ES_RESULTS_ROOT:-~/es-service-runs}}/quick-{job_id}", status

    # no worker actor died and was replaced, not even before the first generation
    actors = cluster.get("/api/v0/actors?limit=1000&detail=true")["data"]["result"]["result"]
    workers = [a for a in actors if a.get("class_name") == "PopulationWorker"]
    assert len(workers) == max(alive), [(a["actor_id"], a["state"], a.get("death_cause")) for a in workers]
    fatal = [
        path.name
        for path in cluster.temp.glob("session_*/logs/*")
        if path.is_file() and b"oneMKL FATAL" in path.read_bytes()
    ]
    assert not fatal, fatal

    result = cluster.sh("stop", timeout=120)
    assert result.returncode == 0, f"local.sh stop: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert not cluster.processes(), cluster.processes()
