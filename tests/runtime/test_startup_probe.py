"""``ExpertPool.probe``: one start-up probe per ready text replica, one replica at a time, and a
failed probe is reported without stopping the others (no Ray: fake actor handles)."""

from __future__ import annotations

import asyncio

from runtime.cluster import ExpertPool, Replica
from wattserve.specs import ExpertSpec


class FakeProbeMethod:
    def __init__(self, log: list, name: str, fail: bool) -> None:
        self.log, self.name, self.fail = log, name, fail

    def remote(self):
        return self._run()

    async def _run(self) -> dict:
        self.log.append(("start", self.name))
        await asyncio.sleep(0.01)
        self.log.append(("end", self.name))
        if self.fail:
            raise RuntimeError("engine failed")
        return {"prefill_ms_per_token": 0.5, "decode_ms_per_token": 12.0, "busy_power_w": 8.0,
                "prefill_power_w": 8.8, "decode_power_w": 7.5, "energy_j": 0.4, "energy_source": "modeled:cpu"}


class FakeActor:
    def __init__(self, log: list, name: str, fail: bool = False) -> None:
        self.probe = FakeProbeMethod(log, name, fail)


def _spec(name: str, **kw) -> ExpertSpec:
    return ExpertSpec.model_validate({"name": name, "engine": {"kind": "synthetic"}, **kw})


def test_probes_run_one_replica_at_a_time_and_a_failure_is_reported():
    log: list = []
    pool = ExpertPool([_spec("edge"), _spec("cloud"), _spec("quiet", startup_probe=False)], cache_dir="/tmp")
    replicas = [Replica("edge", 0, FakeActor(log, "edge")), Replica("cloud", 0, FakeActor(log, "cloud", fail=True)),
                Replica("edge", 1, FakeActor(log, "edge1")), Replica("quiet", 0, FakeActor(log, "quiet"))]
    said: list[str] = []
    asyncio.run(pool.probe(replicas, said.append))
    assert log == [("start", "edge"), ("end", "edge"), ("start", "cloud"), ("end", "cloud"),
                   ("start", "edge1"), ("end", "edge1")]  # serial, and the opted-out expert not probed
    assert said[0] == ("wattserve:edge:0 measured by its start-up probe: prefill 0.50 ms/token at 8.8 W, decode "
                       "12.0 ms/step at 7.5 W; 0.400 J (modeled:cpu, not charged to any tenant)")
    assert said[1].startswith("wattserve:cloud:0: start-up probe failed (") and "cost_priors" in said[1]
    assert said[2].startswith("wattserve:edge:1 measured")
