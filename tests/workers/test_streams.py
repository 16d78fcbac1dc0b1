"""The multiplexed stream of an expert replica (workers/streams.py), in-process: many requests'
events on one stream, refusals per call, and a closed stream aborts what it still carried."""

from __future__ import annotations

import asyncio

import workers.expert
from wattserve.errors import ExpertUnavailable, InvalidRequest, QueueFull
from wattserve.types import GenerateCall, StreamEvent
from workers.streams import Outbox


def _call(rid: str, tokens: int = 5, prompt: str = "a b c") -> GenerateCall:
    return GenerateCall(request_id=rid, prompt=prompt, max_tokens=tokens)


async def _collect(stream, want: set[str]) -> dict[str, list]:
    """Read batches until every request in ``want`` has finished or failed."""
    got: dict[str, list] = {}
    async for batch in stream:
        for rid, item in batch:
            got.setdefault(rid, []).append(item)
            if isinstance(item, BaseException) or item[-1].finished:
                want.discard(rid)
        if not want:
            return got
    raise AssertionError("the stream ended")


def test_many_requests_share_one_stream_in_order(text_worker):
    async def main():
        stream = text_worker.open_stream("s1")
        reader = asyncio.ensure_future(_collect(stream, {"r1", "r2", "r3"}))
        assert await text_worker.submit("s1", [_call("r1", 5), _call("r2", 3), _call("r3", 7)]) == [None, None, None]
        got = await asyncio.wait_for(reader, 10)
        await stream.aclose()
        return got

    got = asyncio.run(main())
    for rid, n in (("r1", 5), ("r2", 3), ("r3", 7)):
        events = [ev for item in got[rid] for ev in item]
        assert all(isinstance(ev, StreamEvent) and ev.request_id == rid for ev in events)
        assert "".join(ev.text for ev in events) == " tok" * n
        assert [ev.finished for ev in events] == [False] * (len(events) - 1) + [True]
        assert events[-1].usage.completion_tokens == n
    assert text_worker.loop.snapshot().requests_finished == 3


def test_refusals_come_back_per_call(text_worker):
    async def main():
        calls = [_call("ok"), _call("empty", prompt=""), *(_call(f"f{i}", 500) for i in range(6))]
        results = await text_worker.submit("s1", calls)
        await asyncio.sleep(0)
        stream = text_worker.open_stream("s1")
        await stream.aclose()  # aborts what was admitted
        return results

    results = asyncio.run(main())
    assert results[0] is None
    assert isinstance(results[1], InvalidRequest)
    assert sum(isinstance(r, QueueFull) for r in results[2:]) == 1  # capacity 6: ok + 5 of the 6 fit
    assert sum(r is None for r in results) == 6


def test_closing_the_stream_aborts_its_unfinished_requests(text_worker):
    async def main():
        stream = text_worker.open_stream("s1")
        await text_worker.submit("s1", [_call("long", 10_000), _call("short", 2)])
        got = await asyncio.wait_for(_collect(stream, {"short"}), 10)
        await stream.aclose()  # what Ray does when the gateway cancels the stream
        for _ in range(100):
            snap = text_worker.loop.snapshot()
            if snap.running == snap.waiting == 0:
                return got, snap
            await asyncio.sleep(0.02)
        raise AssertionError(f"still running: {snap}")

    got, snap = asyncio.run(main())
    assert got["short"][-1][-1].finished
    assert snap.requests_finished == 2  # the long one ended as aborted
    assert "s1" not in text_worker._outboxes


async def _until_idle(text_worker) -> object:
    for _ in range(200):
        snap = text_worker.loop.snapshot()
        if snap.running == snap.waiting == 0:
            return snap
        await asyncio.sleep(0.02)
    raise AssertionError(f"still running: {snap}")


def test_a_submit_after_its_stream_closed_is_refused_and_runs_nothing(text_worker):
    async def main():
        stream = text_worker.open_stream("s1")
        reader = asyncio.ensure_future(_collect(stream, {"a"}))
        await text_worker.submit("s1", [_call("a", 2)])
        await asyncio.wait_for(reader, 10)
        await stream.aclose()  # the gateway's stream failed or was cancelled ...
        late = await text_worker.submit("s1", [_call("late", 10_000)])  # ... while this submit was on its way
        return late, await _until_idle(text_worker)

    late, snap = asyncio.run(main())
    assert isinstance(late[0], ExpertUnavailable) and "retry" in str(late[0])
    assert snap.requests_finished == 1  # "late" never started
    assert "s1" not in text_worker._outboxes


def test_a_stream_never_opened_has_its_requests_aborted(text_worker, monkeypatch):
    monkeypatch.setattr(workers.expert, "STREAM_OPEN_GRACE_S", 0.2)

    async def main():
        assert await text_worker.submit("orphan", [_call("long", 10_000)]) == [None]
        assert text_worker.loop.snapshot().running + text_worker.loop.snapshot().waiting == 1
        await asyncio.sleep(0.3)
        snap = await _until_idle(text_worker)
        late = await text_worker.submit("orphan", [_call("later", 5)])
        return snap, late

    snap, late = asyncio.run(main())
    assert snap.requests_finished == 1  # ended as aborted, its slot free
    assert "orphan" not in text_worker._outboxes
    assert isinstance(late[0], ExpertUnavailable)


def test_outbox_wakes_once_for_items_delivered_together():
    async def main():
        loop = asyncio.get_running_loop()
        box = Outbox(loop, abort=lambda rid: None)
        batches = box.batches()
        sinks = [box.sink_for(f"r{i}") for i in range(3)]

        def engine_step():  # a step's outputs, delivered from the engine thread one after another
            for i, sink in enumerate(sinks):
                sink([StreamEvent(f"r{i}", " tok", (0,))])

        await loop.run_in_executor(None, engine_step)
        first = await anext(batches)
        await batches.aclose()
        return first

    assert [rid for rid, _ in asyncio.run(main())] == ["r0", "r1", "r2"]


def test_outbox_merges_a_requests_events_delivered_together():
    async def main():
        loop = asyncio.get_running_loop()
        box = Outbox(loop, abort=lambda rid: None)
        batches = box.batches()
        a, b = box.sink_for("a"), box.sink_for("b")

        def two_steps():
            a([StreamEvent("a", " x", (1,))])
            b([StreamEvent("b", " y", (2,))])
            a([StreamEvent("a", " z", (3,))])
            b(QueueFull("gone"))

        await loop.run_in_executor(None, two_steps)
        first = await anext(batches)
        await batches.aclose()
        return first

    batch = asyncio.run(main())
    assert [rid for rid, _ in batch] == ["a", "b", "b"]
    assert batch[0][1] == [StreamEvent("a", " x z", (1, 3))]
    assert batch[1][1] == [StreamEvent("b", " y", (2,))]
    assert isinstance(batch[2][1], QueueFull)
