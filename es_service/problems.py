"""A problem of one's own named on the command line: ``--problem MODULE:CLASS``.

The module is imported from the current directory (as ``python -m`` would) or from the installed
packages, and the class is built with no arguments. A module that is not installed travels to Ray
workers by value (cloudpickle), so a cluster's workers need only the service installed, not the
user's files. run.json records the name, and ``resume`` builds the problem from it again.
"""

from __future__ import annotations

import importlib
import os
import sys
import sysconfig
from pathlib import Path

from es_service.config import shown
from es_service.runs import UsageError
from es_workers.problem import Problem

EXAMPLE = "examples.spirals:Spirals"


def name_of(problem: Problem) -> str:
    """MODULE:CLASS of a problem, what run.json records."""
    return f"{type(problem).__module__}:{type(problem).__qualname__}"


def load_problem(spec: str) -> Problem:
    """The problem ``spec`` (MODULE:CLASS) names, built with no arguments; one line (UsageError) when
    it cannot be."""
    module_name, colon, attribute = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not (module_name and colon and attribute):
        raise UsageError(f"--problem {shown(spec)}: expected MODULE:CLASS, e.g. {EXAMPLE}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module's own error while it loads
        raise UsageError(
            f"--problem {shown(spec)}: cannot import {module_name!r} ({type(err).__name__}: {err}); "
            "run from the folder that holds it, or install it"
        ) from None
    cls = getattr(module, attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, Problem)):
        raise UsageError(
            f"--problem {shown(spec)}: {module_name}.{attribute} is not a subclass of es_service.Problem "
            f"({type(cls).__name__}); name one, e.g. {EXAMPLE}"
        )
    try:
        problem = cls()
    except Exception as err:
        raise UsageError(
            f"--problem {shown(spec)}: {attribute}() failed ({type(err).__name__}: {err}); "
            "a problem named on the command line must build with no arguments"
        ) from None
    _ship_by_value(module)
    return problem


def _ship_by_value(module) -> None:
    """Pickle the module's classes by value for Ray's workers when it is not installed."""
    installed = Path(sysconfig.get_paths()["purelib"]).resolve()
    if installed in Path(module.__file__).resolve().parents:
        return
    try:
        from ray import cloudpickle
    except ImportError:  # no Ray: the in-process executor needs nothing shipped
        return
    cloudpickle.register_pickle_by_value(module)
