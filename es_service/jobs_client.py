"""The Ray jobs API client behind ``es-service submit/status/logs/stop/list``: where the cluster is,
which auth token to send, and Ray's errors turned into :class:`JobsError` (message with the fix, exit
code). Ray is imported only when a client is made.

The token is a bearer credential for the whole cluster (anyone holding it can run code there), so it
only travels over https or to a loopback address (the SSH tunnel of ``ray dashboard``); plain http to
any other host needs ``--insecure``. A token file that other users can read is reported.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import stat
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TUNNEL_HINT = (
    "open the SSH tunnel to the head with `ray dashboard cluster/config.yaml` (it forwards "
    "http://127.0.0.1:8265) and pass --address http://127.0.0.1:8265"
)


class JobsError(Exception):
    """A problem phrased for the user, with the fix; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def resolve_address(address: str | None, insecure: bool = False) -> str:
    """The jobs API URL: --address, $RAY_API_SERVER_ADDRESS, an http(s) $RAY_ADDRESS, the local default.

    Plain http to a host that is not loopback is refused unless ``insecure`` (then a warning is printed):
    the bearer token would cross the network in clear text."""
    source = "--address"
    if not address:
        for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            value = os.environ.get(name, "").strip()
            # RAY_ADDRESS often holds a GCS address (HOST:6379, auto) for ray.init: only a URL fits here
            if value and (name == "RAY_API_SERVER_ADDRESS" or value.startswith(("http://", "https://"))):
                address, source = value, f"${name}"
                break
        else:
            return DEFAULT_ADDRESS
    address = address.strip().rstrip("/")
    if (
        address == "auto"
        or address.startswith("ray://")
        or ("://" in address and not address.startswith(("http://", "https://")))
    ):
        raise JobsError(
            f"{source} {address!r}: expected the jobs API URL of the head's dashboard, "
            "e.g. --address http://HEAD:8265 (not a ray:// or GCS address)",
            EXIT_BAD_INPUT,
        )
    if "://" not in address:
        address = f"http://{address}"
    host = urlsplit(address).hostname or ""
    if address.startswith("http://") and not is_loopback(host):
        if not insecure:
            raise JobsError(
                f"{source} {address!r} would send the cluster's auth token unencrypted to {host}; "
                f"{TUNNEL_HINT}, use an https:// address, or pass --insecure to send it anyway",
                EXIT_BAD_INPUT,
            )
        print(
            f"es-service: warning: --insecure: the auth token goes to {host} over plain http, readable by anyone "
            "on the network path; prefer the SSH tunnel of `ray dashboard cluster/config.yaml`",
            file=sys.stderr,
            flush=True,
        )
    return address


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (a literal address or localhost)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that might resolve anywhere: not trusted with the token


def resolve_token(token_file: str | None) -> tuple[str | None, str]:
    """(token or None, where it came from), in Ray's order with --token-file first."""
    if token_file:
        return _read_token(Path(token_file).expanduser(), "--token-file"), f"--token-file {token_file}"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        return _read_token(Path(path).expanduser(), "$RAY_AUTH_TOKEN_PATH"), f"$RAY_AUTH_TOKEN_PATH {path}"
    default = DEFAULT_TOKEN_FILE.expanduser()
    if default.is_file():
        return _read_token(default, str(DEFAULT_TOKEN_FILE)), str(DEFAULT_TOKEN_FILE)
    return None, "no token"


def _read_token(path: Path, source: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise JobsError(
            f"{source} {str(path)!r} cannot be read ({err.strerror or err}); copy the cluster's token "
            "(`ray get-auth-token` on the head) into a readable file",
            EXIT_BAD_INPUT,
        ) from None
    if not token:
        raise JobsError(
            f"{source} {str(path)!r} is empty; put the cluster's token in it "
            "(`ray get-auth-token` on the head prints it)",
            EXIT_BAD_INPUT,
        )
    warn_if_shared(path)
    return token


def warn_if_shared(path: Path) -> None:
    """A warning on stderr when group or others may read the token file."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        print(
            f"es-service: warning: the auth token file {str(path)!r} is readable by other users (mode "
            f"{mode:04o}); restrict it with `chmod 600 {path}`",
            file=sys.stderr,
            flush=True,
        )


# ----------------------------------------------------------------------------------------------
# The client


class Cluster:
    """A JobSubmissionClient that always carries the token and turns Ray's errors into JobsError."""

    def __init__(self, address: str | None, token_file: str | None, insecure: bool = False):
        self.address = resolve_address(address, insecure)
        self.token, self.token_source = resolve_token(token_file)
        # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address; ours must win.
        for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            os.environ.pop(name, None)
        from ray.job_submission import JobSubmissionClient

        logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..."
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self.client = self._call(lambda: JobSubmissionClient(self.address, headers=headers))

    def _call(self, fn, job_id: str | None = None):
        from ray.exceptions import AuthenticationError

        try:
            return fn()
        except AuthenticationError as err:
            if str(getattr(err, "message", err)).startswith("Authentication required"):  # HTTP 401
                raise JobsError(
                    f"the Ray cluster at {self.address} requires an auth token and none was sent ({self.token_source} "
                    "found); run `ray get-auth-token` on the head and put the token in ~/.ray/auth_token, "
                    "pass --token-file FILE or set RAY_AUTH_TOKEN",
                    EXIT_BAD_INPUT,
                ) from None
            raise JobsError(
                f"the Ray cluster at {self.address} refused the auth token from {self.token_source}; use the "
                "token printed by `ray get-auth-token` on the head (--token-file FILE, RAY_AUTH_TOKEN or "
                "~/.ray/auth_token)",
                EXIT_BAD_INPUT,
            ) from None
        except ConnectionError as err:
            raise JobsError(
                f"cannot reach the Ray jobs API at {self.address} ({_first_line(err)}); is the cluster up? For a "
                f"remote head, {TUNNEL_HINT} (or set RAY_API_SERVER_ADDRESS)",
                EXIT_FAILED,
            ) from None
        except RuntimeError as err:
            text = str(err)
            if job_id is not None and ("404" in text or "does not exist" in text):
                raise JobsError(
                    f"no job {job_id!r} on the Ray cluster at {self.address}; "
                    "`es-service list` shows the submitted jobs",
                    EXIT_BAD_INPUT,
                ) from None
            if "already exists" in text:
                raise JobsError(f"{_first_line(err)}; pick another --submission-id", EXIT_BAD_INPUT) from None
            raise JobsError(f"the Ray jobs API at {self.address} failed: {_first_line(err)}", EXIT_FAILED) from None
        except Exception as err:  # requests errors (bad URL, TLS, timeouts) and aiohttp errors
            if type(err).__module__.split(".")[0] in ("requests", "urllib3", "aiohttp"):
                raise JobsError(
                    f"cannot talk to the Ray jobs API at {self.address}: {_first_line(err)}; "
                    f"check --address; for a remote head, {TUNNEL_HINT}",
                    EXIT_FAILED,
                ) from None
            raise

    def info(self, job_id: str):
        return self._call(lambda: self.client.get_job_info(job_id), job_id)

    def wait_terminal(self, job_id: str, timeout_s: float | None = None):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            info = self.info(job_id)
            if job_status(info) in TERMINAL or (deadline is not None and time.monotonic() > deadline):
                return info
            time.sleep(0.5)

    def follow(self, job_id: str, out=sys.stdout) -> None:
        self.info(job_id)  # a clear error for an unknown id before the websocket opens

        async def tail():
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        self._call(lambda: asyncio.run(tail()), job_id)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].rstrip(".")


def job_status(info) -> str:
    status = info.status
    return getattr(status, "value", str(status))
