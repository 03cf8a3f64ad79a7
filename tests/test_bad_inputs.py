"""Bad inputs through the real CLI, one row each: the exit code, one line naming the problem, and a
finished run directory beside the command left byte for byte as it was. What the config and checkpoint
modules refuse is tested in-process (test_config, test_checkpoint, test_fuzz_inputs); the rows here are
the command's own checks (arguments, run directory, device, memory, signals), configs that once cost
gigabytes or a traceback, and commands that must still succeed (and say nothing on stderr)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers import NO_CUDA, TINY, cap_cli_memory, cli, error_line, snapshot, start_cli, write_config

pytestmark = pytest.mark.e2e


def train(tmp: Path, *args: str) -> list[str]:
    """`train` of the tiny config into tmp/new."""
    config = write_config(tmp / "c.yaml", TINY)
    return ["train", "--config", str(config), "--run-dir", str(tmp / "new"), "--quiet", *args]


def file_at(path: Path) -> Path:
    path.write_text("not a directory\n")
    return path


def checkpoint_with(beside: Path, tmp: Path, edit) -> Path:
    """A copy of the beside run's checkpoint, edited by edit(state) and saved as a foreign tool would."""
    state = torch.load(beside / "checkpoint.pt", weights_only=True)
    edit(state)
    torch.save(state, tmp / "edited.pt")
    return tmp / "edited.pt"


def elsewhere(state) -> None:
    state["config"]["data_dir"] = "/data/on/the/machine/that/trained/it"  # outside the config's digest


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
AS_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode")


def unwritable(tmp: Path, _beside: Path) -> list[str]:
    folder = tmp / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return train(tmp, "--run-dir", str(folder / "run"))


@dataclass
class Call:
    """A command with what a row cannot take for granted: where it runs, a cap on its memory, or a
    SIGINT once it is inside main (torch mapped) and long before its first generation."""

    args: list[str]
    cwd: Path | None = None
    capped: bool = False  # memory capped (helpers.cap_cli_memory), without CUDA
    interrupt: bool = False


def run(call: Call, env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess:
    if not call.interrupt:
        if call.capped:
            env = {**env, **NO_CUDA}
        cap = cap_cli_memory if call.capped else None
        return cli(*call.args, env=env, cwd=call.cwd or tmp, check=False, preexec_fn=cap)
    # SIGINT's default action, as in a terminal: a shell that starts the tests in the background has
    # them ignore it, the CLI would inherit that, and Python raises KeyboardInterrupt only when it is not ignored
    process = start_cli(*call.args, env=env, cwd=call.cwd or tmp, preexec_fn=default_sigint)
    while process.poll() is None and not torch_mapped(process.pid):
        time.sleep(0.01)  # the CLI maps torch in main(), after its module loads and before any run starts
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(call.args, process.returncode, stdout, stderr)


def torch_mapped(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # gone already
        return False


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def nested_aliases(tmp: Path) -> str:
    """8 levels of 10 aliases, 511 bytes, that stand for 10**8 values."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (tmp / "aliases.yaml").write_text("\n".join(lines) + "\n")
    return str(tmp / "aliases.yaml")


def list_key(tmp: Path) -> str:
    (tmp / "list_key.yaml").write_text("? [a, b]\n: 1\n")
    return str(tmp / "list_key.yaml")


def fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "pipe")
    return str(tmp / "pipe")


def link_to(beside: Path, tmp: Path) -> str:
    (tmp / "link").symlink_to(beside)
    return str(tmp / "link")


def copy_of(beside: Path, tmp: Path, name: str = "copy", *leave_out: str) -> str:
    shutil.copytree(beside, tmp / name, ignore=shutil.ignore_patterns(*leave_out))
    return str(tmp / name)


NOT_UTF8 = os.fsdecode(b"run-\xff")  # a name with a byte that is not UTF-8, as Python spells it
UNICODE = "运行-🚀"  # glyphs matplotlib's default font lacks

# name: (command given the tmp dir and the beside run, exit code, what the one line must name; for
# exit 0, what stdout must hold)
ROWS = {
    "--run-dir that is a file": (lambda t, b: train(t, "--run-dir", str(file_at(t / "plain"))), 2, ["is a file"]),
    "--run-dir under a file": (
        lambda t, b: train(t, "--run-dir", str(file_at(t / "plain") / "run")),
        2,
        ["lies under the file", "plain"],
    ),
    "an unwritable run directory": pytest.param(unwritable, 2, ["not writable"], marks=AS_ROOT),
    "--time-budget nan": (lambda t, b: train(t, "--time-budget", "nan"), 2, ["--time-budget", "nan", "finite"]),
    "a population past memory": (
        lambda t, b: train(t, "--set", "es.pop_size=10000000", "--set", "es.rank=64"),  # 7 TB of noise rows
        2,
        ["es.pop_size", "GiB", "this machine has"],
    ),
    "eval --device cuda without a GPU": pytest.param(
        lambda t, b: ["eval", str(b / "checkpoint.pt"), "--device", "cuda"],
        2,
        ["--device", "no CUDA device", "cpu"],
        marks=NO_GPU,
    ),
    "backprop --learning-rate nan": (
        lambda t, b: ["backprop", *train(t)[1:4], str(t / "new"), "--learning-rate", "nan"],
        2,
        ["--learning-rate", "nan", "finite"],
    ),
    "eval of a run directory": (lambda t, b: ["eval", str(b)], 2, ["is a directory", "run/checkpoint.pt`"]),
    "eval of a checkpoint made on another machine": (
        lambda t, b: ["eval", str(checkpoint_with(b, t, elsewhere)), "--device", "cpu"],
        0,
        ['"test_accuracy"'],
    ),
    "report --plot onto a run's checkpoint": (
        lambda t, b: ["report", str(b), "--plot", str(b / "checkpoint.pt")],
        2,
        ["--plot", "checkpoint.pt", "one of the files of the run directory", "report.png"],
    ),
    "report --plot onto a file that is not a PNG": (
        lambda t, b: ["report", str(b), "--plot", str(file_at(t / "notes.txt"))],
        2,
        ["notes.txt", "not a PNG", "new file name"],
    ),
    "a list as a mapping key in the config": (
        lambda t, b: train(t, "--config", list_key(t)),
        2,
        ["list_key.yaml", "line 1, column 3", "a list used as a key"],
    ),
    "a list as a mapping key in --set": (
        lambda t, b: train(t, "--set", "es={[a]: 1}"),
        2,
        ["--set 'es={[a]: 1}'", "a list used as a key"],
    ),
    "--run-dir with a 300-character name": (
        lambda t, b: train(t, "--run-dir", str(t / ("a" * 300))),
        2,
        ["--run-dir", "File name too long", "shorter path"],
    ),
    "--run-dir longer than PATH_MAX": (
        lambda t, b: train(t, "--run-dir", str(t) + "/a" * 2100),
        2,
        ["--run-dir", "File name too long", "shorter path"],
    ),
    "--run-dir . --force inside a finished run": (
        lambda t, b: Call(train(t, "--run-dir", ".", "--force"), cwd=b),
        2,
        ["--run-dir '.'", "the directory this command runs in", "cd .."],
    ),
    "report --plot into a folder that does not exist": (
        lambda t, b: ["report", str(b), "--plot", str(t / "nowhere" / "r.png")],
        2,
        ["nowhere", "does not exist", "existing folder"],
    ),
    "--address with no port": (
        lambda t, b: train(t, "--executor", "ray", "--address", "127.0.0.1"),
        2,
        ["--address '127.0.0.1'", "HOST:PORT"],
    ),
    "--address with no port, --force onto a finished run": (
        lambda t, b: train(t, "--executor", "ray", "--address", "127.0.0.1", "--run-dir", str(b), "--force"),
        2,
        ["--address '127.0.0.1'", "HOST:PORT"],
    ),
    "SIGINT before the first generation": (
        lambda t, b: Call(train(t), interrupt=True),
        130,
        ["es-service: interrupted before the first generation", "again"],
    ),
    "--set generations past any run": (
        lambda t, b: train(t, "--set", "generations=1" + "0" * 30),
        2,
        ["generations", "more than any run can use", "at most 1,000,000,000"],
    ),
    "nested YAML aliases, under a memory cap": (
        lambda t, b: Call(train(t, "--config", nested_aliases(t)), capped=True),
        2,
        ["aliases.yaml", "more than 10,000 values, aliases expanded"],
    ),
    "eval of a FIFO": (lambda t, b: ["eval", fifo(t)], 2, ["pipe", "not a regular file"]),
    "eval of /dev/zero": (lambda t, b: ["eval", "/dev/zero"], 2, ["/dev/zero", "not a regular file"]),
    "--init-from a directory": (
        lambda t, b: train(t, "--init-from", str(b)),
        2,
        ["--init-from", "is a directory", "checkpoint.pt"],
    ),
    "train into a run dir whose name is not UTF-8": (
        lambda t, b: train(t, "--run-dir", str(t / NOT_UTF8)),
        0,
        ['"test_accuracy"'],
    ),
    "train into a run dir named in glyphs the font lacks": (
        lambda t, b: train(t, "--run-dir", str(t / UNICODE)),
        0,
        ['"test_accuracy"'],
    ),
    "report of a run dir whose name is not UTF-8": (
        lambda t, b: ["report", copy_of(b, t, NOT_UTF8), "--plot", str(t / "r.png")],
        0,
        ["| run-\ufffd | es |", "learning curves:"],
    ),
    "--force onto a symbolic link to a run": (
        lambda t, b: train(t, "--run-dir", link_to(b, t), "--force"),
        2,
        ["link", "symbolic link", "the path it points to"],
    ),
    "resume of a run dir without its checkpoint": (
        lambda t, b: ["resume", copy_of(b, t, "copy", "checkpoint.pt")],
        2,
        ["has no checkpoint.pt", "--force"],
    ),
}


@pytest.mark.parametrize("make, code, names", ROWS.values(), ids=ROWS.keys())
def test_bad_input(env, beside, tmp_path, make, code, names):
    before, listing = snapshot(beside), sorted(os.listdir(beside.parent))
    call = make(tmp_path, beside)
    result = run(call if isinstance(call, Call) else Call(call), env, tmp_path)
    assert result.returncode == code, result.stderr
    if code == 2:
        line = error_line(result)
    elif code:  # an interruption is no error: one line, no traceback
        assert "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        line = lines[0]
    else:
        assert result.stderr == "", result.stderr  # no warning either
        line = result.stdout
    for name in names:
        assert name in line, line
    if code:
        assert not (tmp_path / "new").exists()
    assert snapshot(beside) == before
    assert sorted(os.listdir(beside.parent)) == listing  # nothing left beside it either
