"""``es-service submit/status/logs/stop/list`` against a real Ray head with token authentication on.

The module's head is a private ``ray start --head`` (``tests.helpers.ray_head``): its own session, temp
dir, free ports and token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``), so it never touches
``~/.ray/auth_token`` or any other Ray on the machine (another test's in-process cluster, a user's
``ray start``), and it is never stopped with ``ray stop``.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
import urllib.error
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY, cli, cli_env, free_ports, ray_head, start_cli, tiny_config, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

# TINY as a job: one worker actor, two generations, a checkpoint after each
JOB = ("workers.executor=ray", "workers.count=1", "generations=2", "checkpoint.every=1", "eval.train_size=200")


@pytest.fixture(scope="module")
def head():
    with ray_head() as running:
        yield running


def job_config(path: Path, *overrides: str) -> Path:
    return write_config(path, tiny_config(*JOB, *overrides))


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bad_config_fails_locally_without_contacting_the_cluster(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    address = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        bad = write_config(tmp_path / "bad.yaml", {**TINY, "es": {**TINY["es"], "pop_size": 5}})
        result = cli("submit", "--address", address, bad, "--no-wait", check=False)
        assert result.returncode == 2, result
        assert result.stderr.startswith("es-service: error: es.pop_size: 5 is odd"), result.stderr
        result = cli("submit", "--address", address, tmp_path / "good.yaml", "--no-wait", check=False)
        assert result.returncode == 2 and "does not exist" in result.stderr, result
        result = cli(
            "submit", "--address", address, job_config(tmp_path / "good.yaml"), "--set", "generations=0", check=False
        )
        assert result.returncode == 2 and "generations: 0" in result.stderr, result
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked
    finally:
        listener.close()
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    result = cli(
        "submit", "--address", closed, tmp_path / "good.yaml", "--no-wait", check=False, env=cli_env(HOME=str(tmp_path))
    )  # no ~/.ray/auth_token: no warning about its mode either
    assert result.returncode == 1, result
    assert "cannot reach the Ray jobs API" in result.stderr and "--address" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_three_concurrent_jobs_each_with_its_own_run_dir(head, tmp_path):
    configs = {
        "alpha": (job_config(tmp_path / "alpha.yaml"), None),
        "beta": (job_config(tmp_path / "beta.yaml", "generations=3", "seed=6"), tmp_path / "runs" / "beta"),
        "gamma": (job_config(tmp_path / "gamma.yaml", "generations=3", "seed=7"), tmp_path / "runs" / "gamma"),
    }
    env = cli_env(RAY_AUTH_TOKEN=head.token)  # also checks the token from the environment
    started = time.monotonic()
    procs = {}
    for name, (config, run_dir) in configs.items():
        args = ["submit", "--address", head.address, config, "--set", "eval.train_size=100"]
        args += ["--run-dir", run_dir] if run_dir else []
        args += [] if name == "gamma" else ["--no-wait"]  # gamma waits for its job and streams its logs
        procs[name] = start_cli(*args, env=env)
    outputs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{out}\n{err}"
        outputs[name] = (out, err)
    ids = {name: out.splitlines()[0].strip() for name, (out, _) in outputs.items()}
    assert len(set(ids.values())) == 3 and all(i.startswith("es-") for i in ids.values()), ids
    assert '"generation": 3' in outputs["gamma"][0] and "SUCCEEDED" in outputs["gamma"][1]
    for name in ("alpha", "beta"):
        head.wait_status(ids[name], ("SUCCEEDED",))
    print(f"three jobs done in {time.monotonic() - started:.1f} s")
    spans = [(info["start_time"], info["end_time"]) for info in (head.get(f"/api/jobs/{i}") for i in ids.values())]
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans  # they ran at the same time

    # run dirs: alpha's default lands under the head's results root, never in Ray's working dir; beta and
    # gamma where asked
    assert not list(head.temp.glob(f"session_2*/runtime_resources/working_dir_files/*/runs/alpha-{ids['alpha']}"))
    run_dirs = {
        "alpha": head.temp / "results" / f"alpha-{ids['alpha']}",
        "beta": configs["beta"][1],
        "gamma": configs["gamma"][1],
    }
    for name, run_dir in run_dirs.items():
        generations = 2 if name == "alpha" else 3
        assert (run_dir / "checkpoint.pt").is_file(), name
        records = metrics_lines(run_dir)
        assert [r["generation"] for r in records] == list(range(1, generations + 1)), name
        assert records[-1]["workers_alive"] == 1, name
        assert json.loads((run_dir / "run.json").read_text())["status"] == "finished", name
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["train_size"] == 100, name

    # each job had its own worker actor
    actors = head.get("/api/v0/actors?limit=1000&detail=true")["data"]["result"]["result"]
    owners = {a["job_id"] for a in actors if a.get("class_name") == "PopulationWorker"}
    assert len(owners) >= 3, actors

    status = json.loads(cli("status", "--address", head.address, "--token-file", head.token_file, ids["beta"]).stdout)
    assert status["status"] == "SUCCEEDED" and status["submission_id"] == ids["beta"]
    assert status["run_dir"] == str(run_dirs["beta"]) and status["config"] == "beta.yaml"
    assert status["entrypoint"].startswith("es-service train --config beta.yaml --run-dir ")
    assert status["driver_exit_code"] == 0
    alpha = json.loads(cli("status", "--address", head.address, "--token-file", head.token_file, ids["alpha"]).stdout)
    assert alpha["run_dir"] == f"${{ES_RESULTS_ROOT:-~/es-service-runs}}/alpha-{ids['alpha']}", alpha
    logs = cli("logs", "--address", head.address, "--token-file", head.token_file, ids["alpha"]).stdout
    assert '"generation": 2' in logs and "test_accuracy" in logs
    followed = cli("logs", "--follow", "--address", head.address, ids["beta"], env=env).stdout
    assert '"generation": 3' in followed
    listed = json.loads(cli("list", "--address", head.address, env=env).stdout)
    by_id = {job["submission_id"]: job for job in listed}
    assert all(by_id[i]["status"] == "SUCCEEDED" for i in ids.values()), listed


def test_token_is_required_and_checked(head, tmp_path):
    config = job_config(tmp_path / "long.yaml", "generations=500")
    run_dir = tmp_path / "stopped"
    no_token_home = tmp_path / "home-empty"
    no_token_home.mkdir()
    result = cli(
        "submit",
        "--address",
        head.address,
        config,
        "--no-wait",
        "--submission-id",
        "es-no-token",
        env=cli_env(HOME=str(no_token_home)),
        check=False,
    )
    assert result.returncode == 2, result
    assert "requires an auth token and none was sent" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    wrong = tmp_path / "wrong-token"
    wrong.write_text(secrets.token_hex(32))
    for how in (["--token-file", wrong], []):
        env = cli_env(HOME=str(no_token_home)) if how else cli_env(RAY_AUTH_TOKEN=secrets.token_hex(32))
        result = cli(
            "submit",
            "--address",
            head.address,
            config,
            "--no-wait",
            "--submission-id",
            "es-bad-token",
            *how,
            env=env,
            check=False,
        )
        assert result.returncode == 2, result
        assert "refused the auth token" in result.stderr, result.stderr
    with pytest.raises(urllib.error.HTTPError) as refused:
        head.get("/api/jobs/", token=None)
    assert refused.value.code == 401  # auth is really on

    # the right token in the default place, ~/.ray/auth_token, is accepted
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(head.token + "\n")
    env = cli_env(HOME=str(home))
    result = cli("submit", "--address", head.address, config, "--run-dir", run_dir, "--no-wait", env=env)
    job_id = result.stdout.splitlines()[0]
    for refused_id in ("es-no-token", "es-bad-token"):
        missing = cli("status", "--address", head.address, refused_id, env=env, check=False)
        assert missing.returncode == 2 and f"no job {refused_id!r}" in missing.stderr, missing

    # stop: SIGTERM reaches the run, which checkpoints and ends; the job is STOPPED
    head.wait_status(job_id, ("RUNNING",))
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").exists() and metrics_lines(run_dir)):
        assert time.monotonic() < deadline, head.get(f"/api/jobs/{job_id}/logs")
        time.sleep(0.5)
    stopped = json.loads(cli("stop", "--address", head.address, job_id, env=env).stdout)
    assert stopped["status"] == "STOPPED" and stopped["stop_requested"], stopped
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "interrupted", info
    assert (run_dir / "checkpoint.pt").is_file()


# --- transport, token file and upload safety ---------------------------------------------------


def non_loopback_ip() -> str:
    """An address of this machine that is not loopback (what a remote client would dial), or skip."""
    candidates = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, the kernel just picks a source
        candidates.append(probe.getsockname()[0])
    except OSError:
        pass
    finally:
        probe.close()
    try:
        candidates += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    for ip in candidates:
        if not ip.startswith("127.") and ip != "0.0.0.0":
            return ip
    pytest.skip("this machine has no non-loopback IPv4 address")


class Listener:
    """A TCP listener on every interface that records what each connection sends."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(2)
            try:
                self.received.append(conn.recv(65536))
            except OSError:
                self.received.append(b"")
            conn.close()  # no HTTP answer: the client fails to reach a jobs API

    def close(self):
        self.done.set()
        self.thread.join(5)
        self.sock.close()


def test_plain_http_to_a_remote_host_is_refused_unless_insecure(tmp_path):
    ip = non_loopback_ip()
    token = secrets.token_hex(32)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    config = job_config(tmp_path / "tiny.yaml")
    listener = Listener()
    try:
        for address in (f"{ip}:{listener.port}", f"http://{ip}:{listener.port}"):
            for command in (["submit", "--address", address, config, "--no-wait"], ["list", "--address", address]):
                result = cli(*command, "--token-file", token_file, check=False)
                assert result.returncode == 2, result
                lines = result.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("es-service: error: "), result.stderr
                assert "unencrypted" in lines[0] and "ray dashboard cluster/config.yaml" in lines[0], lines
                assert "--insecure" in lines[0] and "https://" in lines[0], lines
        env = cli_env(RAY_API_SERVER_ADDRESS=f"http://{ip}:{listener.port}")  # the variable gets the same check
        result = cli("list", "--token-file", token_file, env=env, check=False)
        assert result.returncode == 2 and "$RAY_API_SERVER_ADDRESS" in result.stderr, result
        time.sleep(0.5)
        assert listener.received == []  # nothing was sent anywhere

        # --insecure: a warning, then the token really goes out in clear text
        result = cli(
            "list",
            "--address",
            f"{ip}:{listener.port}",
            "--token-file",
            token_file,
            "--insecure",
            check=False,
            timeout=120,
        )
        assert result.returncode == 1, result  # nobody answers like a jobs API there
        assert "es-service: warning: --insecure" in result.stderr and ip in result.stderr, result.stderr
        deadline = time.monotonic() + 10
        while not listener.received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(f"Bearer {token}".encode() in request for request in listener.received), listener.received
    finally:
        listener.close()

    # https or loopback: no refusal (these fail only because nothing listens there)
    closed = free_ports(1)[0]
    for address in (f"https://{ip}:{closed}", f"localhost:{closed}", f"http://[::1]:{closed}"):
        result = cli("list", "--address", address, "--token-file", token_file, check=False, timeout=120)
        assert result.returncode == 1, result
        assert "unencrypted" not in result.stderr and "warning" not in result.stderr, result.stderr


def test_connection_error_points_to_the_ssh_tunnel(tmp_path):
    result = cli(
        "list", "--address", f"http://127.0.0.1:{free_ports(1)[0]}", check=False, env=cli_env(HOME=str(tmp_path))
    )
    assert result.returncode == 1, result
    assert "ray dashboard cluster/config.yaml" in result.stderr, result.stderr
    assert "0.0.0.0" not in result.stderr, result.stderr  # never advise exposing the dashboard


def test_a_token_file_others_can_read_gets_a_warning(tmp_path):
    address = f"http://127.0.0.1:{free_ports(1)[0]}"
    token_file = tmp_path / "token"
    token_file.write_text(secrets.token_hex(32))
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    default = home / ".ray" / "auth_token"
    default.write_text(secrets.token_hex(32))
    cases = [
        (["--token-file", token_file], token_file, {}),
        ([], default, {}),
        ([], token_file, {"RAY_AUTH_TOKEN_PATH": str(token_file)}),
    ]
    for args, path, extra in cases:
        for mode, warned in ((0o644, True), (0o640, True), (0o600, False), (0o400, False)):
            path.chmod(mode)
            result = cli("list", "--address", address, *args, check=False, env=cli_env(HOME=str(home), **extra))
            assert result.returncode == 1, result  # nothing listens; the warning comes before that
            warning = [line for line in result.stderr.splitlines() if line.startswith("es-service: warning:")]
            if warned:
                assert len(warning) == 1 and f"chmod 600 {path}" in warning[0], (oct(mode), result.stderr)
                assert f"{mode:04o}" in warning[0], warning
            else:
                assert warning == [], (oct(mode), result.stderr)


def test_working_dir_upload_leaves_credentials_out(head, tmp_path):
    upload = tmp_path / "upload"
    (upload / "sub").mkdir(parents=True)
    config = job_config(upload / "tiny.yaml", "generations=1")
    (upload / "notes.txt").write_text("kept")
    (upload / "sub" / "kept.py").write_text("x = 1\n")
    secrets_inside = [
        "auth_token",
        ".env",
        "sub/.env.local",
        "sub/server.pem",
        "tls.key",
        "id_ed25519",
        "sub/id_rsa",
        "my.token",
        "cluster-token",
    ]
    for name in secrets_inside:
        (upload / name).write_text(f"SECRET-{name}")
    run_dir = tmp_path / "run"
    # the token file in use lies in the folder too, under a name no pattern catches
    (upload / "cluster-token").write_text(head.token)
    result = cli(
        "submit",
        "--address",
        head.address,
        config,
        "--working-dir",
        upload,
        "--run-dir",
        run_dir,
        "--token-file",
        upload / "cluster-token",
        "--no-wait",
    )
    job_id = result.stdout.splitlines()[0].strip()
    notice = [line for line in result.stderr.splitlines() if "not uploading" in line]
    assert len(notice) == 1, result.stderr
    for name in secrets_inside:
        assert name in notice[0], (name, notice)
    head.wait_status(job_id, ("SUCCEEDED",))
    (package,) = [p.parent for p in head.temp.glob("session_2*/runtime_resources/working_dir_files/*/tiny.yaml")]
    uploaded = sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file())
    assert uploaded == ["notes.txt", "sub/kept.py", "tiny.yaml"], uploaded
    assert not any(
        b"SECRET" in p.read_bytes() or head.token.encode() in p.read_bytes() for p in package.rglob("*") if p.is_file()
    )

    # a config with a credential's name is refused before anything is sent
    bad = upload / "id_config.yaml"
    bad.write_text(config.read_text())
    result = cli("submit", "--address", head.address, bad, "--working-dir", upload, "--no-wait", check=False)
    assert result.returncode == 2 and "rename it" in result.stderr, result


LEAST_SQUARES = """
import torch
from es_service import Problem


class LeastSquares(Problem):
    num_params, num_examples = 20, 1000

    def __init__(self):
        self.x = torch.randn(1000, 20, generator=torch.Generator().manual_seed(0))
        self.y = self.x @ torch.linspace(-1.0, 1.0, 20)

    def init_theta(self, seed):
        return torch.zeros(20)

    def losses(self, params, indices):
        return (params @ self.x[indices].T - self.y[indices]).square()

    def metrics(self, theta):
        return {"mse": float((self.x @ theta - self.y).square().mean())}
"""


def test_a_problem_of_ones_own_runs_as_a_job_from_its_working_dir(head, tmp_path):
    """The module exists only in the uploaded folder: the job's driver imports it from there, and the
    worker actors, which start in the installed package's folder, get its class by value."""
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "least_squares_problem.py").write_text(LEAST_SQUARES)
    settings = {
        "generations": 30,
        "es": {"pop_size": 32, "batch_size": 100, "learning_rate": 0.05},
        "eval": {"every": 10},
    }
    config = write_config(folder / "ls.yaml", {**settings, "workers": {"executor": "ray", "count": 1}})
    run_dir = tmp_path / "runs" / "ls"
    spec = "least_squares_problem:LeastSquares"
    args = ("submit", "--address", head.address, config, "--working-dir", folder, "--problem", spec)
    result = cli(*args, "--run-dir", run_dir, env=cli_env(RAY_AUTH_TOKEN=head.token))
    assert "SUCCEEDED" in result.stderr, result.stderr
    assert json.loads((run_dir / "run.json").read_text())["problem"] == spec
    records = metrics_lines(run_dir)
    assert records[-1]["generation"] == 30 and records[-1]["workers_alive"] == 1
    mse = [record["mse"] for record in records if "mse" in record]  # at theta = 0 it is 7.60
    assert len(mse) == 3 and mse[-1] < mse[0] < 7.60, mse
    bad = cli("submit", "--address", head.address, config, "--problem", "least_squares_problem", check=False)
    assert bad.returncode == 2 and "expected MODULE:CLASS" in bad.stderr
