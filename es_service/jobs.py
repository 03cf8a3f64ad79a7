"""``es-service submit/status/logs/stop/list``: ES runs as Ray jobs on a running cluster.

A submitted job runs ``es-service train --config CONFIG --run-dir DIR --quiet [--set ...]`` on the
cluster's head node (``es-service`` must be installed there), with its own run directory and its own
worker actors. The config is checked here first: a bad config fails with exit code 2 before the
cluster is contacted.

Run directories live under a results root on the head: ``$ES_RESULTS_ROOT`` in the head's
environment, else ``~/es-service-runs`` (expanded by the job's shell there). Never under the job's
working directory: Ray deletes that with the job, and re-extracts it (deleting the old copy) when a
node that shares the head's session directory, such as a fake autoscaler node, sets the job up again.

``--working-dir DIR`` uploads DIR to the cluster, minus files that look like credentials (token
files, ``.env``, ``*.pem``/``*.key`` and ``id_*`` keys, the token file in use): those are left out
and named on stderr.

The commands talk to the Ray jobs API (the dashboard, ``http://HEAD:8265``) through
:class:`ray.job_submission.JobSubmissionClient`. Ray 2.60 clusters started with ``ray start --head``
or ``ray.init()`` require a bearer token (token authentication). Ray's client attaches one only when
``RAY_AUTH_MODE=token`` is set in the client's environment, so these commands read the token
themselves and always send it as ``Authorization: Bearer <token>``. Where it comes from, first
match wins: ``--token-file FILE``, ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token`` (Ray's own order, with ``--token-file`` on top). With none of them no token is
sent, which only a cluster with ``RAY_AUTH_MODE=disabled`` accepts.

Exit codes: 0 done; 1 the cluster cannot be reached, a request failed or a waited-for job did not
succeed; 2 bad input (config, address, token, job id); 130 interrupted while waiting.
"""

from __future__ import annotations

import argparse
import datetime
import os
import secrets
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from es_service.jobs_client import (
    DEFAULT_ADDRESS,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    Cluster,
    JobsError,
    job_status,
)

COMMANDS = ("submit", "status", "logs", "stop", "list")
STOP_GRACE_S = 60
"""Seconds Ray waits after SIGTERM before it SIGKILLs a stopped job (Ray's default is 3): time for
the run to finish its generation and write a checkpoint. Sent as RAY_JOB_STOP_WAIT_TIME_S."""
PASSED_ENV = ("ES_DATA_DIR",)
"""Variables copied from the submitting shell into the job's environment when they are set."""
META_PREFIX = "es_service."
RESULTS_ROOT_ENV = "ES_RESULTS_ROOT"
DEFAULT_RESULTS_ROOT = "~/es-service-runs"
RESULTS_ROOT_SHELL = f'"${{{RESULTS_ROOT_ENV}:-${{HOME:-/tmp}}/es-service-runs}}"'
"""The results root as the job's shell on the head expands it (the client cannot know the head's home)."""
RESULTS_ROOT_SHOWN = f"${{{RESULTS_ROOT_ENV}:-{DEFAULT_RESULTS_ROOT}}}"
SECRET_PATTERNS = ("auth_token", "*.token", "token", ".env", ".env.*", "*.pem", "*.key", "id_*")
"""File names never uploaded with --working-dir (gitignore-style, at any depth)."""


# ----------------------------------------------------------------------------------------------
# Arguments


def add_commands(commands) -> None:
    """Add submit/status/logs/stop/list to the CLI's subparsers."""
    submit = commands.add_parser("submit", help="run a config as a Ray job on a running cluster")
    submit.add_argument("config", help="YAML config file (checked here before anything is sent)")
    submit.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable); passed on to the job",
    )
    submit.add_argument(
        "--run-dir",
        help="the job's run directory on the head: absolute, or relative to the "
        f"results root there (${RESULTS_ROOT_ENV}, default {DEFAULT_RESULTS_ROOT}); "
        "default <config stem>-<submission id>",
    )
    submit.add_argument(
        "--working-dir",
        help="directory uploaded as the job's working directory; it must hold "
        "the config; token files, .env and *.pem/*.key/id_* keys are left out "
        "(default: a fresh directory holding only the config)",
    )
    submit.add_argument("--data-dir", help="MNIST folder on the head node, passed to `train --data-dir`")
    submit.add_argument(
        "--problem",
        metavar="MODULE:CLASS",
        help="a Problem of your own, passed to `train --problem`: its module in --working-dir (or installed "
        "on the head); the workers get it by value",
    )
    submit.add_argument("--submission-id", help="job id to use (default es-<random>); must be new on the cluster")
    submit.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    _connection_options(submit)

    status = commands.add_parser("status", help="status of a submitted job (JSON)")
    status.add_argument("job_id", metavar="JOB_ID")
    _connection_options(status)

    logs = commands.add_parser("logs", help="driver output of a submitted job")
    logs.add_argument("job_id", metavar="JOB_ID")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    _connection_options(logs)

    stop = commands.add_parser("stop", help="stop a submitted job (SIGTERM: it checkpoints, then exits)")
    stop.add_argument("job_id", metavar="JOB_ID")
    stop.add_argument("--no-wait", action="store_true", help="return without waiting for the job to end")
    _connection_options(stop)

    listing = commands.add_parser("list", help="jobs submitted to the cluster (JSON)")
    _connection_options(listing)


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="Ray jobs API (dashboard) URL, e.g. http://HEAD:8265 (default: "
        f"$RAY_API_SERVER_ADDRESS, an http(s) $RAY_ADDRESS, or {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--token-file",
        help="file holding the cluster's auth token (default: $RAY_AUTH_TOKEN, "
        "$RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a plain http:// --address that is not loopback (the token then crosses the "
        "network unencrypted); prefer the SSH tunnel of `ray dashboard cluster/config.yaml`",
    )


def _time(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(timespec="seconds")


def describe(info) -> dict:
    """The fields of a JobDetails worth showing, as plain JSON."""
    meta = dict(info.metadata or {})
    record = {
        "submission_id": info.submission_id,
        "status": job_status(info),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "run_dir": meta.pop(META_PREFIX + "run_dir", None),
        "config": meta.pop(META_PREFIX + "config", None),
        "start_time": _time(info.start_time),
        "end_time": _time(info.end_time),
        "duration_s": round((info.end_time - info.start_time) / 1000, 1) if info.start_time and info.end_time else None,
        "driver_exit_code": getattr(info, "driver_exit_code", None),
    }
    if getattr(info, "error_type", None):
        record["error_type"] = info.error_type
    if meta:
        record["metadata"] = meta
    return record


# ----------------------------------------------------------------------------------------------
# Commands


def dispatch(args) -> dict | list:
    """Run one jobs command. Returns what the CLI prints as JSON, or exits (SystemExit) itself."""
    try:
        return _COMMANDS[args.command](args)
    except JobsError as err:
        print(f"es-service: error: {err}", file=sys.stderr)
        raise SystemExit(err.code) from None
    except KeyboardInterrupt:
        job = getattr(args, "job_id", None) or getattr(args, "_submitted", None)
        hint = f"; the job keeps running (`es-service stop {job}` ends it)" if job else ""
        print(f"es-service: interrupted{hint}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


def build_submission(args) -> tuple[str, dict, dict, str, str]:
    """Validate locally; return (entrypoint, runtime_env, metadata, submission_id, run_dir).

    ``runtime_env["working_dir"]`` is a local directory; a fresh one is made when --working-dir is not
    given (the caller removes it after submitting). ``run_dir`` is the run directory as shown to the
    user (a relative one under ``$ES_RESULTS_ROOT``); the entrypoint makes the head's shell resolve it.
    """
    from es_service.config import ConfigError, load

    config_path = Path(args.config)
    overrides = list(args.overrides)
    if args.problem is not None:
        module, colon, name = args.problem.partition(":")
        if not (module and colon and name):
            raise JobsError(
                f"--problem {args.problem!r}: expected MODULE:CLASS, e.g. examples.spirals:Spirals", EXIT_BAD_INPUT
            )
    try:
        load(config_path, overrides + ([f"data_dir={args.data_dir}"] if args.data_dir else []))
    except ConfigError as err:
        raise JobsError(str(err), EXIT_BAD_INPUT) from None
    if args.working_dir:
        working_dir = Path(args.working_dir)
        if not working_dir.is_dir():
            raise JobsError(
                f"--working-dir {args.working_dir!r} is not a directory; pass the folder to upload "
                "(it must hold the config)",
                EXIT_BAD_INPUT,
            )
        try:
            relative = config_path.resolve().relative_to(working_dir.resolve())
        except ValueError:
            raise JobsError(
                f"config {args.config!r} is not inside --working-dir {args.working_dir!r}; the job "
                "reads it from there: move it in, or leave out --working-dir",
                EXIT_BAD_INPUT,
            ) from None
        excludes = secret_excludes(working_dir, relative, getattr(args, "token_file", None))
    else:
        working_dir = Path(tempfile.mkdtemp(prefix="es-service-submit-"))
        shutil.copyfile(config_path, working_dir / config_path.name)
        relative = Path(config_path.name)
        excludes = []
    submission_id = args.submission_id or f"es-{secrets.token_hex(6)}"
    run_dir = args.run_dir or f"{config_path.stem}-{submission_id}"
    if os.path.isabs(run_dir):
        run_dir_words = shlex.quote(run_dir)
    else:  # the root unquoted-in-double-quotes so the head's shell expands it; the rest quoted literally
        run_dir_words = f"{RESULTS_ROOT_SHELL}/{shlex.quote(run_dir)}"
        run_dir = f"{RESULTS_ROOT_SHOWN}/{run_dir}"
    command = shlex.join(["es-service", "train", "--config", relative.as_posix(), "--run-dir"])
    command += f" {run_dir_words} --quiet"
    for text in overrides:
        command += " " + shlex.join(["--set", text])
    if args.data_dir:
        command += " " + shlex.join(["--data-dir", args.data_dir])
    if args.problem:
        command += " " + shlex.join(["--problem", args.problem])
    env_vars = {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}
    env_vars["RAY_JOB_STOP_WAIT_TIME_S"] = str(STOP_GRACE_S)
    # eager_install off: otherwise every node that joins sets the job's working_dir up again, and fake
    # nodes, sharing the head's session directory, delete the driver's current directory doing it
    runtime_env = {"working_dir": str(working_dir), "env_vars": env_vars, "config": {"eager_install": False}}
    if excludes:
        runtime_env["excludes"] = excludes
    metadata = {META_PREFIX + "config": config_path.name, META_PREFIX + "run_dir": run_dir}
    return command, runtime_env, metadata, submission_id, run_dir


def secret_excludes(working_dir: Path, config: Path, token_file: str | None) -> list[str]:
    """Ray ``excludes`` patterns that keep credentials in ``working_dir`` out of the upload; the files
    they leave out are named on stderr. The config itself must not look like one (exit 2)."""
    import fnmatch

    patterns = list(SECRET_PATTERNS)
    root = working_dir.resolve()
    for candidate in filter(None, [token_file, os.environ.get("RAY_AUTH_TOKEN_PATH")]):
        try:  # the token file in use, whatever its name
            inside = Path(candidate).expanduser().resolve().relative_to(root)
        except ValueError:
            continue
        patterns.append("/" + inside.as_posix())
    anchored = {p[1:] for p in patterns if p.startswith("/")}

    def secret(relative: Path) -> bool:
        return relative.as_posix() in anchored or any(fnmatch.fnmatchcase(relative.name, p) for p in SECRET_PATTERNS)

    if secret(config):
        raise JobsError(
            f"the config {config.as_posix()!r} has the name of a credential file, which --working-dir "
            "never uploads; rename it",
            EXIT_BAD_INPUT,
        )
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".git", "__pycache__")]
        for name in files:
            relative = (Path(folder) / name).relative_to(root)
            if secret(relative):
                found.append(relative.as_posix())
    if found:
        print(
            f"es-service: not uploading what looks like credentials from --working-dir: {', '.join(sorted(found))}",
            file=sys.stderr,
            flush=True,
        )
    return patterns


def cmd_submit(args):
    entrypoint, runtime_env, metadata, submission_id, run_dir = build_submission(args)
    staged = None if args.working_dir else runtime_env["working_dir"]
    try:
        cluster = Cluster(args.address, args.token_file, args.insecure)
        cluster._call(
            lambda: cluster.client.submit_job(
                entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env, metadata=metadata
            )
        )
    finally:
        if staged:
            shutil.rmtree(staged, ignore_errors=True)
    args._submitted = submission_id
    print(submission_id, flush=True)
    where = "" if os.path.isabs(run_dir) else f" on the head ({RESULTS_ROOT_ENV} there, default {DEFAULT_RESULTS_ROOT})"
    print(
        f"es-service: submitted {submission_id} to {cluster.address}: {entrypoint}\n"
        f"es-service: run dir {run_dir}{where}; `es-service status {submission_id}` or "
        f"`es-service logs --follow {submission_id}`",
        file=sys.stderr,
        flush=True,
    )
    if args.no_wait:
        raise SystemExit(0)
    cluster.follow(submission_id)
    info = cluster.wait_terminal(submission_id, timeout_s=60)
    status = job_status(info)
    if status != "SUCCEEDED":
        raise JobsError(
            f"job {submission_id} {status}: {info.message or 'no message'}; see `es-service logs {submission_id}`",
            EXIT_FAILED,
        )
    print(f"es-service: job {submission_id} SUCCEEDED; run dir {run_dir}", file=sys.stderr)
    raise SystemExit(0)


def cmd_status(args):
    cluster = Cluster(args.address, args.token_file, args.insecure)
    return describe(cluster.info(args.job_id))


def cmd_logs(args):
    cluster = Cluster(args.address, args.token_file, args.insecure)
    if args.follow:
        cluster.follow(args.job_id)
    else:
        cluster.info(args.job_id)
        sys.stdout.write(cluster._call(lambda: cluster.client.get_job_logs(args.job_id), args.job_id))
        sys.stdout.flush()
    raise SystemExit(0)


def cmd_stop(args):
    cluster = Cluster(args.address, args.token_file, args.insecure)
    cluster.info(args.job_id)
    requested = cluster._call(lambda: cluster.client.stop_job(args.job_id), args.job_id)
    info = cluster.info(args.job_id) if args.no_wait else cluster.wait_terminal(args.job_id, STOP_GRACE_S + 30)
    return {
        "submission_id": args.job_id,
        "stop_requested": bool(requested),
        "status": job_status(info),
        "message": info.message,
    }


def cmd_list(args):
    cluster = Cluster(args.address, args.token_file, args.insecure)
    jobs = [job for job in cluster._call(cluster.client.list_jobs) if job.submission_id]
    jobs.sort(key=lambda job: job.start_time or 0)
    return [describe(job) for job in jobs]


_COMMANDS = {"submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop, "list": cmd_list}
