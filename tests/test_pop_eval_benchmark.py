"""benchmarks/pop_eval.py runs each member kind it offers (the device check calls it on the GPU)."""

from __future__ import annotations

import pytest

from benchmarks import pop_eval


@pytest.mark.parametrize("flags", [[], ["--rank", "1"], ["--shared-first-layer"]])
def test_each_member_kind_is_timed_and_reported(flags):
    report = pop_eval.main(["--device", "cpu", "--shapes", "4x16", "--repeats", "1", "--no-fused", *flags])
    (row,) = report["rows"]
    assert row["members"] == 4 and row["images"] == 16 and row["evaluate_s"] > 0
