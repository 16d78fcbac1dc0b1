"""Energy attribution: every joule the device reports lands in exactly one bucket."""

from __future__ import annotations

import random

import pytest

from workers.energy import EnergyLedger


def test_step_energy_is_split_by_tokens_processed():
    ledger = EnergyLedger("modeled:test")
    ledger.add_step(10.0, {"prefill": 30, "decode-a": 1, "decode-b": 1, "decode-c": 0})
    assert ledger.charged("prefill") == pytest.approx(10.0 * 30 / 32)
    assert ledger.charged("decode-a") == pytest.approx(10.0 / 32)
    assert ledger.charged("decode-c") == 0.0
    assert ledger.close("prefill") == pytest.approx(9.375)
    assert ledger.charged("prefill") == 0.0


def test_step_without_tokens_is_idle():
    ledger = EnergyLedger("modeled:test")
    ledger.add_step(2.0, {})
    assert ledger.totals().idle_j == 2.0 and ledger.totals().requests_j == 0.0


def test_conservation_over_a_random_history():
    rng = random.Random(1)
    ledger = EnergyLedger("modeled:test")
    device_total = 0.0
    closed = 0.0
    live: set[str] = set()
    for step in range(2000):
        idle = rng.random() * 0.01
        joules = rng.random() * 3.0
        device_total += idle + joules
        ledger.add_idle(idle)
        if rng.random() < 0.3:
            live.add(f"r{step}")
        tokens = {rid: rng.choice([1, 1, 1, rng.randint(2, 500)]) for rid in live}
        ledger.add_step(joules, tokens)
        for rid in list(live):
            if rng.random() < 0.05:
                closed += ledger.close(rid)
                live.remove(rid)
    still_open = sum(ledger.charged(r) for r in live)
    totals = ledger.totals()
    assert totals.device_j == pytest.approx(device_total, rel=1e-12)
    assert closed + still_open + totals.idle_j == pytest.approx(totals.device_j, rel=1e-9)
    assert totals.requests_j + totals.idle_j == pytest.approx(totals.device_j, rel=1e-12)
