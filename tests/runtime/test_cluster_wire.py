"""What crosses Ray between the gateway and a text replica's multiplexed stream (runtime/cluster.py):
bytes of the standard pickler (``pack``), cloudpickle only for what it refuses, and the actor's
packed ``submit``/``open_stream`` answering like the in-process ones. In process, without Ray."""

from __future__ import annotations

import asyncio
import pickle

from runtime.cluster import ExpertActor, pack
from wattserve.errors import InvalidRequest, QueueFull
from wattserve.specs import ExpertSpec
from wattserve.types import FinishReason, GenerateCall, RequestUsage, StreamEvent


def test_pack_round_trips_a_stream_batch_with_the_standard_pickler():
    usage = RequestUsage(3, 2, 1.5, 4.0, 0.25, "modeled:cpu", FinishReason.LENGTH)
    batch = [("r1", [StreamEvent("r1", " a b", (1, 2), usage)]),
             ("r2", QueueFull("replica is full", retry_after_ms=250))]
    data = pack(batch)
    assert data == pickle.dumps(batch, pickle.HIGHEST_PROTOCOL)  # the standard pickler, not cloudpickle
    (rid, events), (rid2, exc) = pickle.loads(data)
    assert (rid, events) == batch[0]
    assert rid2 == "r2" and isinstance(exc, QueueFull) and exc.details["retry_after_ms"] == 250 and str(exc) == "replica is full"


def test_pack_falls_back_to_cloudpickle_for_what_the_standard_pickler_refuses():
    class LocalError(Exception):  # defined in a function: the standard pickler cannot name it
        pass

    try:
        pickle.dumps(LocalError("x"))
        raise AssertionError("the standard pickler took a local class")
    except (pickle.PicklingError, AttributeError):
        pass
    back = pickle.loads(pack([("r1", LocalError("engine failed"))]))
    assert back[0][0] == "r1" and type(back[0][1]).__name__ == "LocalError" and str(back[0][1]) == "engine failed"


def _actor(tmp_path) -> ExpertActor:
    spec = ExpertSpec.model_validate({"name": "synth", "engine": {"kind": "synthetic", "step_ms": 1},
                                      "device": "cpu", "max_batch": 4, "max_queue": 2})
    return ExpertActor(spec, 0, str(tmp_path), exit_on_failure=False)


def test_packed_submit_and_stream_answer_like_the_in_process_ones(tmp_path):
    actor = _actor(tmp_path)

    async def main():
        stream = actor.open_stream_packed("s1")
        ok = await actor.submit_packed("s1", pack([GenerateCall("r1", "a b c", 3), GenerateCall("r2", "a b", 2)]))
        refused = await actor.submit_packed("s1", pack([GenerateCall("r3", "a", 2), GenerateCall("empty", "", 2)]))
        got: dict[str, list] = {}
        want = {"r1", "r2", "r3"}
        async for data in stream:
            assert isinstance(data, bytes)
            for rid, events in pickle.loads(data):
                got.setdefault(rid, []).extend(events)
                if events[-1].finished:
                    want.discard(rid)
            if not want:
                break
        await stream.aclose()
        return ok, refused, got

    try:
        ok, refused, got = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        actor.shutdown()
    assert ok is None  # every call started: nothing to unpack
    first, second = pickle.loads(refused)
    assert first is None and isinstance(second, InvalidRequest)
    for rid, n in (("r1", 3), ("r2", 2), ("r3", 2)):
        assert "".join(ev.text for ev in got[rid]) == " tok" * n
        assert got[rid][-1].usage.completion_tokens == n
