"""The online cost profile (workers/profile.py): phase powers from steps of one phase only."""

from __future__ import annotations

import pytest

from workers.engines.base import StepTimings
from workers.profile import ProfileTracker


def test_prefill_and_decode_power_come_from_steps_of_that_phase_only():
    prof = ProfileTracker(alpha=0.5)
    prof.observe(StepTimings(prefill_s=0.1, prefill_tokens=50), energy_j=0.8, tokens=50)  # 8 W
    assert prof.prefill_power_w == pytest.approx(8.0) and prof.decode_power_w is None
    prof.observe(StepTimings(decode_s=0.02, decode_batch=1), energy_j=0.08, tokens=1)  # 4 W
    assert prof.decode_power_w == pytest.approx(4.0) and prof.prefill_power_w == pytest.approx(8.0)
    assert prof.busy_power_w == pytest.approx(6.0)  # both phases, as before
    # a step that did both (prompt and decode timed apart) says nothing about either phase alone
    prof.observe(StepTimings(prefill_s=0.1, prefill_tokens=10, decode_s=0.1, decode_batch=2), energy_j=2.0, tokens=12)
    assert prof.prefill_power_w == pytest.approx(8.0) and prof.decode_power_w == pytest.approx(4.0)
    assert prof.busy_power_w == pytest.approx(8.0)


def test_a_scores_choices_stay_out_of_the_prompt_rate_but_in_its_power():
    prof = ProfileTracker(alpha=1.0)
    # 40 prompt tokens in 0.1 s, then the choices in 0.3 s (each reads the output layer)
    prof.observe(StepTimings(prefill_s=0.4, prefill_tokens=40, scored_s=0.3), energy_j=3.2, tokens=52)
    assert prof.prefill_ms_per_token == pytest.approx(2.5)  # 0.1 s / 40, not 0.4 s / 40
    assert prof.prefill_power_w == pytest.approx(8.0) and prof.busy_power_w == pytest.approx(8.0)
