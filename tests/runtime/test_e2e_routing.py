"""MoE² routing end to end: the real gRPC server, Ray actors and synthetic experts whose energy
is modeled by simulated devices (deterministic joules), with the documented prior gate.

"edge" pretends to be a 135M model on a Jetson Orin, "cloud" an 8B model on an H100 with a
stronger quality prior: with no budget the router picks cloud, a tight energy budget forces edge.
Nothing here asserts on timing: latency budgets are chosen with wide margins around step sizes.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.config import parse_config
from tests.runtime.grpc_helpers import collect, wait_for

pytestmark = pytest.mark.timeout(300)

CLOUD_STEP_MS = 20


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return parse_config(
        {
            "auth": {"enabled": False},  # loopback test server: no keys
            "gateway": {"port": 0, "routing_policy": "moe2", "health_interval_s": 0.2},
            "model_cache_dir": str(tmp_path_factory.mktemp("cache")),
            "experts": [
                {"name": "edge", "engine": {"kind": "synthetic", "step_ms": 1, "model_params": 135_000_000},
                 "device": "simulated:orin", "max_batch": 4, "max_queue": 8, "quality_prior": 0.35},
                {"name": "cloud", "engine": {"kind": "synthetic", "step_ms": CLOUD_STEP_MS, "model_params": 8_000_000_000},
                 "device": "simulated:h100", "max_batch": 1, "max_queue": 4, "quality_prior": 0.8},
            ],
            "tenants": [{"name": "default"}, {"name": "acme"}],
            "router": {
                "cost_priors": {
                    "edge": {"prefill_ms_per_token": 0.1, "decode_ms_per_token": 2, "j_per_token": 0.1},
                    "cloud": {"prefill_ms_per_token": 1, "decode_ms_per_token": CLOUD_STEP_MS, "j_per_token": 3},
                },
                "aggregation_ms": 1,
                "quality_per_j": 0,  # budgets alone decide in these tests (the price: test_routing_learning.py)
            },
        },
        "routing-test",
    )


PROMPT = "one two three four five"


def request(max_tokens=8, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=PROMPT, max_tokens=max_tokens, sampling=pb.SamplingParams(ignore_eos=True), **kw)


async def usage_of(stub, req, timeout=60):
    return (await collect(stub, req, timeout))[2]


async def load(channel, expert):
    experts = await pb_grpc.AdminStub(channel).ListExperts(pb.ListExpertsRequest())
    return sum(r.running + r.waiting for e in experts.experts if e.name == expert for r in e.replicas)


@pytest.fixture(scope="module")
async def predicted(server):
    """Warm both experts up (measured profiles), then read the router's predictions for REQUEST."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        for expert in ("edge", "cloud", "edge", "cloud"):
            await usage_of(stub, request(expert=expert))
        await asyncio.sleep(0.5)  # a telemetry poll with the measured figures
        edge = await usage_of(stub, request(expert="edge"))
        cloud = await usage_of(stub, request(expert="cloud"))
        await asyncio.sleep(0.5)
    assert 0 < edge.predicted_energy_j < cloud.predicted_energy_j / 5, (edge, cloud)
    return {"edge": edge.predicted_energy_j, "cloud": cloud.predicted_energy_j}


async def test_no_budget_picks_the_strong_expert_and_says_the_gate_is_the_prior(channel, predicted):
    usage = await usage_of(pb_grpc.InferenceStub(channel), request())
    assert usage.expert == "cloud" and usage.routing_policy == "moe2"
    assert usage.gate == "prior" and "gate prior" in usage.routing_reason
    assert list(usage.subset)[0] == "cloud" and set(usage.subset) == {"cloud", "edge"}
    assert sum(usage.gate_weights.values()) == pytest.approx(1.0)
    assert usage.energy_source == "modeled:h100" and not usage.budget_exceeded


async def test_tight_energy_budget_picks_edge_and_loose_picks_cloud(channel, predicted):
    stub = pb_grpc.InferenceStub(channel)
    # Simulated joules are exact but the measured power behind predictions moves with the wall time
    # of each step on this busy host: budgets sit a factor of ~4 away from either prediction.
    between = (predicted["edge"] * predicted["cloud"]) ** 0.5
    tight = await usage_of(stub, request(energy_budget_j=between))
    assert tight.expert == "edge" and list(tight.subset) == ["edge"]
    assert tight.predicted_energy_j <= between
    loose = await usage_of(stub, request(energy_budget_j=10 * predicted["cloud"]))
    assert loose.expert == "cloud"
    assert loose.predicted_energy_j <= 10 * predicted["cloud"]


async def test_budget_below_every_expert_is_failed_precondition_naming_the_cheapest(channel, predicted):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await usage_of(pb_grpc.InferenceStub(channel), request(energy_budget_j=predicted["edge"] / 100))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the cheapest plan is edge" in err.value.details() and "send energy_budget_j >=" in err.value.details()


async def test_tight_latency_budget_avoids_the_queued_expert(channel, predicted):
    stub = pb_grpc.InferenceStub(channel)
    # Unqueued, cloud answers 8 tokens in ~8 x 20 ms: a 450 ms budget admits it.
    assert (await usage_of(stub, request(latency_budget_ms=450))).expert == "cloud"
    busy = [stub.Generate(request(expert="cloud", max_tokens=400), timeout=60) for _ in range(4)]
    assert await wait_for(lambda: _load_at_least(channel, "cloud", 4))
    # Now three requests wait behind the one running (max_batch 1): ~4 x 160 ms more than that.
    usage = await usage_of(stub, request(latency_budget_ms=450))
    assert usage.expert == "edge", usage.routing_reason
    for call in busy:
        call.cancel()
    assert await wait_for(lambda: _load_is(channel, "cloud", 0))


async def _load_at_least(channel, expert, n):
    return await load(channel, expert) >= n


async def _load_is(channel, expert, n):
    return await load(channel, expert) == n


async def test_tenant_budget_throttles_then_exhausts(channel, predicted):
    stub = pb_grpc.InferenceStub(channel)
    admin = pb_grpc.AdminStub(channel)
    first = await usage_of(stub, request(tenant="acme"))  # use is tracked without a limit too
    assert first.expert == "cloud"
    # throttled from 1.5 x one cloud request's energy: after the second one, not after the first
    resp = await admin.SetEnergyBudget(pb.SetEnergyBudgetRequest(
        scope="acme", energy_budget_j=3 * first.energy_j, window_s=3600, throttle_fraction=0.5,
        actor="test-operator", reason="e2e"))
    assert resp.budget.scope == "tenant:acme" and resp.budget.state == "ok"
    assert resp.budget.used_j == pytest.approx(first.energy_j)
    assert resp.change.actor == "test-operator" and resp.change.peer and "unlimited" in resp.change.old_budget
    second = await usage_of(stub, request(tenant="acme"))
    assert second.expert == "cloud"
    throttled = await usage_of(stub, request(tenant="acme"))
    assert throttled.expert == "edge" and "cheapest expert only" in throttled.routing_reason
    # other tenants are unaffected
    assert (await usage_of(stub, request(tenant="default"))).expert == "cloud"
    shown = await admin.GetEnergyBudget(pb.GetEnergyBudgetRequest(scopes=["acme"], recent_changes=5))
    (acme,) = shown.budgets
    assert acme.state == "throttled"
    assert acme.used_j == pytest.approx(first.energy_j + second.energy_j + throttled.energy_j, rel=1e-6)
    assert any(c.actor == "test-operator" and c.reason == "e2e" for c in shown.changes)
    # the operator lowers the budget below what acme already used: refused with a retry hint
    await admin.SetEnergyBudget(pb.SetEnergyBudgetRequest(scope="acme", energy_budget_j=acme.used_j / 2, actor="ops"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await usage_of(stub, request(tenant="acme"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'acme'" in err.value.details()
    assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 0
    await admin.SetEnergyBudget(pb.SetEnergyBudgetRequest(scope="acme", unlimited=True, actor="ops", reason="cleanup"))
    assert (await usage_of(stub, request(tenant="acme"))).expert == "cloud"


async def test_score_returns_the_ensemble_and_each_experts_contribution(channel, predicted):
    stub = pb_grpc.InferenceStub(channel)
    choices = ["Paris", "London", "Rome and Milan"]
    resp = await stub.Score(pb.ScoreRequest(prompt="The capital of France is", choices=choices), timeout=60)
    assert {e.expert for e in resp.experts} == {"edge", "cloud"}
    assert sum(e.weight for e in resp.experts) == pytest.approx(1.0)
    for k in range(len(choices)):  # the ensemble is the weighted mixture of the experts' answers
        assert resp.choice_probs[k] == pytest.approx(sum(e.weight * e.choice_probs[k] for e in resp.experts))
    assert resp.best_choice == max(range(len(choices)), key=lambda k: resp.choice_probs[k])
    assert resp.best_text == choices[resp.best_choice]
    assert all(e.energy_j > 0 and len(e.choice_logprobs) == 3 for e in resp.experts)
    assert resp.energy_j == pytest.approx(sum(e.energy_j for e in resp.experts))
    assert resp.gate == "prior" and resp.routing_policy == "moe2"
    # a budget that only the edge expert fits: the ensemble is edge alone
    between = (_energy(resp, "edge") * _energy(resp, "cloud")) ** 0.5
    edge_only = await stub.Score(pb.ScoreRequest(prompt="The capital of France is", choices=choices,
                                                 energy_budget_j=between))
    assert [e.expert for e in edge_only.experts] == ["edge"]
    assert list(edge_only.choice_probs) == pytest.approx(list(edge_only.experts[0].choice_probs))


def _energy(resp, expert):
    return next(e.energy_j for e in resp.experts if e.expert == expert)


async def test_score_bad_input(channel):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await pb_grpc.InferenceStub(channel).Score(pb.ScoreRequest(prompt="x", choices=[]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "choices is empty" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await pb_grpc.InferenceStub(channel).Score(pb.ScoreRequest(prompt="x", choices=["a", "b"], choice_norm="mean"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "choice_norm must be one of" in err.value.details()


async def test_admin_exports_prediction_error(channel, predicted, server, capsys):
    await pb_grpc.InferenceStub(channel).Score(pb.ScoreRequest(prompt=PROMPT, choices=["a", "b"], expert="edge"))
    experts = await pb_grpc.AdminStub(channel).ListExperts(pb.ListExpertsRequest())
    by_name = {e.name: e for e in experts.experts}
    for name in ("edge", "cloud"):
        p = by_name[name].prediction
        assert p.samples > 0 and p.energy_correction > 0
    score = by_name["edge"].score_prediction  # Score's own corrections, apart from Generate's
    assert score.samples >= 1 and score.energy_correction > 0
    from runtime.cli import main

    rc = await asyncio.to_thread(main, ["status", "--target", f"127.0.0.1:{server.port}"])
    out = capsys.readouterr().out
    assert rc == 0 and "edge       score" in out and "edge       generate" in out, out
    status = await pb_grpc.AdminStub(channel).GetStatus(pb.GetStatusRequest())
    assert status.gate == "prior" and status.routing_policy == "moe2"


async def test_budget_cli_sets_and_shows_with_the_change_log(server, capsys):
    from runtime.cli import main

    target = f"127.0.0.1:{server.port}"
    rc = await asyncio.to_thread(main, ["budget", "set", "cluster", "--average-power-w", "500", "--window-s", "60",
                                        "--actor", "cli-test", "--reason", "peak hours", "--target", target])
    out = capsys.readouterr().out
    assert rc == 0 and "cluster: unlimited -> 30000 J per 60 s" in out and "by cli-test from" in out
    rc = await asyncio.to_thread(main, ["budget", "show", "--target", target, "--changes", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and "cluster" in out and "500.00 W avg" in out and "(peak hours)" in out
    assert "price of energy 0 quality/J (fixed 0/J)" in out  # the configured price (router.quality_per_j: 0)
    rc = await asyncio.to_thread(main, ["budget", "set", "nobody", "--energy-j", "5", "--target", target])
    assert rc == 1 and "unknown tenant 'nobody'" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["budget", "set", "cluster", "--unlimited", "--target", target]) == 0
    # the price of energy, live (then back to the configured 0 for the other tests)
    assert await asyncio.to_thread(main, ["budget", "price", "acme", "--quality-per-j", "0.5", "--target", target]) == 0
    out = capsys.readouterr().out
    assert "tenant:acme: price of energy was the cluster's, now fixed for the tenant" in out
    assert await asyncio.to_thread(main, ["budget", "price", "acme", "--quality-per-j", "-1", "--target", target]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["budget", "price", "acme", "--inherit", "--target", target]) == 0


async def test_http_api_and_metrics_show_the_routing_decision(server, predicted):
    import aiohttp

    base = f"http://127.0.0.1:{server.http_port}"
    async with aiohttp.ClientSession() as http:
        body = {"model": "auto", "prompt": PROMPT, "max_tokens": 4, "energy_budget_j": 4 * predicted["edge"]}
        async with http.post(f"{base}/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            info = (await resp.json())["wattserve"]
        assert info["expert"] == "edge" and info["gate"] == "prior" and info["subset"] == ["edge"]
        assert info["budget_exceeded"] is False and info["predicted_energy_j"] <= 4 * predicted["edge"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:  # Score learns apart
            await pb_grpc.InferenceStub(ch).Score(pb.ScoreRequest(prompt=PROMPT, choices=["a", "b"], expert="cloud"))
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    assert 'wattserve_energy_budget_used_joules{scope="cluster"}' in text
    assert 'wattserve_router_prediction_relative_error{expert="cloud",kind="energy"}' in text
    assert 'wattserve_router_score_prediction_relative_error{expert="cloud",kind="energy"}' in text


async def test_cascade_keeps_a_confident_cheap_answer_and_escalates_an_unsure_one(server, channel, predicted):
    """The synthetic engine's confidence is a fixed hash of (expert, prompt): set the threshold
    just below or just above edge's to force each branch."""
    import dataclasses

    from workers.engines.synthetic import fake_token_logprob

    policy = server.gateway.routing.policy
    before = policy.settings
    edge_conf = fake_token_logprob("edge", PROMPT)
    stub = pb_grpc.InferenceStub(channel)
    try:
        policy.settings = dataclasses.replace(before, cascade_below_logprob=edge_conf - 0.01)
        kept = await usage_of(stub, request(max_tokens=6))
        assert kept.expert == "edge" and list(kept.cascade) == ["edge"], kept.routing_reason
        assert kept.mean_logprob == pytest.approx(edge_conf) and "kept edge's answer" in kept.routing_reason
        policy.settings = dataclasses.replace(before, cascade_below_logprob=edge_conf + 0.01)
        text, _, usage = await collect(stub, request(max_tokens=6))
        assert usage.expert == "cloud" and list(usage.cascade) == ["edge", "cloud"]
        assert text == " tok" * 6  # only the strong expert's answer reached the client
        assert usage.energy_j > predicted["cloud"] / 8 * 6 * 0.5 and "answered by cloud" in usage.routing_reason
        # both outcomes taught the router about edge (weak feedback: kept 1, escalated 0)
        edge_fb = server.gateway.routing.feedback.stats[("*", "edge")]
        assert edge_fb.scores == 2 and edge_fb.weight == pytest.approx(2 * 0.5)
        # a budget that cannot pay for both answers: no cascade, the top expert of what fits
        tight = await usage_of(stub, request(max_tokens=6, energy_budget_j=(predicted["edge"] * predicted["cloud"]) ** 0.5))
        assert tight.expert == "edge" and list(tight.cascade) == []
    finally:
        policy.settings = before
        # the cascade's outcomes were feedback: other tests of this module expect the bare prior
        server.gateway.routing.feedback.stats.clear()
