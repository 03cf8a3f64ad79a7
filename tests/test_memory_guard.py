"""The memory guard of tests/conftest.py fails a test that grows the pytest process, and only that test.

A pytest subprocess loads the repository's conftest as a plugin and runs two tests of its own: one that
touches 400 MB more than the guard allows in this run (a 100 MB limit), one that stays small.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TESTS = """
import numpy as np


def test_big():
    block = np.ones(400 * 2**20 // 8)  # np.ones writes every page: 400 MB resident
    assert block.sum() > 0


def test_small():
    block = np.ones(2**20 // 8)
    assert block.sum() > 0
"""


def test_guard_fails_the_test_that_grows_the_process(tmp_path):
    (tmp_path / "test_alloc.py").write_text(TESTS)
    env = dict(
        os.environ,
        ES_TEST_RSS_GROWTH_LIMIT_MB="100",
        ES_DATA_DIR=os.environ.get("ES_DATA_DIR") or str(tmp_path),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            os.devnull,
            "test_alloc.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "test_alloc.py::test_big raised the test process's peak RSS by" in out, out
    assert "limit 100 MB" in out, out
    assert "2 passed, 1 error" in out, out  # both calls pass; the guard fails test_big in its teardown
    assert "test_small raised" not in out, out
