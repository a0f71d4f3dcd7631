"""``bench.serving_extras.StepTotals``: the step a stream waits for, weighted by the tokens each step made."""
from __future__ import annotations

import pytest

from bench.serving_extras import StepTotals

pytestmark = pytest.mark.unit


def test_the_step_since_a_moment_is_weighted_by_tokens():
    before = StepTotals(seconds=1.0, steps=10, tokens=50, token_seconds=3.0)
    # since then: one 10 ms step of 1 sequence, one 40 ms step of 16
    after = StepTotals(seconds=1.05, steps=12, tokens=67, token_seconds=3.0 + 0.010 + 0.640)
    assert after.step_since(before) == pytest.approx(0.650 / 17)        # not the plain mean, 25 ms
    assert after.step_since(before) != pytest.approx(0.025)


def test_without_token_counters_it_falls_back_to_the_mean_step():
    assert StepTotals(seconds=0.3, steps=3).step_since(StepTotals()) == pytest.approx(0.1)
    assert StepTotals().step_since(StepTotals()) == 0.0
