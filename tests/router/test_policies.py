"""Routing policies are pure: plain values in, a ranked plan out."""

from __future__ import annotations

import random

import pytest

from router.base import Candidate, RequestFeatures, RouterSettings
from router.cost import CostModel
from router.policies import Policy, make_policy, policy_names, register
from router.policies.least_loaded import LeastLoaded
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


def test_unknown_policy_name_lists_the_registered_ones():
    with pytest.raises(ValueError) as err:
        make_policy("oracle")
    assert str(err.value) == f"unknown routing policy 'oracle'; known: {', '.join(policy_names())}"


def test_every_policy_module_registers_its_policy_under_its_name():
    assert policy_names() == ("cheapest", "least_loaded", "moe2", "random", "round_robin", "strongest", "threshold")
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
