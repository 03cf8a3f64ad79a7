"""Bad inputs through the real CLI, one row each: the exit code, one line naming the problem, and a
finished run directory beside the command left byte for byte as it was. What the config and checkpoint
modules refuse is tested in-process (test_config, test_checkpoint); the rows here are the command's own
checks (arguments, run directory, device, memory) and one checkpoint that must still evaluate."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, cli, cli_env, error_line, mnist_dir, tiny_config, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mnist_dir()
    return cli_env(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(scope="module")
def beside(env, tmp_path_factory):
    """A finished tiny run that no row names: every row must leave it exactly as it is."""
    folder = tmp_path_factory.mktemp("beside")
    config = write_config(folder / "tiny.yaml", tiny_config("generations=2"))
    cli("train", "--config", config, "--run-dir", folder / "run", "--quiet", env=env, cwd=folder)
    return folder / "run"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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


def unwritable(tmp: Path) -> list[str]:
    folder = tmp / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return train(tmp, "--run-dir", str(folder / "run"))


# name: (command given the tmp dir and the beside run, exit code, what the one line must name)
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
        lambda t, b: train(t, "--set", "es.pop_size=4000000000"),
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
        [],
    ),
}


@pytest.mark.parametrize("make, code, names", ROWS.values(), ids=ROWS.keys())
def test_bad_input(env, beside, tmp_path, make, code, names):
    before = snapshot(beside)
    args = make(tmp_path, beside)
    result = cli(*args, env=env, cwd=tmp_path, check=False)
    assert result.returncode == code, result.stderr
    if code:
        line = error_line(result)
        for name in names:
            assert name in line, line
        assert not (tmp_path / "new").exists()
    else:
        assert "Traceback" not in result.stderr and '"test_accuracy"' in result.stdout
    assert snapshot(beside) == before
