"""The live capacity controller without Ray: fake replicas behind the gateway's seam, a fake pool
that starts and releases them, and a controller clock the test moves. Each test ends with nothing
held (no admission slot, no in-flight count, no open stream)."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry, generate_latest

from router.base import Candidate, RequestFeatures
from router.cost import CostModel
from router.policies.base import predict
from router.policies.least_loaded import LeastLoaded
from runtime.api.prometheus import export
from runtime.capacity.controller import CapacityController, release_order
from runtime.config import parse_config
from runtime.gateway import Final, Gateway, Request
from runtime.gateway.replicas import COLD_REPLICA, ReplicaState
from tests.fakes import FakeClock, FakeReplicaClient, FixedOrderPolicy
from wattserve.errors import ExpertUnavailable
from wattserve.types import ExpertProfile


class FakePool:
    """Starts fake replicas after ``start_s`` (or fails them) and records what it released. The next
    ``dying`` replicas it starts die before their first token."""

    def __init__(self, tokens: int = 64, start_s: float = 0.0) -> None:
        self.tokens, self.start_s = tokens, start_s
        self.fail = False
        self.dying = 0
        self.started: list[FakeReplicaClient] = []
        self.removed: list[tuple[str, int]] = []
        self._next = 100

    async def start_replica(self, expert: str, timeout_s: float) -> FakeReplicaClient:
        await asyncio.sleep(self.start_s)
        if self.fail:
            raise ExpertUnavailable(f"{expert} did not start: fake failure")
        self._next += 1
        client = FakeReplicaClient(expert, self._next, tokens=self.tokens, max_batch=4)
        if self.dying > 0:
            self.dying -= 1
            client.die_after = 0
        self.started.append(client)
        return client

    def remove(self, expert: str, index: int) -> None:
        self.removed.append((expert, index))


def setup(experts=("a",), *, capacity: dict | None = None, tokens: int = 64, start_s: float = 0.0):
    clients = [FakeReplicaClient(e, 0, tokens=tokens, max_batch=4) for e in experts]
    cap = {"enabled": True, "interval_s": 1.0, "planner": {"peak_window_s": 0, "ewma_s": 1.0},
           "experts": {"a": {"min_replicas": 0, "max_replicas": 3, "scale_to_zero_after_s": 5,
                             "scale_down_delay_s": 2, "cold_start_s": 0.5,
                             "slo": {"ttft_ms": 2000, "tpot_ms": 200}}}}
    cap.update(capacity or {})
    cfg = parse_config({"gateway": {"health_interval_s": 3600},
                        "experts": [{"name": e, "engine": {"kind": "synthetic"}, "max_batch": 4} for e in experts],
                        "router": {"quality_per_j": 0}, "capacity": cap})
    gw = Gateway(cfg, clients, policy=FixedOrderPolicy(list(experts)))
    pool, clock = FakePool(tokens, start_s), FakeClock(1000.0)
    ctl = CapacityController(cfg.capacity, {e.name: e for e in cfg.experts}, gw.replicas, pool, gw.admin.capacity,
                             clock=clock, wall=clock)
    return gw, ctl, pool, clock


@contextlib.asynccontextmanager
async def running(gw: Gateway, ctl: CapacityController):
    await gw.start()
    try:
        yield
    finally:
        await ctl.stop()
        await gw.stop()
        assert gw.inflight == 0 and all(r.inflight == 0 for r in gw.admin.replicas())
        assert not any(s.client.open_streams for s in gw.replicas.states())


async def ask(gw: Gateway, n: int, **kw) -> list[Final]:
    async def one():
        return [x async for x in gw.generate(Request(prompt="a b c", max_tokens=64, **kw))][-1]
    return list(await asyncio.gather(*(one() for _ in range(n))))


async def settle(ctl: CapacityController) -> None:
    """Let the controller's background starts and drains finish."""
    for _ in range(200):
        if not ctl._tasks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("controller tasks did not finish")


def names(gw: Gateway, expert: str = "a") -> list[int]:
    return sorted(i for i, s in gw.replicas.sets[expert].states.items() if not s.removing)


async def test_a_burst_scales_up_and_quiet_time_scales_down_then_to_zero():
    gw, ctl, pool, clock = setup()
    seen: list[int] = []  # what the power governor would be told: the replicas after each change

    async def changed() -> None:
        seen.append(len(names(gw)))

    ctl.on_replicas_changed = changed
    async with running(gw, ctl):
        finals = await ask(gw, 20)
        assert all(f.usage.completion_tokens == 64 for f in finals)
        clock.advance(1.0)
        (plan,) = ctl.tick()  # 20 req/s of 64 tokens: more than one replica of batch 4 holds
        assert plan.replicas > 1 and "req/s" in plan.reason
        await settle(ctl)
        assert len(names(gw)) == plan.replicas and len(pool.started) == plan.replicas - 1
        state = gw.admin.capacity_view().experts[0]
        assert (state.wanted, state.running, state.cold_starts) == (plan.replicas, plan.replicas, plan.replicas - 1)
        # quiet: fewer replicas only after scale_down_delay_s, the last one only after the idle delay
        clock.advance(1.0)
        (plan,) = ctl.tick()
        assert plan.replicas == len(names(gw)) and "holding" in plan.reason
        for _ in range(3):
            clock.advance(1.0)
            (plan,) = ctl.tick()
        await settle(ctl)
        assert names(gw) == [0] and plan.replicas == 1 and len(pool.removed) == len(pool.started)
        for _ in range(5):
            clock.advance(1.0)
            (plan,) = ctl.tick()
        await settle(ctl)
        assert plan.replicas == 0 and names(gw) == [] and ("a", 0) in pool.removed
        actions = [e.action for e in gw.admin.capacity_view().events]
        assert actions[0] == "scale_up" and "scale_down" in actions and actions[-2:] == ["scale_to_zero", "removed"]
        assert all(e.reason for e in gw.admin.capacity_view().events)
        assert len(seen) == len(pool.started) + len(pool.removed) and seen[-1] == 0


async def test_a_cold_expert_is_routable_and_a_request_wakes_it():
    gw, ctl, pool, clock = setup(start_s=0.05)
    async with running(gw, ctl):
        await gw.replicas.remove(("a", 0))  # as a release would leave it
        (cand,) = gw.replicas.candidates()
        assert cand.replica == COLD_REPLICA and cand.healthy and cand.cold_start_ms == 500.0
        assert gw.admin.healthy() and gw.admin.status().healthy_replicas == 0  # cold, not down
        finals = await ask(gw, 3)  # three at once: one start serves them all
        assert [f.usage.completion_tokens for f in finals] == [64] * 3 and len(pool.started) == 1
        assert {f.replica for f in finals} == {pool.started[0].index}
        view = gw.admin.capacity_view()
        assert [e.action for e in view.events] == ["wake", "started"] and view.experts[0].cold_starts == 1
        assert view.experts[0].cold_start_s < 0.5  # measured now (the fake start is fast)


async def test_a_request_that_cannot_wait_for_a_start_goes_to_the_next_expert():
    gw, ctl, pool, clock = setup(("a", "b"), start_s=0.05)
    async with running(gw, ctl):
        await gw.replicas.remove(("a", 0))
        gw.replicas.sets["a"].cold_start_ms = 30_000.0
        (final,) = await ask(gw, 1, timeout_s=5.0)
        assert final.expert == "b" and not pool.started  # passed over at once, no start for it
        assert gw.replicas.sets["a"].arrivals == 1  # still load the next plan sees
        clock.advance(1.0)
        (plan,) = ctl.tick()
        await settle(ctl)
        assert plan.replicas >= 1 and len(pool.started) == plan.replicas


async def test_a_failed_start_fails_the_waiting_request_with_unavailable_and_is_logged():
    gw, ctl, pool, clock = setup(start_s=0.01)
    async with running(gw, ctl):
        await gw.replicas.remove(("a", 0))
        pool.fail = True
        try:
            await ask(gw, 1)
        except ExpertUnavailable as exc:
            assert "did not start" in str(exc) or "failed to start" in str(exc)
        else:
            raise AssertionError("expected UNAVAILABLE")
        assert [e.action for e in gw.admin.capacity_view().events] == ["wake", "start_failed"]


async def test_a_woken_replica_that_dies_before_the_first_token_is_replaced_by_waking_another():
    gw, ctl, pool, clock = setup(start_s=0.01)
    async with running(gw, ctl):
        await gw.replicas.remove(("a", 0))
        pool.dying = 1  # the first replica a request wakes dies before its first token
        (final,) = await ask(gw, 1)
        first, second = pool.started
        assert first.dead and final.usage.completion_tokens == 64 and final.replica == second.index
        assert gw.counters.retried == 1 and gw.admin.status().requests_failed == 0
        assert [e.action for e in gw.admin.capacity_view().events] == ["wake", "started", "wake", "started"]
        # the dead one goes first when the controller scales down (it is unhealthy)
        for _ in range(3):
            clock.advance(1.0)
            ctl.tick()
        await settle(ctl)
        assert names(gw) == [second.index] and pool.removed == [("a", first.index)]


async def test_a_request_wakes_at_most_wakes_per_request_replicas_then_fails_saying_so():
    gw, ctl, pool, clock = setup(start_s=0.01, capacity={"wakes_per_request": 3})
    async with running(gw, ctl):
        await gw.replicas.remove(("a", 0))
        pool.dying = 5  # every start dies at once
        try:
            await ask(gw, 1)
        except ExpertUnavailable as exc:
            assert "3 replica(s) woken for this request failed before its first token" in str(exc)
            assert "wakes_per_request" in str(exc)
        else:
            raise AssertionError("expected UNAVAILABLE")
        assert len(pool.started) == 3 and all(c.dead for c in pool.started)


async def test_a_woken_replica_that_dies_is_replaced_by_a_warm_replica_of_the_plan_first():
    gw, ctl, pool, clock = setup(("a", "b"), start_s=0.01)
    async with running(gw, ctl):
        await gw.replicas.remove(("a", 0))  # a is cold; the fixed order still tries it first
        pool.dying = 1
        (final,) = await ask(gw, 1)
        assert final.expert == "b" and len(pool.started) == 1 and pool.started[0].dead
        assert gw.counters.retried == 1


async def test_a_warm_replica_that_dies_is_replaced_by_waking_its_expert_when_no_other_is_left():
    gw, ctl, pool, clock = setup(start_s=0.01)
    async with running(gw, ctl):
        gw.replicas.state(("a", 0)).client.die_after = 0
        (final,) = await ask(gw, 1)
        assert final.replica == pool.started[0].index and gw.counters.retried == 1
        assert [e.action for e in gw.admin.capacity_view().events] == ["wake", "started"]


async def test_a_replica_released_while_streaming_finishes_its_request_there():
    gw, ctl, pool, clock = setup(capacity={"experts": {"a": {"min_replicas": 1, "max_replicas": 2,
                                                             "scale_down_delay_s": 2}}})
    second = FakeReplicaClient("a", 1, tokens=64, max_batch=4)
    second.step_s = 0.005
    gw.replicas.add(second)
    async with running(gw, ctl):
        await gw.replicas.poll_once()
        first = gw.replicas.state(("a", 0)).client
        first.full = True  # one request goes to replica 1 ...
        pending = asyncio.ensure_future(ask(gw, 1))
        await asyncio.sleep(0.02)
        first.full, second.full, first.step_s = False, True, 0.005
        others = asyncio.ensure_future(ask(gw, 2))  # ... two to replica 0: replica 1 is the emptiest,
        await asyncio.sleep(0.02)  # the one a scale-down releases first
        second.full = False
        assert second.open_streams and len(first.open_streams) == 2
        for _ in range(4):
            clock.advance(1.0)
            (plan,) = ctl.tick()
        assert plan.replicas == 1 and gw.replicas.state(("a", 1)).removing
        (final,) = await pending
        await others
        await settle(ctl)
        assert final.usage.completion_tokens == 64 and final.replica == 1
        assert pool.removed == [("a", 1)] and names(gw) == [0]


async def test_simulated_expert_gets_a_target_clock_recorded_not_applied_and_exported():
    gw, ctl, pool, clock = setup(capacity={"experts": {"a": {"min_replicas": 1, "max_replicas": 2}}})
    spec = ctl.specs["a"].model_copy(update={"device": ctl.specs["a"].device.model_copy(
        update={"backend": "simulated", "profile": "h100"})})
    ctl.specs["a"] = spec.model_copy(update={"engine": spec.engine.model_copy(update={"model_params": 8_000_000_000})})
    async with running(gw, ctl):
        await ask(gw, 2)
        clock.advance(1.0)
        (plan,) = ctl.tick()
        state = gw.admin.capacity_view().experts[0]
        assert state.target_clock_mhz == plan.clock_mhz > 0 and not state.clock_applied
        assert state.energy_source.startswith("modeled:") and state.saved_energy_j > 0  # 1 of 2 replicas off
        registry = CollectorRegistry()
        export(gw.admin, registry)
        text = generate_latest(registry).decode()
        for series in ('wattserve_capacity_replicas_wanted{expert="a"} 1.0', 'wattserve_capacity_replicas_running',
                       'wattserve_capacity_cold_starts_total{expert="a"} 0.0',
                       'wattserve_capacity_target_sm_clock_mhz{applied="false",expert="a"}',
                       'kind="estimate"'):
            assert series in text, series


async def test_the_power_budget_is_a_ceiling_shared_by_the_sized_experts():
    gw, ctl, pool, clock = setup(capacity={"experts": {"a": {"min_replicas": 1, "max_replicas": 3}}})
    ctl.power_budget_w = lambda: 10.0
    async with running(gw, ctl):
        assert ctl._budget_share() == 10.0
        await ask(gw, 20)
        clock.advance(1.0)
        (plan,) = ctl.tick()
        assert plan.predicted_power_w <= 10.0 or not plan.slo_met


def test_a_cold_candidates_start_is_in_its_predicted_latency_and_ranks_after_warm_ones():
    profile = ExpertProfile(expert="a", replica=0, model="m", engine="synthetic", device="cpu", energy_source="x",
                            priority_class="high", max_batch=4, max_queue=4, max_model_len=64, params=1, healthy=True,
                            running=3, waiting=0, prefill_ms_per_token=1.0, decode_ms_per_token=5.0, j_per_token=0.1)
    warm = Candidate("a", 0, True, 3, profile)
    cold = Candidate("b", COLD_REPLICA, True, 0, profile, cold_start_ms=30_000.0)
    req = RequestFeatures(prompt_chars=40, max_tokens=10)
    cost = CostModel()
    assert predict(cost, req, cold).latency_ms == predict(cost, req, Candidate("b", 0, True, 0, profile)).latency_ms + 30_000
    assert LeastLoaded(cost=cost).plan(req, [cold, warm]).ranked[0] is warm


def test_capacity_show_says_when_the_controller_is_off_and_labels_targets_and_estimates():
    from runtime.api.capacity_proto import capacity_to_proto
    from runtime.cli.capacity import render_capacity
    from runtime.gateway.admin import CapacityView

    assert "off" in render_capacity(capacity_to_proto(CapacityView(False, (), ())))
    gw, ctl, pool, clock = setup()
    gw.admin.capacity.experts["a"].target_clock_mhz = 1200.0
    shown = render_capacity(capacity_to_proto(gw.admin.capacity_view()))
    assert "1200 (n/a)" in shown and "estimate" in shown


def test_scale_down_releases_the_unhealthy_then_the_emptiest_then_the_newest():
    def state(index, healthy=True, inflight=0):
        return ReplicaState(FakeReplicaClient("a", index), healthy=healthy, inflight=inflight)

    busy_old, idle_old, idle_new, busy_new, dead = state(0, inflight=3), state(1), state(2), state(3, inflight=1), \
        state(4, healthy=False, inflight=2)
    order = release_order([busy_old, idle_old, idle_new, busy_new, dead])
    # before: the newest healthy went first, busy or not (3 before 2), draining a full replica while
    # an idle one stayed up
    assert [s.client.index for s in order] == [4, 2, 1, 3, 0]

