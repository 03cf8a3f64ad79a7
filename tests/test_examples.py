"""The library as a user meets it: the README's Python example as written, and a problem of one's own
(examples/spirals.py) trained in-process and on a local Ray, with a checkpoint and a resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import es_service
from es_service import checkpoint
from es_service.problems import EXAMPLE
from examples.spirals import Spirals, config
from tests.helpers import cli, error_line, write_config

ROOT = Path(__file__).resolve().parents[1]


def readme_python_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def theta_of(run_dir) -> torch.Tensor:
    return checkpoint.load(run_dir / "checkpoint.pt", Spirals().layout)["theta"]


def test_the_public_names_load_on_first_use():
    assert {"Config", "Problem", "OpenES", "train", "resume", "load_config"} <= set(es_service.__all__)
    assert all(getattr(es_service, name) is not None for name in es_service.__all__)
    code = "import sys, es_service, es_service.config; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert light.stdout.strip() == "[]"  # the CLI's light commands and config checks stay light


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python_example(), "README.md", "exec"), namespace)
    result = namespace["result"]
    start = namespace["LeastSquares"]().metrics(torch.zeros(20))["mse"]
    assert result["generation"] == namespace["config"].generations
    assert result["mse"] < start / 100, (start, result)  # ES fits the 20 weights
    run_dir = tmp_path / result["run_dir"]
    assert {"checkpoint.pt", "config.yaml", "metrics.jsonl", "run.json"} <= {p.name for p in run_dir.iterdir()}
    assert "'mse'" in capsys.readouterr().out


def test_a_problem_of_ones_own_learns_in_process(tmp_path):
    result = es_service.train(config("local", generations=300), Spirals(), tmp_path / "run")
    assert result["test_accuracy"] > 0.9, result  # chance is 0.5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["fitness_mean"] > records[0]["fitness_mean"]
    assert records[-1]["batch_accuracy_mean"] is None  # the problem counts no correct predictions


def test_a_problem_of_ones_own_resumes_to_the_uninterrupted_theta(tmp_path):
    whole = tmp_path / "whole"
    es_service.train(config("local", generations=12), Spirals(), whole)
    parts = tmp_path / "parts"
    first = es_service.train(config("local", generations=12), Spirals(), parts, stop_after=5)
    assert first["generation"] == 5
    assert es_service.resume(parts, Spirals())["generation"] == 12
    assert torch.equal(theta_of(parts), theta_of(whole))


def test_a_problems_checkpoint_is_refused_for_the_seed_network(tmp_path):
    es_service.train(config("local", generations=2), Spirals(), tmp_path / "run")
    with pytest.raises(checkpoint.CheckpointError, match="parameter layout"):
        checkpoint.load(tmp_path / "run" / "checkpoint.pt")


def test_what_only_the_seed_network_has_is_refused_for_a_problem(tmp_path):
    refused = config("local").model_copy(update={"es": config().es.model_copy(update={"rank": 1})})
    with pytest.raises(es_service.ConfigError, match="es.rank: low-rank members exists for the seed's network only"):
        es_service.train(refused, Spirals(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
def test_a_problem_of_ones_own_trains_to_the_same_theta_on_ray(tmp_path, ray_cluster):
    import ray

    es_service.train(config("local", generations=6), Spirals(), tmp_path / "local")
    es_service.train(config("ray", generations=6), Spirals(), tmp_path / "ray")
    assert torch.equal(theta_of(tmp_path / "ray"), theta_of(tmp_path / "local"))
    assert ray.is_initialized()  # a Ray the caller started is used and left running


EMBEDDED = """
import sys, ray, es_service
from examples.spirals import Spirals, config
run = config("ray", generations=2)
try:
    es_service.train(run, Spirals(), sys.argv[1] + "/trained")
finally:
    print("after train, Ray is up:", ray.is_initialized())
es_service.resume(sys.argv[1] + "/trained", Spirals(), overrides=["generations=3"])
print("after resume, Ray is up:", ray.is_initialized())
"""


@pytest.mark.ray
def test_an_embedded_ray_the_library_started_is_shut_down_before_it_returns(tmp_path):
    """Until it is shut down an embedded Ray's raylet prints its warnings into the caller's output (after
    the CLI's last line, once); in a fresh process, so that no test's Ray is up already."""
    done = subprocess.run(
        [sys.executable, "-c", EMBEDDED, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["after train, Ray is up: False", "after resume, Ray is up: False"]


class Shapeless(Spirals):
    """A problem whose parts return the wrong things, one at a time."""

    def __init__(self, fault: str):
        super().__init__()
        self.fault = fault

    def init_theta(self, seed: int) -> torch.Tensor:
        theta = super().init_theta(seed)
        return theta.double() if self.fault == "float64 theta" else theta

    def losses(self, params: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        losses = super().losses(params, indices)
        return losses.mean(dim=1) if self.fault == "one loss per member" else losses


@pytest.mark.parametrize(
    "fault,message",
    [
        ("float64 theta", r"Shapeless.init_theta returned torch.float64 \(1218,\); return a float32 tensor of shape"),
        ("one loss per member", r"Shapeless.losses returned \(1,\) for 1 member on 128 examples; return a tensor"),
    ],
)
def test_a_problem_that_returns_the_wrong_shapes_is_named(tmp_path, fault, message):
    with pytest.raises(es_service.ProblemError, match=message):
        es_service.train(config("local", generations=2), Shapeless(fault), tmp_path / "run")


def test_a_noise_table_too_small_for_the_problem_is_refused_before_the_run_starts(tmp_path):
    wide = Spirals(hidden=1024)  # 1,054,722 parameters: more than the example's table of 2**20 floats
    with pytest.raises(es_service.ProblemError, match="noise.table_size 1048576 is not larger than Spirals's 1054722"):
        es_service.train(config("local"), wide, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_the_cli_trains_and_resumes_a_problem_named_on_the_command_line(tmp_path):
    """`--problem MODULE:CLASS` from the folder that holds it; run.json records it and resume reads it."""
    path = write_config(tmp_path / "spirals.yaml", config("local", generations=12))
    run_dir = tmp_path / "parts"
    cli("train", "--config", path, "--run-dir", run_dir, "--problem", EXAMPLE, "--stop-after", "5", cwd=ROOT)
    assert json.loads((run_dir / "run.json").read_text())["problem"] == EXAMPLE
    cli("resume", run_dir, "--quiet", cwd=ROOT)
    es_service.train(config("local", generations=12), Spirals(), tmp_path / "whole")
    assert torch.equal(theta_of(run_dir), theta_of(tmp_path / "whole"))


@pytest.mark.e2e
@pytest.mark.parametrize(
    "spec,message",
    [
        ("spirals", "--problem 'spirals': expected MODULE:CLASS, e.g. examples.spirals:Spirals"),
        ("examples.nowhere:Spirals", "--problem 'examples.nowhere:Spirals': cannot import 'examples.nowhere'"),
        ("examples.spirals:config", "examples.spirals.config is not a subclass of es_service.Problem"),
    ],
)
def test_a_problem_the_cli_cannot_build_is_refused_in_one_line(tmp_path, spec, message):
    path = write_config(tmp_path / "spirals.yaml", config("local", generations=2))
    refused = cli("train", "--config", path, "--run-dir", tmp_path / "run", "--problem", spec, cwd=ROOT, check=False)
    assert refused.returncode == 2 and message in error_line(refused)
    assert not (tmp_path / "run").exists()


FLAT_LOSSES = """
import torch
from es_service import Problem


class FlatLosses(Problem):
    num_params, num_examples = 4, 100

    def init_theta(self, seed):
        return torch.zeros(4)

    def losses(self, params, indices):
        return params.square().sum(dim=1)  # one loss per member, not per example
"""


@pytest.mark.e2e
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_problems_wrong_losses_from_the_cli_are_one_line(tmp_path, executor):
    """On Ray the error comes back from a worker actor that got the class by value; it is still one line."""
    (tmp_path / "flat_losses.py").write_text(FLAT_LOSSES)
    settings = {"generations": 2, "es": {"pop_size": 4, "batch_size": 10}, "noise": {"table_size": 1 << 20}}
    path = write_config(tmp_path / "flat.yaml", {**settings, "workers": {"executor": executor, "count": 1}})
    refused = cli(
        "train",
        "--config",
        path,
        "--run-dir",
        tmp_path / "run",
        "--problem",
        "flat_losses:FlatLosses",
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode == 2
    assert "FlatLosses.losses returned (1,) for 1 member on 10 examples" in error_line(refused)
