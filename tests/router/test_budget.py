"""The budget ledger: rolling windows, throttle then exhaustion, change log, snapshot/restore."""

from __future__ import annotations

import json

import pytest

from router.budget import CLUSTER, BudgetLedger, BudgetLimit, BudgetState, tenant_scope
from wattserve.errors import BudgetExhausted, InvalidRequest


def test_throttle_then_exhaust_then_the_window_rolls_past():
    ledger = BudgetLedger()
    ledger.set_limit(tenant_scope("a"), BudgetLimit(100.0, window_s=60.0, throttle_fraction=0.8), actor="ops", peer="ipv4:1")
    assert ledger.admit("a", 0.0).throttled is False
    ledger.charge("a", 50.0, now_s=1.0)
    assert ledger.admit("a", 2.0).throttled is False
    ledger.charge("a", 35.0, now_s=3.0)
    adm = ledger.admit("a", 4.0)
    assert adm.throttled and "tenant 'a' at 85%" in adm.reason
    ledger.charge("a", 20.0, now_s=5.0)
    with pytest.raises(BudgetExhausted) as err:
        ledger.admit("a", 6.0)
    # 105 J used; the 50 J charged at t=1 leaves the window at t=61: back to 55 J
    assert err.value.details["retry_after_ms"] == 55_000
    assert "retry in 55 s" in str(err.value)
    assert ledger.admit("a", 61.0).throttled is False
    assert ledger.status(tenant_scope("a"), 61.0).used_j == pytest.approx(55.0)
    assert ledger.admit("b", 6.0).throttled is False  # other tenants unaffected


def test_cluster_budget_applies_to_every_tenant():
    ledger = BudgetLedger()
    ledger.set_limit(CLUSTER, BudgetLimit(10.0, 3600.0, 0.5))
    ledger.charge("a", 6.0, 0.0)
    assert "the cluster" in ledger.admit("b", 1.0).reason
    ledger.charge("b", 4.0, 1.0)
    with pytest.raises(BudgetExhausted, match="the cluster used 10 J"):
        ledger.admit("c", 2.0)
    assert ledger.status(CLUSTER, 2.0).state is BudgetState.EXHAUSTED


def test_scopes_without_a_limit_admit_and_forget_their_use_after_a_day_without_status_calls():
    ledger = BudgetLedger()
    for t in range(0, 150, 30):  # 30 s apart: more than a day's bucket (24 s), one bucket each
        ledger.charge("a", 2.0, float(t))
        assert ledger.admit("a", float(t)).throttled is False
    scope = ledger._scopes[tenant_scope("a")]
    assert len(scope.events) == 5 and scope.used_j == pytest.approx(10.0)
    ledger.charge("a", 1.0, 86_465.0)  # a day later the first three have left (charges expire too)
    assert len(scope.events) == 3 and scope.used_j == pytest.approx(5.0)
    assert ledger.status(CLUSTER, 86_465.0).used_j == pytest.approx(5.0)
    assert ledger.status(tenant_scope("a"), 86_525.0).used_j == pytest.approx(1.0)


def test_memory_is_bounded_by_the_window_not_the_request_rate_and_use_is_never_forgotten_early():
    ledger = BudgetLedger()
    ledger.set_limit(tenant_scope("a"), BudgetLimit(1e9, window_s=60.0))
    for i in range(60_000):  # 1,000 requests/s for a minute
        ledger.charge("a", 0.5, i / 1000)
    limited, unlimited = ledger._scopes[tenant_scope("a")], ledger._scopes[CLUSTER]
    assert len(limited.events) <= 3600 + 1 and len(unlimited.events) <= 3 + 1  # 1/60 s and 24 s buckets
    assert ledger.status(tenant_scope("a"), 59.999).used_j == pytest.approx(30_000.0)
    # a window after a charge, that charge is gone; never before: at most one bucket (1/60 s) late
    at = 60.0 + 30.0
    used = ledger.status(tenant_scope("a"), at).used_j
    exact = 0.5 * sum(1 for i in range(60_000) if i / 1000 > at - 60.0)
    assert exact <= used <= exact + 0.5 * 1000 / 60 + 1e-6


def test_changes_are_recorded_with_who_and_why():
    ledger = BudgetLedger()
    ledger.set_limit(CLUSTER, BudgetLimit(5.0), actor="alice", peer="ipv4:127.0.0.1:5", reason="night", unix_s=10.0)
    ledger.set_limit(CLUSTER, None, actor="bob", peer="ipv4:127.0.0.1:6", unix_s=11.0)
    first, second = ledger.changes
    assert (first.actor, first.peer, first.reason, first.old, first.new) == ("alice", "ipv4:127.0.0.1:5", "night", None, BudgetLimit(5.0))
    assert (second.actor, second.old, second.new) == ("bob", BudgetLimit(5.0), None)
    with pytest.raises(InvalidRequest, match="must be 'cluster' or 'tenant:<name>'"):
        ledger.set_limit("acme", BudgetLimit(1.0))
    with pytest.raises(InvalidRequest):
        BudgetLimit(-1.0)


def test_snapshot_restore_round_trip():
    ledger = BudgetLedger()
    ledger.set_limit(tenant_scope("a"), BudgetLimit(100.0, 60.0, 0.5), actor="x", unix_s=1.0)
    ledger.charge("a", 30.0, 1.0)
    ledger.charge("a", 25.0, 2.0)
    data = json.loads(json.dumps(ledger.snapshot()))  # plain data: can be persisted
    again = BudgetLedger.restore(data)
    assert again.snapshot() == ledger.snapshot()
    assert again.status(tenant_scope("a"), 3.0) == ledger.status(tenant_scope("a"), 3.0)
    assert again.status(tenant_scope("a"), 3.0).state is BudgetState.THROTTLED
