"""The request lifecycle without Ray: fake replicas behind the ``ReplicaClient`` seam drive the
retry, abandon, cascade, deadline, replica-death and scaling paths in milliseconds. Every test
ends by checking the invariants of a call that has left: no admission slot, no replica in-flight
count and no open stream on any replica is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from router.base import Plan
from runtime.config import parse_config
from runtime.gateway import Chunk, Final, Gateway, Request
from tests.fakes import FakeReplicaClient, FixedOrderPolicy
from wattserve.errors import ExpertUnavailable, InvalidRequest, QueueFull, ShuttingDown


def make_gateway(clients: list[FakeReplicaClient], policy: FixedOrderPolicy | None = None, **gateway) -> Gateway:
    experts = sorted({c.expert for c in clients})
    cfg = parse_config({
        "gateway": {"health_interval_s": 3600, **gateway},
        "experts": [{"name": e, "engine": "synthetic", "replicas": sum(c.expert == e for c in clients)}
                    for e in experts],
        "router": {"quality_per_j": 0},
    })
    return Gateway(cfg, clients, policy=policy or FixedOrderPolicy(experts))


@contextlib.asynccontextmanager
async def running(gw: Gateway):
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()
        assert_nothing_held(gw)


def assert_nothing_held(gw: Gateway) -> None:
    assert gw.inflight == 0, "an admission slot leaked"
    assert all(r.inflight == 0 for r in gw.admin.replicas()), "a replica in-flight count leaked"
    for s in gw.replicas.states():
        assert not s.client.open_streams, f"{s.client.name} still works on {s.client.open_streams}"


async def collect(gw: Gateway, **kw) -> tuple[list[Chunk], Final]:
    items = [item async for item in gw.generate(Request(prompt="hello", max_tokens=4, **kw))]
    assert isinstance(items[-1], Final)
    return items[:-1], items[-1]


async def test_a_request_streams_from_the_first_replica_and_is_charged():
    a, b = FakeReplicaClient("a"), FakeReplicaClient("b")
    async with running(make_gateway([a, b])) as gw:
        chunks, final = await collect(gw)
        assert "".join(c.text for c in chunks) == " t0 t1 t2 t3" and {c.expert for c in chunks} == {"a"}
        assert (final.expert, final.usage.completion_tokens) == ("a", 4) and not b.calls
        assert gw.admin.status().requests_total == 1 and gw.routing.ledger.status("tenant:default", 0).used_j > 0


async def test_a_replica_that_dies_before_its_first_token_is_replaced_once():
    a, b = FakeReplicaClient("a"), FakeReplicaClient("b")
    a.die_after = 0
    async with running(make_gateway([a, b])) as gw:
        _, final = await collect(gw)
        assert final.expert == "b" and gw.counters.retried == 1
        assert not gw.replicas.healthy(("a", 0)), "a dead replica is unhealthy at once, before the next poll"
        # the next request does not try the dead replica (its telemetry fails too now)
        _, again = await collect(gw)
        assert again.expert == "b" and len(a.calls) == 1


async def test_no_retry_after_a_token_reached_the_caller():
    a, b = FakeReplicaClient("a"), FakeReplicaClient("b")
    a.die_after = 2
    async with running(make_gateway([a, b])) as gw:
        got: list = []
        with pytest.raises(ExpertUnavailable, match="died while serving this request .*after 2 tokens"):
            async for item in gw.generate(Request(prompt="hello", max_tokens=4)):
                got.append(item)
        assert [c.text for c in got] == [" t0", " t1"] and not b.calls and gw.counters.retried == 0
        assert gw.counters.failed == 1
        # the part that ran is charged (the predicted 2 J x 2 of 4 tokens), not forgiven
        assert gw.routing.ledger.status("tenant:default", 0).used_j == pytest.approx(1.0)


async def test_retry_unstarted_off_fails_at_once():
    a, b = FakeReplicaClient("a"), FakeReplicaClient("b")
    a.die_after = 0
    async with running(make_gateway([a, b], retry_unstarted=False)) as gw:
        with pytest.raises(ExpertUnavailable):
            await collect(gw)
        assert not b.calls


async def test_a_full_replica_is_passed_over_and_all_full_is_queue_full():
    a0, a1, b = FakeReplicaClient("a", 0), FakeReplicaClient("a", 1), FakeReplicaClient("b")
    a0.full = True
    async with running(make_gateway([a0, a1, b])) as gw:
        _, final = await collect(gw)
        assert (final.expert, final.replica) == ("a", 1) and not a0.aborted, "a refusal needs no abort"
        a1.full = b.full = True
        with pytest.raises(QueueFull, match="every eligible replica is full"):
            await collect(gw)
        assert gw.counters.retried == 0


async def test_a_client_that_leaves_mid_stream_aborts_the_work_and_frees_everything():
    a = FakeReplicaClient("a", tokens=100)
    a.hang_after = 2
    async with running(make_gateway([a])) as gw:
        items: list = []

        async def consume():
            async for item in gw.generate(Request(prompt="hello", max_tokens=100)):
                items.append(item)

        task = asyncio.create_task(consume())
        while len(items) < 2:
            await asyncio.sleep(0.001)
        assert gw.inflight == 1 and a.open_streams
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a.aborted == [a.calls[0].request_id]
        assert gw.counters.failed == 1


async def test_the_deadline_travels_to_the_engine_and_shapes_the_plan():
    a = FakeReplicaClient("a")
    async with running(make_gateway([a])) as gw:
        await collect(gw, timeout_s=30.0)
        left = a.calls[0].deadline_unix_s - time.time()
        assert 25.0 < left <= 30.0
        await collect(gw)
        assert a.calls[1].deadline_unix_s is None


async def test_cascade_keeps_a_confident_answer_and_escalates_an_unsure_one():
    cheap, strong = FakeReplicaClient("cheap", energy_j=1.0), FakeReplicaClient("strong", energy_j=5.0)
    policy = FixedOrderPolicy(["cheap", "strong"], cascade=("cheap", "strong"), below=-1.0)
    async with running(make_gateway([cheap, strong], policy)) as gw:
        cheap.mean_logprob = -0.5
        chunks, final = await collect(gw)
        assert final.expert == "cheap" and final.plan.cascaded == ("cheap",) and not strong.calls
        assert {c.expert for c in chunks} == {"cheap"}
        cheap.mean_logprob = -3.0
        chunks, final = await collect(gw)
        assert final.expert == "strong" and final.plan.cascaded == ("cheap", "strong")
        assert {c.expert for c in chunks} == {"strong"}, "the unsure answer is held back, never streamed"
        assert final.usage.energy_j == pytest.approx(6.0), "both answers are charged"


async def test_score_mixes_the_experts_that_answered_and_survives_one_that_died():
    a = FakeReplicaClient("a", choice_logprobs=(-0.1, -3.0))
    b = FakeReplicaClient("b", choice_logprobs=(-3.0, -0.1))

    class Both(FixedOrderPolicy):
        def plan(self, request, candidates):
            plan = super().plan(request, candidates)
            return Plan(ranked=plan.ranked, policy="fake", reason="both", subset=("a", "b"), weights={"a": 0.75, "b": 0.25})

    async with running(make_gateway([a, b], Both(["a", "b"]))) as gw:
        out = await gw.score(Request(kind="score", prompt="pick", choices=("x", "y")))
        assert out.best == 0 and {c.expert for c in out.contributions} == {"a", "b"}
        b.die_after = 0
        out = await gw.score(Request(kind="score", prompt="pick", choices=("x", "y")))
        assert [c.expert for c in out.contributions] == ["a"] and out.contributions[0].weight == 1.0
        with pytest.raises(InvalidRequest, match="choices is empty"):
            await gw.score(Request(kind="score", prompt="pick"))


async def test_score_ranks_choices_by_the_requested_normalisation():
    # summed log p prefers the short choice; per character, the long one is likelier
    a = FakeReplicaClient("a", choice_logprobs=(-2.0, -3.0))
    choices = ("no", " a much longer answer")
    async with running(make_gateway([a])) as gw:
        summed = await gw.score(Request(kind="score", prompt="pick", choices=choices))
        per_char = await gw.score(Request(kind="score", prompt="pick", choices=choices, choice_norm="per_char"))
    assert summed.best == 0 and per_char.best == 1
    assert per_char.contributions[0].choice_logprobs == (-2.0, -3.0)  # the raw sums stay as they were
    assert per_char.contributions[0].choice_probs[1] > per_char.contributions[0].choice_probs[0]


async def test_replicas_added_and_removed_at_run_time_are_seen_by_the_router():
    a0 = FakeReplicaClient("a", 0)
    async with running(make_gateway([a0])) as gw:
        a1 = FakeReplicaClient("a", 1)
        gw.replicas.add(a1)
        await gw.replicas.poll_once()
        assert {c.key for c in gw.replicas.candidates()} == {("a", 0), ("a", 1)}
        a0.full = True
        _, final = await collect(gw)
        assert final.replica == 1
        # removing a replica that holds a stream: no new calls, the stream finishes, then it leaves
        a0.full, a1.step_s = False, 0.01
        stream = gw.generate(Request(prompt="hello", max_tokens=4, expert="a"))
        first = await anext(stream)
        holder = ("a", first_replica := next(s.client.index for s in gw.replicas.states() if s.inflight))
        removal = asyncio.create_task(gw.replicas.remove(holder))
        await asyncio.sleep(0)
        assert holder not in {c.key for c in gw.replicas.candidates()}
        rest = [item async for item in stream]
        assert isinstance(rest[-1], Final) and rest[-1].replica == first_replica and first.text == " t0"
        removed = await removal
        assert removed.key == holder and holder not in {s.key for s in gw.replicas.states()}


async def test_refusals_count_once_and_hold_nothing():
    a = FakeReplicaClient("a")
    async with running(make_gateway([a])) as gw:
        with pytest.raises(InvalidRequest):
            await collect(gw, expert="nope")
        gw.drain.draining = True
        with pytest.raises(ShuttingDown):
            await collect(gw)
        assert (gw.counters.total, gw.counters.failed) == (2, 2) and not a.calls
