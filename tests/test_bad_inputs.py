"""Bad inputs through the real CLI, one row each: the exit code, one line naming the problem, and a
finished run directory beside the command left byte for byte as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, cli_env, error_line, mnist_dir, run_cli, tiny_dict, write_yaml

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mnist_dir()
    return cli_env(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(scope="module")
def beside(env, tmp_path_factory):
    """A finished tiny run that no row names: every row must leave it exactly as it is."""
    folder = tmp_path_factory.mktemp("beside")
    config = write_yaml(folder / "tiny.yaml", tiny_dict(generations=2))
    result = run_cli(["train", "--config", str(config), "--run-dir", str(folder / "run"), "--quiet"], env, folder)
    assert result.returncode == 0, result.stderr
    return folder / "run"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train(tmp: Path, *args: str, text: str | bytes | None = None) -> list[str]:
    """`train` of a tiny config (or of a config file holding ``text``) into tmp/new."""
    config = tmp / "c.yaml"
    if text is None:
        write_yaml(config, TINY)
    else:
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
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


def poison(state) -> None:
    state["theta"][7] = float("nan")


def elsewhere(state) -> None:
    state["config"]["data_dir"] = "/data/on/the/machine/that/trained/it"  # outside the config's digest


def poison_moments(state) -> None:
    state["optimizer"]["state"][0]["exp_avg_sq"][3] = float("inf")


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
AS_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode")


def unwritable(tmp: Path) -> list[str]:
    folder = tmp / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return train(tmp, "--run-dir", str(folder / "run"))


# name: (command given the tmp dir and the beside run, exit code, what the one line must name)
ROWS = {
    "--set with a YAML syntax error": (lambda t, b: train(t, "--set", "seed=[1"), 2, ["seed=[1", "not valid YAML"]),
    "--set with a python tag": (lambda t, b: train(t, "--set", "seed=!!python/object/apply:os.getpid []"), 2,
                                ["not valid YAML", "python/object"]),
    "a config that is not UTF-8": (lambda t, b: train(t, text=b"seed: 3\ngenerations: \xff\xfe\n"), 2,
                                   ["not UTF-8", "byte"]),
    "a config that is 0": (lambda t, b: train(t, text="0\n"), 2, ["expected a mapping", "got 0"]),
    "a config that is []": (lambda t, b: train(t, text="[]\n"), 2, ["expected a mapping", "got []"]),
    "a key twice": (lambda t, b: train(t, text="seed: 3\ngenerations: 2\nseed: 4\n"), 2,
                    ["duplicate key 'seed'", "line 3"]),
    "a config path that is a directory": (lambda t, b: ["train", "--config", str(t), "--run-dir", str(t / "new")], 2,
                                          ["is a directory"]),
    "--run-dir that is a file": (lambda t, b: train(t, "--run-dir", str(file_at(t / "plain"))), 2, ["is a file"]),
    "--run-dir under a file": (lambda t, b: train(t, "--run-dir", str(file_at(t / "plain") / "run")), 2,
                               ["lies under the file", "plain"]),
    "an unwritable run directory": pytest.param(unwritable, 2, ["not writable"], marks=AS_ROOT),
    "--time-budget nan": (lambda t, b: train(t, "--time-budget", "nan"), 2, ["--time-budget", "nan", "finite"]),
    "tiny sigma": (lambda t, b: train(t, "--set", "es.noise_std=1e-50"), 2, ["es.noise_std", "1e-50", "float32"]),
    "huge learning rate": (lambda t, b: train(t, "--set", "es.learning_rate=1e30"), 2,
                           ["es.learning_rate", "1e+30", "at most 10"]),
    "a population past memory": (lambda t, b: train(t, "--set", "es.pop_size=4000000000"), 2,
                                 ["es.pop_size", "GiB", "this machine has"]),
    "infinite gpus_per_worker": (lambda t, b: train(t, "--set", "workers.gpus_per_worker=.inf"), 2,
                                 ["workers.gpus_per_worker", "inf", "finite"]),
    "infinite tile_timeout_s": (lambda t, b: train(t, "--set", "workers.tile_timeout_s=.inf"), 2,
                                ["workers.tile_timeout_s", "finite"]),
    "eval --device cuda without a GPU": pytest.param(
        lambda t, b: ["eval", str(b / "checkpoint.pt"), "--device", "cuda"], 2, ["--device", "no CUDA device", "cpu"],
        marks=NO_GPU),
    "backprop --learning-rate nan": (lambda t, b: ["backprop", *train(t)[1:4], str(t / "new"), "--learning-rate", "nan"],
                                     2, ["--learning-rate", "nan", "finite"]),
    "eval of a run directory": (lambda t, b: ["eval", str(b)], 2, ["is a directory", "run/checkpoint.pt`"]),
    "eval of a checkpoint with nan theta": (lambda t, b: ["eval", str(checkpoint_with(b, t, poison))], 2,
                                            ["inf or nan", "edited.pt"]),
    "eval of a checkpoint with inf Adam moments": (lambda t, b: ["eval", str(checkpoint_with(b, t, poison_moments))], 2,
                                                   ["optimizer state", "inf or nan"]),
    "eval of a checkpoint made on another machine": (
        lambda t, b: ["eval", str(checkpoint_with(b, t, elsewhere)), "--device", "cpu"], 0, []),
}


@pytest.mark.parametrize("make, code, names", ROWS.values(), ids=ROWS.keys())
def test_bad_input(env, beside, tmp_path, make, code, names):
    before = snapshot(beside)
    args = make(tmp_path, beside)
    result = run_cli(args, env, tmp_path)
    assert result.returncode == code, result.stderr
    if code:
        line = error_line(result)
        for name in names:
            assert name in line, line
        assert not (tmp_path / "new").exists()
    else:
        assert "Traceback" not in result.stderr and '"test_accuracy"' in result.stdout
    assert snapshot(beside) == before
