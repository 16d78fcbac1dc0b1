"""What the routing service learns across requests, without Ray: the price of energy per tenant
(fixed or derived from a budget's burn rate) and feedback (attribution, errors, persistence)."""

from __future__ import annotations

import time

import pytest

from router.price import DEFAULT_QUALITY_PER_J
from runtime.config import parse_config
from runtime.routing import RoutingService
from tests.runtime.routing_helpers import CANDS, req
from wattserve.errors import AlreadyRecorded, InvalidRequest, NotFound


def config(tenants=(), **router):
    return parse_config({
        "gateway": {"routing_policy": "moe2"},
        "experts": [{"name": "edge", "engine": "synthetic", "quality_prior": 0.3},
                    {"name": "cloud", "engine": "synthetic", "quality_prior": 0.9}],
        "tenants": list(tenants),
        "router": router,
    })


async def test_prices_cluster_default_fixed_per_tenant_and_a_tenants_own_dual():
    now = [0.0]
    tenants = [{"name": "thrifty", "quality_per_j": 1.0}, {"name": "lavish", "quality_per_j": 0.0},
               {"name": "metered", "quality_per_j": "auto", "energy_budget_j": 60.0, "budget_window_s": 60},
               {"name": "plain"}]
    svc = RoutingService(config(tenants, price={"interval_s": 10, "step": 0.01}), clock=lambda: now[0])
    assert svc.price_for("plain") == DEFAULT_QUALITY_PER_J  # auto, no cluster budget: the default
    assert svc.price_for("thrifty") == 1.0 and svc.price_for("lavish") == 0.0
    assert svc.price_for("metered") == DEFAULT_QUALITY_PER_J  # its own dual starts at 0
    # metered burns 3 W against its 1 W budget for an interval: its dual rises by 2 x step
    plan = await svc.plan(req(tenant="metered"), CANDS)
    svc.finish(plan, "metered", plan.ranked[0].expert, 0, prompt_tokens=4, output_tokens=8, energy_j=30.0,
               latency_ms=10.0)
    now[0] = 10.0
    assert svc.price_for("metered") == pytest.approx(DEFAULT_QUALITY_PER_J + 0.02)
    assert svc.price_for("plain") == DEFAULT_QUALITY_PER_J
    # the price decides: at 1 quality per J, cloud's 0.6 extra quality is not worth its joules
    assert (await svc.plan(req(tenant="thrifty"), CANDS)).ranked[0].expert == "edge"
    assert (await svc.plan(req(tenant="lavish"), CANDS)).ranked[0].expert == "cloud"


async def test_the_cluster_price_is_the_dual_of_the_cluster_budget():
    now = [0.0]
    svc = RoutingService(config(quality_per_j="auto", cluster_budget={"average_power_w": 1.0, "window_s": 3600},
                                price={"interval_s": 10, "step": 0.001, "max_quality_per_j": 0.01,
                                       "default_quality_per_j": 0.005}),
                         clock=lambda: now[0])
    plan = await svc.plan(req(tenant="x"), CANDS)
    for k in range(1, 30):
        svc.finish(plan, "x", "cloud", 0, prompt_tokens=4, output_tokens=8, energy_j=20.0, latency_ms=10.0)
        now[0] = 10.0 * k
        svc.price_for("x")  # 2 W against 1 W: +step per interval, up to the bound
    assert svc.price_for("x") == 0.01
    fixed = RoutingService(config(quality_per_j=0.002))
    assert fixed.price_for("x") == 0.002 and not fixed.cluster_price.auto


async def test_feedback_is_attributed_to_the_answering_expert_and_validated():
    svc = RoutingService(config(quality_per_j=0))
    plan = await svc.plan(req(tenant="acme"), CANDS)
    assert plan.ranked[0].expert == "cloud" and plan.predicted_quality == {"edge": 0.3, "cloud": 0.9}
    svc.remember("r1", "acme", "cloud", plan)
    with pytest.raises(InvalidRequest, match=r"score must be a number in \[0, 1\]"):
        await svc.record_feedback("r1", 1.5, "acme")
    with pytest.raises(InvalidRequest):
        await svc.record_feedback("r1", "1", "acme")
    with pytest.raises(NotFound, match="no finished request 'nope'"):
        await svc.record_feedback("nope", 1.0)
    with pytest.raises(NotFound):  # another tenant cannot score (or learn of) acme's request
        await svc.record_feedback("r1", 1.0, "other")
    served, correction = await svc.record_feedback("r1", 0.0, "acme")
    assert served.expert == "cloud" and correction < 0
    with pytest.raises(AlreadyRecorded):
        await svc.record_feedback("r1", 0.0)
    after = await svc.plan(req(tenant="acme"), CANDS)
    assert "feedback" in after.gate and after.predicted_quality["cloud"] == 0.9  # raw q kept for residuals


async def _started_with_a_ledger(cfg, tmp_path):
    """A started service whose ledger file is in ``tmp_path``, and its plan for an acme request."""
    cfg.ledger.path = str(tmp_path / "ledger.sqlite3")
    svc = RoutingService(cfg)
    await svc.start()
    return svc, await svc.plan(req(tenant="acme"), CANDS)


async def test_learned_quality_survives_a_restart(tmp_path):
    cfg = config()
    svc, plan = await _started_with_a_ledger(cfg, tmp_path)
    for i in range(3):
        svc.remember(f"r{i}", "acme", "cloud", plan)
        await svc.record_feedback(f"r{i}", 0.0)
    before = svc.feedback.correction("cloud", "acme")
    await svc.stop()
    again = RoutingService(cfg)
    assert again.feedback.correction("cloud", "acme") == 0.0
    await again.start()
    assert again.feedback.correction("cloud", "acme") == pytest.approx(before)
    assert before < -0.3
    assert again.feedback.rows() == svc.feedback.rows()
    await again.stop()


async def test_feedback_for_a_request_served_before_a_restart_is_accepted(tmp_path):
    """Who answered which request is kept in the ledger file, with the memory's bounds (count and
    age): after a restart a client can still score it, once."""
    cfg = config(feedback={"remember_requests": 3, "remember_s": 3600})
    svc, plan = await _started_with_a_ledger(cfg, tmp_path)
    for i in range(5):
        svc.remember(f"r{i}", "acme", "cloud", plan)
        await svc.flush()  # what the gateway does before the final message
    await svc.record_feedback("r4", 1.0)
    await svc.stop()

    again = RoutingService(cfg)
    with pytest.raises(NotFound):  # nothing restored before start
        await again.record_feedback("r3", 0.0)
    await again.start()
    for gone in ("r0", "r1"):  # beyond the memory's count, on disk as in memory
        with pytest.raises(NotFound):
            await again.record_feedback(gone, 0.0)
    stored = again.store._db.execute("SELECT COUNT(*) FROM served_requests").fetchone()[0]
    assert stored == 3
    with pytest.raises(AlreadyRecorded):  # scored before the restart
        await again.record_feedback("r4", 0.0)
    with pytest.raises(NotFound):  # still only for its own tenant
        await again.record_feedback("r3", 0.0, "other")
    served, correction = await again.record_feedback("r3", 0.0, "acme")
    assert served.expert == "cloud" and served.tenant == "acme" and correction < 0
    await again.stop()

    later = RoutingService(cfg)
    later.store.wall_clock = lambda: time.time() + 3601  # an hour on: past remember_s
    await later.start()
    with pytest.raises(NotFound):
        await later.record_feedback("r2", 0.0)
    await later.stop()


def test_config_refuses_negative_prices():
    with pytest.raises(Exception, match="quality_per_j must be a finite number >= 0"):
        config([{"name": "a", "quality_per_j": -0.1}])


async def test_operators_set_prices_live():
    svc = RoutingService(config([{"name": "acme"}]))
    assert svc.set_price("acme", 0.5, actor="ops", peer="", reason="") == "the cluster's"
    assert svc.price_for("acme") == 0.5 and svc.price_of_scope("tenant:acme")[1] == "fixed for the tenant"
    assert (await svc.plan(req(tenant="acme"), CANDS)).ranked[0].expert == "edge"
    svc.set_price("acme", None, actor="ops", peer="", reason="")  # back to the cluster's
    assert svc.price_for("acme") == DEFAULT_QUALITY_PER_J
    svc.set_price("cluster", 0.0, actor="ops", peer="", reason="")
    assert svc.price_for("acme") == 0.0 and svc.price_of_scope("cluster")[1] == "fixed 0/J"
    svc.set_price("cluster", "auto", actor="ops", peer="", reason="")
    assert svc.cluster_price.auto and svc.price_for("acme") == DEFAULT_QUALITY_PER_J
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidRequest, match="quality_per_j must be a finite number"):
            svc.set_price("acme", bad, actor="", peer="", reason="")
    with pytest.raises(InvalidRequest, match="unknown tenant"):
        svc.set_price("zed", 0.1, actor="", peer="", reason="")
    with pytest.raises(InvalidRequest, match="nothing to inherit|no price to inherit"):
        svc.set_price("cluster", None, actor="", peer="", reason="")
