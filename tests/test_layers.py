"""The import graph: packages depend one way, and the math core imports neither Ray nor any I/O."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# import name -> folder: the workers/ folder installs as ``es_workers`` (pyproject's package-dir)
PACKAGES = {"es_service": "es_service", "es_workers": "workers", "benchmarks": "benchmarks"}
MATH_CORE = (
    "workers/problem.py",
    "workers/ftz_mnist.py",
    "workers/kinds.py",
    "workers/network.py",
    "workers/members.py",
    "workers/layer_members.py",
    "workers/noise.py",
    "workers/compiled.py",
    "workers/evaluator.py",
    "es_service/strategy.py",
    "es_service/plan.py",
    "es_service/replica.py",
)
IO_OR_RAY = {
    "ray",
    "yaml",
    "json",
    "pickle",
    "pathlib",
    "shutil",
    "tempfile",
    "socket",
    "urllib",
    "requests",
    "subprocess",
    "csv",
    "sqlite3",
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_graph() -> dict[str, set[str]]:
    graph = {package: set() for package in PACKAGES}
    for package, folder in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            for name in imported_modules(path):
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    graph[package].add(top)
    return graph


def test_workers_import_nothing_from_the_driver_side():
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "workers").rglob("*.py")
        if any(name.split(".")[0] in ("es_service", "benchmarks") for name in imported_modules(path))
    ]
    assert offenders == []


def test_no_cycle_between_top_level_packages():
    graph = package_graph()
    assert graph["es_workers"] == set() and "benchmarks" not in graph["es_service"]

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(step == goal or (step not in seen and reaches(step, goal, seen | {step})) for step in graph[start])

    assert not [package for package in PACKAGES if reaches(package, package)]


def test_the_math_core_imports_neither_ray_nor_io():
    for relative in MATH_CORE:
        found = {name.split(".")[0] for name in imported_modules(REPO / relative)} & IO_OR_RAY
        assert not found, f"{relative} imports {sorted(found)}"
        assert "open(" not in (REPO / relative).read_text(), relative


def driver_side_graph() -> dict[str, set[str]]:
    """es_service module -> the es_service modules it imports (at any depth); a subpackage
    (es_service/config/) is one module."""
    graph = {}
    for path in (REPO / "es_service").rglob("*.py"):
        module = path.relative_to(REPO / "es_service").parts[0].removesuffix(".py")
        names = imported_modules(path)
        found = {name.split(".")[1] for name in names if name.startswith("es_service.")}
        for node in ast.walk(ast.parse(path.read_text())):  # from es_service import a, b
            if isinstance(node, ast.ImportFrom) and node.module == "es_service":
                found.update(alias.name for alias in node.names)
        graph[module] = graph.get(module, set()) | found - {module}
    return graph


def test_run_management_runs_one_way():
    """cli -> runner -> backprop_runs -> lifecycle -> runs, rundir: lifecycle alone creates, locks and
    records a run directory, decides how one resumes and never trains; run plumbing never reaches back up."""
    graph = driver_side_graph()

    def below(module: str, seen: frozenset = frozenset()) -> set[str]:
        return set().union(*({step} | below(step, seen | {step}) for step in graph[module] if step not in seen))

    assert {"backprop_runs", "lifecycle"} <= graph["runner"] and "lifecycle" in graph["backprop_runs"]
    for module in ("lifecycle", "runs", "backprop", "backprop_runs", "driver", "replica", "executors", "ray_executor"):
        assert not below(module) & {"runner", "cli"}, module
    assert not below("lifecycle") & {"backprop", "backprop_runs", "driver", "executors", "ray_executor"}
    assert not below("runs") & {"lifecycle", "backprop", "backprop_runs"}
    assert graph["rundir"] == set()
    writers = {
        path.name
        for path in (REPO / "es_service").rglob("*.py")
        if any(call in path.read_text() for call in ("write_run_info(", "rundir.create(", "Lock("))
    }
    assert writers == {"rundir.py", "lifecycle.py"}


def test_no_cycle_between_driver_side_modules():
    """One generation goes down one floor at a time and comes back as a return value: cli -> runner ->
    driver -> strategy -> plan -> config, never back up (es_service/__init__.py, the public API, only
    re-exports)."""
    graph = driver_side_graph()
    graph.pop("__init__")

    def cycle_from(module: str, path: tuple = ()) -> tuple | None:
        if module in path:
            return (*path, module)
        return next(filter(None, (cycle_from(step, (*path, module)) for step in graph.get(module, ()))), None)

    assert [cycle for module in graph if (cycle := cycle_from(module))] == []


UPDATE_RULE = {
    "centered_ranks",
    "normalized",
    "shape_fitness",
    "slice_weights",
    "activity_slopes",
    "Update",
    "shaped_update",
    "estimate",
    "cap_weight_norms",
    "AdamES",
    "OpenES",
}
"""What decides the update: the fitness shaping, the estimate, Adam with its decay and cap, ask and tell."""


def top_level_definitions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def library_files() -> list[Path]:
    return [path for folder in ("es_service", "workers") for path in sorted((REPO / folder).rglob("*.py"))]


def test_the_update_rule_is_in_one_file():
    """es_service/strategy.py alone defines the update rule's parts, and only it (and backprop, which is
    not ES) steps a torch optimizer; member kinds own their estimates' arithmetic as methods."""
    owners: dict[str, set[str]] = {}
    for path in library_files():
        for name in top_level_definitions(path) & UPDATE_RULE:
            owners.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert owners == {name: {"es_service/strategy.py"} for name in UPDATE_RULE}
    stepping = {str(path.relative_to(REPO)) for path in library_files() if "torch.optim" in path.read_text()}
    assert stepping == {"es_service/strategy.py", "es_service/backprop.py"}


FILE_LINE_LIMIT = 400


def test_no_library_file_is_over_400_lines():
    """A file a reader can hold: split by concept (config/, kinds.py, problem.py) before it grows past this."""
    lengths = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in library_files()}
    assert {name: lines for name, lines in lengths.items() if lines > FILE_LINE_LIMIT} == {}


def test_the_checks_can_fail(tmp_path):
    """The helpers see imports inside functions too, so a lazy upward import would not slip through."""
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from es_service import config\n    import ray\n")
    assert imported_modules(module) == {"es_service", "ray"}


def test_nothing_imports_the_folder_name_workers():
    """Code imports the installed name ``es_workers``; a bare ``import workers`` works only from a checkout."""
    offenders = [
        str(path.relative_to(REPO))
        for folder in (*PACKAGES.values(), "tests")
        for path in (REPO / folder).rglob("*.py")
        if any(name.split(".")[0] == "workers" for name in imported_modules(path))
    ]
    assert offenders == []


@pytest.mark.e2e
def test_the_wheel_installs_only_the_projects_namespaced_packages(tmp_path):
    """The built wheel's top-level names: es_service and es_workers, never a generic workers or benchmarks."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("es_service", "workers", "benchmarks"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("es_service-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/")[0] for name in names if "/" in name and ".dist-info/" not in name}
    assert tops == {"es_service", "es_workers"} and "es_workers/actor.py" in names
