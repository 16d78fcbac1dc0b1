"""The gateway's routing glue without Ray: configured budgets, a fitted gate loaded by path and run
off the event loop, charging, learning and the unfinished-request charge."""

from __future__ import annotations

import pytest

from router.budget import CLUSTER, BudgetState
from router.gate_fit import fit_gate, read_labelled
from router.policies.cheapest import Cheapest
from runtime.config import parse_config
from runtime.routing import RoutingService
from tests.fakes import FakeEncoder
from tests.router.helpers import synthetic_csv
from tests.runtime.routing_helpers import CANDS, req
from wattserve.errors import BudgetExhausted, InvalidRequest


def config(**router):
    return parse_config({
        "gateway": {"routing_policy": "moe2"},
        "experts": [{"name": "edge", "engine": "synthetic", "quality_prior": 0.3},
                    {"name": "cloud", "engine": "synthetic", "quality_prior": 0.9}],
        "tenants": [{"name": "acme", "energy_budget_j": 10.0, "budget_window_s": 60}],
        "router": {"quality_per_j": 0, **router},  # budgets alone decide in these tests
    })


async def test_configured_budgets_throttle_and_exhaust():
    now = [0.0]
    svc = RoutingService(config(cluster_budget={"average_power_w": 1.0, "window_s": 1000}), clock=lambda: now[0])
    assert [c.actor for c in svc.ledger.changes] == ["config", "config"]
    plan = await svc.plan(req(), CANDS)
    assert plan.ranked[0].expert == "cloud" and plan.gate == "prior"
    svc.finish(plan, "acme", "cloud", 0, prompt_tokens=4, output_tokens=8, energy_j=9.0, latency_ms=150.0)
    assert svc.cost.errors["cloud"].samples == 1
    throttled = await svc.plan(req(), CANDS)
    assert [c.expert for c in throttled.ranked] == ["edge"]
    svc.charge_unfinished("acme", throttled, fraction=0.5)  # cancelled half way: half its prediction
    assert svc.budget_status(["acme"])[0].used_j == pytest.approx(9.0 + 0.5 * throttled.predicted_energy_j)
    svc.finish(throttled, "acme", "edge", 0, prompt_tokens=4, output_tokens=8, energy_j=1.0, latency_ms=40.0)
    st = {s.scope: s for s in svc.budget_status()}
    assert st["tenant:acme"].state is BudgetState.EXHAUSTED and st[CLUSTER].used_j > 9.0
    with pytest.raises(BudgetExhausted):
        await svc.plan(req(), CANDS)
    now[0] = 61.0  # the window rolled past
    assert (await svc.plan(req(), CANDS)).ranked[0].expert == "cloud"
    with pytest.raises(InvalidRequest, match="unknown tenant 'zed'"):
        svc.set_budget("zed", None, actor="", peer="", reason="")


async def test_a_fitted_gate_is_loaded_by_path_and_named_in_the_plan(tmp_path):
    data = read_labelled(synthetic_csv(tmp_path / "d.csv"))
    fit_gate(data, FakeEncoder().encode(data.prompts), tmp_path / "gate", epochs=5, hidden=8)
    svc = RoutingService(config(gate_path=str(tmp_path / "gate"), gate_outputs={"edge": "prose", "cloud": "math"}))
    await svc.start()  # loads the real MiniLM encoder in a thread
    plan = await svc.plan(req(), CANDS)
    assert plan.gate == f"fitted:{tmp_path / 'gate'}" and "[gate fitted]" in plan.reason
    assert set(plan.weights) == set(plan.subset)


async def test_measured_ensemble_gains_are_read_from_the_gate_directory(tmp_path):
    """``ensemble.json`` beside the gate (``wattserve quality ensemble``) is keyed by the labels'
    columns; the service maps them to its experts, and Score adds a second expert only when the
    measured gain pays for it."""
    from router.ensemble import ENSEMBLE_FILE, EnsembleGains, EnsembleMeasure

    data = read_labelled(synthetic_csv(tmp_path / "d.csv"))
    fit_gate(data, FakeEncoder().encode(data.prompts), tmp_path / "gate", epochs=5, hidden=8)
    names = {"edge": "prose", "cloud": "math"}
    assert RoutingService(config(gate_path=str(tmp_path / "gate"), gate_outputs=names)).settings.ensemble is None
    score = req(kind="score", choices=(" yes", " no"), max_tokens=0)

    async def subset(wins, losses):
        EnsembleGains([EnsembleMeasure(("math", "prose"), 100, 0.5, "math", 0.45, wins, losses)]).save(
            tmp_path / "gate" / ENSEMBLE_FILE)
        svc = RoutingService(config(gate_path=str(tmp_path / "gate"), gate_outputs=names))
        svc.gate = svc.prior_gate  # the fitted gate's encoder is not what this test is about
        assert svc.settings.ensemble.lift(["edge", "cloud"]) == pytest.approx((wins - losses) / 100)
        return set((await svc.plan(score, CANDS)).subset)

    assert await subset(wins=10, losses=2) == {"edge", "cloud"}  # price 0: any measured gain is worth it
    assert await subset(wins=2, losses=10) == {"cloud"}  # the mix spoils more answers than it saves


async def test_a_deadline_is_a_latency_budget_but_never_a_reason_to_refuse():
    svc = RoutingService(config())
    assert (await svc.plan(req(tenant="default"), CANDS)).ranked[0].expert == "cloud"
    # cloud needs ~7 x 20 ms; edge ~7 x 5 ms: a 100 ms deadline moves the request to edge
    assert (await svc.plan(req(tenant="default"), CANDS, time_left_ms=100.0)).ranked[0].expert == "edge"
    # nothing can finish in 1 ms: served anyway (the engine enforces the deadline), not refused
    assert (await svc.plan(req(tenant="default"), CANDS, time_left_ms=1.0)).ranked[0].expert == "cloud"


def test_a_policy_given_to_the_service_is_built_with_its_cost_model_and_settings():
    svc = RoutingService(config(), policy=Cheapest)
    assert isinstance(svc.policy, Cheapest)
    assert svc.policy.cost is svc.cost and svc.policy.settings is svc.settings
    by_config = RoutingService(config())
    assert by_config.policy.name == "moe2" and by_config.policy.cost is by_config.cost

