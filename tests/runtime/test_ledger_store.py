"""The durable budget ledger without Ray: charges and operator changes survive a restart of the
routing service (a new process would do the same), windows keep rolling across it, concurrent
flushes share one write, and a refused write loses nothing."""

from __future__ import annotations

import asyncio

import pytest

from router.base import Plan
from router.budget import CLUSTER, BudgetLimit, BudgetState
from runtime.config import parse_config
from runtime.ledger_store import LedgerStore
from runtime.routing import RoutingService


class Clocks:
    """A monotonic clock that restarts at 0 with each 'process' and a wall clock that does not."""

    def __init__(self) -> None:
        self.unix = 1_700_000_000.0
        self.mono = 0.0

    def advance(self, s: float) -> None:
        self.unix += s
        self.mono += s

    def restart(self) -> None:
        self.mono = 0.0


def service(path, clocks: Clocks, **tenant) -> RoutingService:
    cfg = parse_config({
        "experts": [{"name": "edge", "engine": "synthetic"}],
        "tenants": [{"name": "acme", "energy_budget_j": 10.0, "budget_window_s": 3600, **tenant}, {"name": "beta"}],
        "ledger": {"path": str(path)},
    })
    svc = RoutingService(cfg, clock=lambda: clocks.mono)
    svc.store.wall_clock = lambda: clocks.unix
    return svc


PLAN = Plan(ranked=(), policy="test", reason="", predicted_energy_j=2.0)


def charge(svc: RoutingService, tenant: str, joules: float, rid: str) -> None:
    svc.finish(PLAN, tenant, "edge", 0, prompt_tokens=1, output_tokens=1, energy_j=joules, latency_ms=1.0, request_id=rid)


async def test_use_survives_a_restart_and_the_window_keeps_rolling(tmp_path):
    clocks, path = Clocks(), tmp_path / "ledger.sqlite3"
    svc = service(path, clocks)
    await svc.start()
    charge(svc, "acme", 3.0, "r1")
    clocks.advance(1800)
    charge(svc, "acme", 6.0, "r2")
    charge(svc, "beta", 1.5, "r3")
    svc.charge_unfinished("acme", PLAN, 0.5, request_id="r4")  # 1 J: half of a 2 J prediction
    await svc.flush()
    before = {s.scope: s.used_j for s in svc.budget_status()}
    assert before["tenant:acme"] == pytest.approx(10.0) and before[CLUSTER] == pytest.approx(11.5)
    await svc.stop()

    clocks.restart()  # a new gateway process: its monotonic clock starts over
    again = service(path, clocks)
    await again.start()
    after = {s.scope: s for s in again.budget_status()}
    assert after["tenant:acme"].used_j == pytest.approx(10.0) and after["tenant:acme"].state is BudgetState.EXHAUSTED
    assert after[CLUSTER].used_j == pytest.approx(11.5)
    assert sorted(r[2] for r in again.store.charges()) == ["r1", "r2", "r3", "r4"]
    clocks.advance(1801)  # r1 (3 J) is now older than the hour-long window; r2 and r4 are not
    assert again.budget_status(["acme"])[0].used_j == pytest.approx(7.0)
    await again.stop()


async def test_operator_changes_survive_and_config_limits_are_not_journalled(tmp_path):
    clocks, path = Clocks(), tmp_path / "ledger.sqlite3"
    svc = service(path, clocks)
    await svc.start()
    svc.set_budget("beta", BudgetLimit(500.0, 60.0), actor="ops", peer="ipv4:127.0.0.1", reason="trial")
    svc.set_budget("acme", None, actor="ops", peer="", reason="unlimited now")
    await svc.stop()
    again = service(path, clocks)
    await again.start()
    assert again.ledger.limit("tenant:beta") == BudgetLimit(500.0, 60.0)
    assert again.ledger.limit("tenant:acme") is None  # the operator's change beats the config's 10 J
    assert [(c.scope, c.actor) for c in again.ledger.changes if c.actor == "ops"] == [
        ("tenant:beta", "ops"), ("tenant:acme", "ops")]
    await again.stop()


async def test_concurrent_flushes_share_one_write(tmp_path):
    clocks = Clocks()
    store = LedgerStore(tmp_path / "l.sqlite3", wall_clock=lambda: clocks.unix)
    store.open()
    writes = []
    original = store._write

    def counted(rows, served=()):
        writes.append(len(rows))
        return original(rows, served)

    store._write = counted

    async def finish(i: int) -> None:
        store.append("acme", 1.0, request_id=f"r{i}")
        await store.flush()

    await asyncio.gather(*(finish(i) for i in range(50)))
    assert sum(writes) == 50 and len(writes) < 50  # group commit
    assert len(store.charges()) == 50
    store.close()


async def test_a_refused_write_is_kept_and_written_later(tmp_path):
    store = LedgerStore(tmp_path / "l.sqlite3")
    store.open()
    original, calls = store._write, []

    def flaky(rows, served=()):
        calls.append(len(rows))
        return False if len(calls) == 1 else original(rows, served)

    store._write = flaky
    store.append("acme", 2.0, request_id="a")
    await store.flush()
    assert store.charges() == [] and store._pending  # the disk said no: still in memory
    store.append("acme", 3.0, request_id="b")
    await store.flush()
    assert [r[2] for r in store.charges()] == ["a", "b"]
    store.close()
