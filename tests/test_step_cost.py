"""benchmarks/step_cost.py: the bookkeeping of its timings (it compares no speed here)."""

from __future__ import annotations

from benchmarks.step_cost import measure
from tests.helpers import ACTIVITY, tiny_config


def test_each_round_times_both_steps_and_the_ratio_is_theirs(mnist):
    result = measure(tiny_config(*ACTIVITY, "generations=100"), mnist, rounds=3, warmup=1)
    assert len(result["times"]["es_step"]) == len(result["times"]["backprop_step"]) == len(result["ratios"]) == 3
    for es, backprop, ratio in zip(result["times"]["es_step"], result["times"]["backprop_step"], result["ratios"]):
        assert es > 0 and backprop > 0 and ratio == es / backprop
    assert result["batch_size"] == 64
