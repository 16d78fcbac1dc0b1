"""Routing policies are pure: plain values in, a ranked plan out."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from router.base import Candidate, RequestFeatures, RouterSettings
from router.cost import CostModel
from router.policies import Policy, make_policy, policy_names, register
from router.policies.base import has_room, order_replicas
from router.policies.least_loaded import LeastLoaded
from router.policies.packed import Packed
from wattserve.errors import NoHealthyExpert
from wattserve.types import ExpertProfile


def profile(expert, replica=0, running=0, waiting=0, max_batch=8):
    return ExpertProfile(
        expert=expert, replica=replica, model="m", engine="torch", device="cpu", energy_source="modeled:cpu",
        priority_class="high", max_batch=max_batch, max_queue=8, max_model_len=512, params=1, healthy=True,
        running=running, waiting=waiting,
    )


def cand(expert, replica=0, inflight=0, healthy=True, **kw):
    return Candidate(expert, replica, healthy, inflight, profile(expert, replica, **kw))


REQ = RequestFeatures(prompt_chars=10, max_tokens=5)


def test_ranks_by_occupancy_relative_to_batch():
    pool = [cand("a", running=4, max_batch=8), cand("b", running=2, max_batch=2), cand("c", running=1, max_batch=8)]
    plan = LeastLoaded(rng=random.Random(0)).plan(REQ, pool)
    assert [c.expert for c in plan.ranked] == ["c", "a", "b"]
    assert plan.policy == "least_loaded" and "c/0" in plan.reason


def test_gateway_inflight_counts_when_telemetry_is_stale():
    pool = [cand("a", inflight=3), cand("b", running=1)]
    assert LeastLoaded(rng=random.Random(0)).plan(REQ, pool).ranked[0].expert == "b"


def test_pinned_expert_and_unhealthy_replicas():
    pool = [cand("a", 0, healthy=False), cand("a", 1, running=5), cand("b")]
    plan = LeastLoaded().plan(RequestFeatures(prompt_chars=1, max_tokens=1, expert="a"), pool)
    assert [(c.expert, c.replica) for c in plan.ranked] == [("a", 1)]
    with pytest.raises(NoHealthyExpert, match="expert 'a'"):
        LeastLoaded().plan(RequestFeatures(prompt_chars=1, max_tokens=1, expert="a"), pool[:1])
    with pytest.raises(NoHealthyExpert, match="any expert"):
        LeastLoaded().plan(REQ, [])


def test_ties_are_broken_at_random_but_reproducibly():
    pool = [cand("a"), cand("b"), cand("c")]
    firsts = {LeastLoaded(rng=random.Random(s)).plan(REQ, pool).ranked[0].expert for s in range(30)}
    assert firsts == {"a", "b", "c"}
    assert LeastLoaded(rng=random.Random(5)).plan(REQ, pool) == LeastLoaded(rng=random.Random(5)).plan(REQ, pool)


def test_packed_sends_to_the_fullest_replica_with_room():
    # batch 10, filled to 9 at most: 8 running has room (the fullest such), 9 has none, 2 and 0 are emptier
    pool = [cand("a", 0, running=2, max_batch=10), cand("a", 1, running=9, max_batch=10),
            cand("a", 2, running=8, max_batch=10), cand("a", 3, running=0, max_batch=10)]
    plan = Packed().plan(REQ, pool)
    assert [c.replica for c in plan.ranked] == [2, 0, 3, 1]  # fullest with room first; full ones last
    assert plan.policy == "packed" and "a/2" in plan.reason and "fullest with room" in plan.reason
    assert LeastLoaded(rng=random.Random(0)).plan(REQ, pool).ranked[0].replica == 3  # the opposite choice
    # the gateway's fresher in-flight count fills a replica too
    assert Packed().plan(REQ, [cand("a", 0, inflight=9, max_batch=10), cand("a", 1, running=1, max_batch=10)]
                         ).ranked[0].replica == 1
    # every replica full: the least loaded, said so
    full = Packed().plan(REQ, [cand("a", 0, running=10, max_batch=10), cand("a", 1, running=9, max_batch=10)])
    assert full.ranked[0].replica == 1 and "no replica with room" in full.reason


def test_packed_passes_over_a_replica_that_would_miss_the_latency_budget():
    def measured(replica, running):  # a replica with measured figures, so the cost model predicts latency
        p = replace(profile("a", replica, running=running, max_batch=10), prefill_ms_per_token=0.5,
                    decode_ms_per_token=10.0, j_per_token=1.0, decode_ms_per_step_by_batch={1: 10.0, 10: 30.0},
                    busy_power_w=300.0)
        return Candidate("a", replica, True, 0, p)

    pool = [measured(0, 8), measured(1, 0)]
    cost = CostModel()
    lat = {c.replica: cost.predict(c.profile, c.expert, REQ.tokens_in, REQ.tokens_out, inflight=c.inflight,
                                   queue=True).latency_ms for c in pool}
    assert lat[0] > lat[1]  # a fuller batch waits longer
    tight = RequestFeatures(prompt_chars=10, max_tokens=5, latency_budget_ms=(lat[0] + lat[1]) / 2)
    assert Packed(cost=cost).plan(tight, pool).ranked[0].replica == 1
    assert Packed(cost=cost).plan(REQ, pool).ranked[0].replica == 0


def test_unknown_policy_name_lists_the_registered_ones():
    with pytest.raises(ValueError) as err:
        make_policy("oracle")
    assert str(err.value) == f"unknown routing policy 'oracle'; known: {', '.join(policy_names())}"


def test_every_policy_module_registers_its_policy_under_its_name():
    assert policy_names() == ("cheapest", "least_loaded", "moe2", "packed", "random", "round_robin", "strongest", "threshold")
    cost, settings = CostModel(), RouterSettings(threshold=0.1)
    for name in policy_names():
        policy = make_policy(name, cost=cost, settings=settings)
        assert policy.name == name and policy.cost is cost and policy.settings is settings


def test_a_second_policy_under_a_taken_name_is_refused():
    class Impostor(Policy):
        name = "least_loaded"

    with pytest.raises(ValueError, match="registered twice"):
        register(Impostor)
    assert make_policy("least_loaded").__class__ is LeastLoaded


# -- the replica order (one rule: order_replicas), inside every policy ---------------------------
def group(*loads, max_batch=10):
    """Replicas 0.. of expert "a" with these running counts."""
    return [cand("a", i, running=n, max_batch=max_batch) for i, n in enumerate(loads)]


def test_order_replicas_packed_is_the_fullest_with_room_then_the_least_loaded():
    reps = group(2, 9, 8, 0)  # batch 10, filled to 9: 8 has room, 9 has none
    assert [c.replica for c in order_replicas(reps, "packed")] == [2, 0, 3, 1]
    assert [c.replica for c in order_replicas(reps, "least_loaded")] == [3, 0, 2, 1]
    # ties: the lower replica index, in both orders
    assert [c.replica for c in order_replicas(group(1, 1, 0), "packed")] == [0, 1, 2]
    assert [c.replica for c in order_replicas(group(1, 1, 0), "least_loaded")] == [2, 0, 1]
    # the batch's fill bound: batch 2 x 0.9 = 1.8, so a replica running one has no room for another
    assert not has_room(cand("a", running=1, max_batch=2)) and has_room(cand("a", running=0, max_batch=2))
    with pytest.raises(ValueError, match="unknown replica order 'fullest'"):
        order_replicas(reps, "fullest")


def test_a_cold_replica_comes_after_every_warm_one_in_both_orders():
    cold = Candidate("a", -1, True, 0, profile("a", -1), cold_start_ms=500.0)
    reps = [cold, *group(9, 3)]
    for order in ("packed", "least_loaded"):
        assert order_replicas(reps, order)[-1] is cold


def test_moe2_orders_its_experts_replicas_as_configured():
    reps = group(0, 5, 2)
    spread = make_policy("moe2", settings=RouterSettings()).plan(REQ, reps)
    packed = make_policy("moe2", settings=RouterSettings(replica_order="packed")).plan(REQ, reps)
    assert [c.replica for c in spread.ranked] == [0, 2, 1]  # least loaded first (the default)
    assert [c.replica for c in packed.ranked] == [1, 2, 0]  # the fullest with room first
    assert "replicas packed" in packed.reason and "replicas packed" not in spread.reason
    # the same rule as the packed policy's, applied to the chosen expert
    assert packed.ranked == make_policy("packed").plan(REQ, reps).ranked


def test_moe2_packed_prices_the_replica_it_sends_to():
    def measured(replica, running):
        p = replace(profile("a", replica, running=running, max_batch=10), prefill_ms_per_token=0.5,
                    decode_ms_per_token=10.0, j_per_token=1.0, decode_ms_per_step_by_batch={1: 10.0, 10: 30.0},
                    busy_power_w=300.0)
        return Candidate("a", replica, True, 0, p)

    reps, cost = [measured(0, 0), measured(1, 6)], CostModel()
    packed = make_policy("moe2", cost=cost, settings=RouterSettings(replica_order="packed")).plan(REQ, reps)
    spread = make_policy("moe2", cost=cost, settings=RouterSettings()).plan(REQ, reps)
    assert packed.ranked[0].replica == 1 and spread.ranked[0].replica == 0

    def latency(c):
        return cost.predict(c.profile, c.expert, REQ.tokens_in, REQ.tokens_out, inflight=0, queue=True).latency_ms

    assert packed.predicted_latency_ms == pytest.approx(latency(reps[1]))
    assert spread.predicted_latency_ms == pytest.approx(latency(reps[0]))
    # a latency budget only the empty replica meets: packing gives way to it
    tight = replace(REQ, latency_budget_ms=(latency(reps[0]) + latency(reps[1])) / 2)
    plan = make_policy("moe2", cost=cost, settings=RouterSettings(replica_order="packed")).plan(tight, reps)
    assert plan.ranked[0].replica == 0


@pytest.mark.parametrize("name", ["cheapest", "random", "round_robin", "strongest", "threshold"])
def test_the_baselines_that_choose_an_expert_order_its_replicas_as_configured(name):
    reps = group(0, 5, 2)
    packed = make_policy(name, rng=random.Random(0), settings=RouterSettings(replica_order="packed")).plan(REQ, reps)
    spread = make_policy(name, rng=random.Random(0), settings=RouterSettings()).plan(REQ, reps)
    assert [c.replica for c in packed.ranked] == [1, 2, 0] and [c.replica for c in spread.ranked] == [0, 2, 1]


def test_moe2_spreads_by_the_gateways_count_not_by_noise_in_measured_speed():
    # replica 0 measured a slightly faster step, and telemetry has not yet seen the gateway's
    # dispatches: the order (the gateway's in-flight count) decides, not the faster measurement
    p = replace(profile("a", max_batch=4), prefill_ms_per_token=0.5, decode_ms_per_token=10.0, j_per_token=1.0,
                decode_ms_per_step_by_batch={1: 10.0, 4: 10.0}, busy_power_w=300.0)
    slower = replace(p, replica=1, decode_ms_per_step_by_batch={1: 10.5, 4: 10.5}, decode_ms_per_token=10.5)
    reps = [Candidate("a", 0, True, 2, p), Candidate("a", 1, True, 1, slower)]
    spread = make_policy("moe2", cost=CostModel(), settings=RouterSettings()).plan(REQ, reps)
    packed = make_policy("moe2", cost=CostModel(), settings=RouterSettings(replica_order="packed")).plan(REQ, reps)
    assert spread.ranked[0].replica == 1 and packed.ranked[0].replica == 0
