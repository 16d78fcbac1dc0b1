"""The start-up probe of an expert replica (``ExpertWorker.probe``, in-process, synthetic engine on
the CPU device): after it the profile is measured, and its joules are reported apart from the
requests clients sent, with the totals still adding up to the device's."""

from __future__ import annotations

import asyncio

import pytest

from router.cost import CostModel
from wattserve.errors import EngineDead
from wattserve.types import GenerateCall
from workers.expert import PROBE_OUTPUT_TOKENS, ExpertWorker


async def _serve(worker: ExpertWorker, rid: str, tokens: int):
    """One client request through the worker's stream; its usage."""
    stream = worker.open_stream("client")
    assert await worker.submit("client", [GenerateCall(request_id=rid, prompt="a b c", max_tokens=tokens)]) == [None]
    async for batch in stream:
        for _, item in batch:
            if item[-1].usage is not None:
                await stream.aclose()
                return item[-1].usage
    raise AssertionError("the stream ended")


def test_the_probe_measures_the_profile_and_books_its_energy_apart(text_worker):
    async def main():
        before = await text_worker.profile()
        measured = await text_worker.probe()
        after = await text_worker.profile()
        usage = await _serve(text_worker, "client-1", 4)
        return before, measured, after, usage, await text_worker.profile()

    before, measured, after, usage, served = asyncio.run(main())
    assert before.decode_ms_per_token is None and before.busy_power_w is None
    assert CostModel().predict(before, "synth", 20, 8) is None  # nothing to price it by yet

    assert measured["completion_tokens"] == PROBE_OUTPUT_TOKENS  # end of sequence ignored
    assert measured["energy_j"] > 0 and measured["energy_source"] == "modeled:cpu"
    assert after.decode_ms_per_token > 0 and after.busy_power_w > 0 and after.j_per_token > 0
    assert CostModel().predict(after, "synth", 20, 8).basis == "measured"

    # the probe is no client's: not a finished request, its joules in probe_j, not requests_j
    assert after.requests_finished == 0
    assert after.energy.probe_j == pytest.approx(measured["energy_j"])
    assert after.energy.requests_j == pytest.approx(0.0, abs=1e-12)
    assert served.requests_finished == 1
    assert served.energy.requests_j == pytest.approx(usage.energy_j, rel=1e-9)
    assert served.energy.probe_j == pytest.approx(measured["energy_j"])
    e = served.energy
    assert e.requests_j + e.idle_j + e.probe_j == pytest.approx(e.device_j, rel=1e-9)


def test_a_probe_on_a_dead_engine_fails_and_counts_nothing(text_worker):
    text_worker.loop._dead = "boom"  # what a failed engine step leaves behind

    async def main():
        with pytest.raises(EngineDead, match="boom"):
            await text_worker.probe()
        return await text_worker.profile()

    profile = asyncio.run(main())
    assert profile.energy.probe_j == 0.0 and text_worker._probes == 0
