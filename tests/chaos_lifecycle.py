"""Two more fault scenarios (shared by ``tests/runtime/test_chaos.py`` and
``benchmarks/bench_chaos.py``), with the counting of :mod:`tests.chaos_scenarios`:

- a storm of client cancellations, gRPC deadlines and dropped HTTP streams over a real torch
  engine (slot KV cache) and a synthetic one: afterwards no admission slot, replica slot, queue
  entry or KV slot is held, and a full batch runs on every replica;
- one tenant floods the server at 5x its sustainable rate while another sends one request after
  another: the calm tenant is never refused (fair admission), the flooder is refused at once;
- the power plane's actors (the governor and the node agent) are killed under load: Ray restarts
  them, the agent knows its experts again, the governor resumes its loop from fresh telemetry and
  caps the low-priority expert again; serving never stops.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp
import grpc

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc

from .chaos_scenarios import (
    TENANT,
    Counts,
    Outcome,
    _pct,
    _sustainable_rate,
    expert,
    send,
    server_config,
    start_server,
    stored_ids,
    tally,
)

KINDS = ("complete", "cancel_after_token", "cancel_at_once", "deadline", "http_drop")


# -- 1. cancellations, deadlines and dropped connections ------------------------------------------------
async def _one(stub, base_url: str, kind: str, target: str, rng_delay_s: float) -> Outcome:
    """One request of ``kind``; the expected endings (CANCELLED by the client itself,
    DEADLINE_EXCEEDED for a short deadline) count as clean failures, anything unanswered as hung."""
    if kind == "complete":
        return await send(stub, 6, expert=target)
    if kind == "deadline":
        out = await send(stub, 400, expert=target, timeout_s=0.2 + rng_delay_s)
        return Outcome("DEADLINE_EXCEEDED", out.details) if out.status == "HUNG" else out
    if kind == "http_drop":
        return await _http_drop(base_url, target)
    req = pb.GenerateRequest(prompt="one two three", max_tokens=400, expert=target, tenant=TENANT,
                             sampling=pb.SamplingParams(ignore_eos=True))
    call = stub.Generate(req, timeout=60)
    if kind == "cancel_at_once":
        await asyncio.sleep(rng_delay_s)
    else:
        async for msg in call:
            if msg.HasField("chunk"):
                break
    call.cancel()
    try:
        async for _ in call:
            pass
    except asyncio.CancelledError:
        pass
    except grpc.aio.AioRpcError as exc:
        return Outcome(exc.code().name, exc.details() or "")
    return Outcome("CANCELLED", "cancelled by the client")


async def _http_drop(base_url: str, target: str) -> Outcome:
    body = {"model": target, "prompt": "one two", "max_tokens": 400, "stream": True, "ignore_eos": True,
            "tenant": TENANT}
    async with aiohttp.ClientSession() as s, s.post(base_url + "/v1/completions", json=body) as r:
        if r.status != 200:
            return Outcome(f"HTTP {r.status}", await r.text())
        line = await asyncio.wait_for(r.content.readline(), 60)
        if not line.startswith(b"data: "):
            return Outcome("HTTP bad stream", line.decode(errors="replace"))
        r.close()  # the client goes away mid-stream
    return Outcome("CANCELLED", "connection dropped by the client")


async def _settled(srv, experts: list[str], timeout_s: float = 30.0) -> dict:
    """Wait until nothing is held anywhere; returns what is still held at the end."""
    deadline = time.monotonic() + timeout_s
    while True:
        await srv.gateway.admin.refresh()
        held = {"admission_inflight": srv.gateway.lifecycle.admission.inflight,
                "admission_by_tenant": sum(srv.gateway.lifecycle.admission.by_tenant.values()),
                "gateway_replica_inflight": sum(r.inflight for r in srv.gateway.admin.replicas()),
                "replica_running": sum(r.profile.running for r in srv.gateway.admin.replicas() if r.profile),
                "replica_waiting": sum(r.profile.waiting for r in srv.gateway.admin.replicas() if r.profile)}
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.1)


async def cancel_and_deadline_storm(tmp: Path, tiny_model: Path, requests: int = 40, seed: int = 0) -> Counts:
    """``requests`` at once, cycling through :data:`KINDS` and over a torch expert (tiny model,
    4 KV slots) and a synthetic one. Then every slot must be free, and ``max_batch`` requests at
    once must complete on each expert (a leaked KV slot would make the torch engine fail)."""
    import random

    rng = random.Random(seed)
    experts = [
        {"name": "torch", "model": {"kind": "local", "path": str(tiny_model)}, "engine": {"kind": "torch", "threads": 1},
         "max_batch": 4, "max_queue": 64, "max_model_len": 512, "max_restarts": 0},
        expert("syn", step_ms=15.0, max_batch=4, max_queue=64),
    ]
    cfg = server_config(experts, tmp / "ledger.sqlite3", max_inflight=2 * requests)
    cfg["http"] = {"enabled": True, "port": 0}
    cfg["model_cache_dir"] = str(tmp / "cache")
    srv = await start_server(cfg)
    try:
        base_url = f"http://127.0.0.1:{srv.http_port}"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            pids = await _pids(ch)
            plan = [(KINDS[i % len(KINDS)], ("torch", "syn")[(i // len(KINDS)) % 2]) for i in range(requests)]
            outcomes = await asyncio.gather(*(_one(stub, base_url, k, t, rng.uniform(0.0, 0.3)) for k, t in plan))
            held = await _settled(srv, ["torch", "syn"])
            full = await asyncio.gather(*(send(stub, 5, expert=t) for t in ("torch", "syn") for _ in range(4)))
            same_pids = await _pids(ch) == pids
        await srv.gateway.routing.flush()
        counts = tally("cancellations, deadlines and dropped streams", outcomes, stored_ids(srv))
        counts.extra = {"by_kind": {k: dict(Counter(o.status for (kk, _), o in zip(plan, outcomes, strict=True)
                                                    if kk == k)) for k in KINDS},
                        "held_after": held, "full_batch_after": dict(Counter(o.status for o in full)),
                        "replicas_unchanged": same_pids}
        return counts
    finally:
        await srv.stop()


async def _pids(channel) -> dict:
    experts = await pb_grpc.AdminStub(channel).ListExperts(pb.ListExpertsRequest(), timeout=30)
    return {(e.name, r.replica): r.pid for e in experts.experts for r in e.replicas}


# -- 2. the power governor and the node agent are killed under load ----------------------------------------
def power_config(ledger: Path) -> dict:
    """Two experts on simulated A100s (70B parameters: ~240 W decoding, 40 W idle) under a 600 W
    row: both busy sit between T1 and T2, where only the low-priority one is capped."""
    def synthetic(name: str, priority_class: str) -> dict:
        return {**expert(name, step_ms=20.0, max_batch=4, max_queue=8), "priority_class": priority_class,
                "device": {"backend": "simulated", "profile": "a100"},
                "engine": {"kind": "synthetic", "step_ms": 20.0, "model_params": 70_000_000_000}}

    cfg = server_config([synthetic("lp", "low"), synthetic("hp", "high")], ledger)
    cfg["power"] = {"enabled": True, "provisioned_power_w": 600.0, "interval_s": 0.25, "telemetry_timeout_s": 2.0,
                    "resend_after_s": 2.0, "nvml": False,
                    "policy": {"t1_fraction": 0.5, "t2_fraction": 0.95, "dwell_s": 1.0, "settle_s": 0.5}}
    return cfg


async def _wait_status(admin, predicate, timeout_s: float = 45.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            st = await admin.GetPowerStatus(pb.GetPowerStatusRequest(max_events=0), timeout=5)
            if predicate(st):
                return st
        except grpc.aio.AioRpcError:
            pass  # the governor is restarting: UNAVAILABLE for a moment
        await asyncio.sleep(0.2)
    return None


async def _when_back(method, *args, timeout_s: float = 30.0):
    """Call an actor method, retrying while Ray says the actor is restarting."""
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await method.remote(*args)
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _pid(actor_self) -> int:
    """Run inside an actor (``__ray_call__``): the process serving it."""
    import os

    return os.getpid()


async def _until_other_pid(actor, pid: int, timeout_s: float = 45.0) -> bool:
    """Whether another process serves ``actor`` within ``timeout_s`` (the kill is asynchronous:
    the first calls after it may still reach the old process)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await _when_back(actor.__ray_call__, _pid) != pid:
            return True
        await asyncio.sleep(0.2)
    return False


def _lp_capped(st) -> bool:
    return any(g.expert == "lp" and g.HasField("locked_sm_clock_mhz") for g in st.gpus)


async def power_plane_restart(tmp: Path, per_expert: int = 2) -> Counts:
    """Load both experts until the governor caps ``lp``; kill the governor (Ray restarts it), wait
    until ``lp`` is capped again by the new one; kill the node agent, wait for fresh readings of
    both GPUs and ``lp`` capped; then stop the load. Every request must complete."""
    import ray

    srv = await start_server(power_config(tmp / "ledger.sqlite3"))
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    steps: dict = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub, admin = pb_grpc.InferenceStub(ch), pb_grpc.AdminStub(ch)

            async def worker(name: str) -> None:
                while not stop.is_set():
                    outcomes.append(await send(stub, 60, expert=name))

            tasks = [asyncio.ensure_future(worker(n)) for n in ("lp", "hp") for _ in range(per_expert)]
            steps["lp_capped_before"] = await _wait_status(admin, _lp_capped) is not None
            governor = srv.power.governor
            before = await governor.__ray_call__.remote(_pid)
            ray.kill(governor, no_restart=False)
            # another process serves the governor now (a tick count starting again from 0 would
            # say so too, but a quick restart can tick past the old count before a status call)
            steps["governor_restarted"] = await _until_other_pid(governor, before)
            steps["governor_ticking"] = await _wait_status(admin, lambda s: s.counters["ticks"] > 0) is not None
            steps["governor_capping_again"] = await _wait_status(admin, _lp_capped) is not None
            agent = next(iter(srv.power.agents.values()))[0]
            ray.kill(agent, no_restart=False)
            steps["agent_experts_after_restart"] = (await _when_back(agent.ready))["experts"]
            st = await _wait_status(admin, lambda s: len(s.gpus) == 2 and all(g.HasField("power_w") for g in s.gpus)
                                    and all(r.telemetry_ok for r in s.rows) and _lp_capped(s))
            steps["fresh_readings_and_capping_after_agent_restart"] = st is not None
            steps["hp_never_capped"] = st is not None and not any(
                g.expert == "hp" and g.HasField("locked_sm_clock_mhz") for g in st.gpus)
            stop.set()
            await asyncio.gather(*tasks)
        await srv.gateway.routing.flush()
        counts = tally("kill the power governor and the node agent under load", outcomes, stored_ids(srv))
        counts.extra = steps
        return counts
    finally:
        await srv.stop()


# -- 3. one tenant floods, another sends at its own pace --------------------------------------------------
async def two_tenant_overload(tmp: Path, multiple: float = 5.0, duration_s: float = 3.0, calm_workers: int = 2,
                              max_tokens: int = 8, step_ms: float = 25.0, max_batch: int = 4, seed: int = 0) -> Counts:
    """``flood`` offers ``multiple`` x the sustainable rate (Poisson) for ``duration_s``; ``calm``
    keeps ``calm_workers`` requests going one after another. The server holds 2 x ``max_batch``
    requests and enforces fair shares from half of that on: ``calm`` must never be refused."""
    import random

    cfg = server_config([expert("hot", step_ms=step_ms, max_batch=max_batch, max_queue=max_batch)],
                        tmp / "ledger.sqlite3", max_inflight=2 * max_batch, fair_share_above=0.5)
    cfg["tenants"] = [{"name": "flood"}, {"name": "calm"}]
    srv = await start_server(cfg)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            rate, unloaded_s = await _sustainable_rate(_Tenant(stub, "calm"), max_batch, max_tokens)
            calm: list[Outcome] = []
            t_end = time.monotonic() + duration_s

            async def calm_worker() -> None:
                while time.monotonic() < t_end:
                    calm.append(await send(stub, max_tokens, tenant="calm"))

            workers = [asyncio.ensure_future(calm_worker()) for _ in range(calm_workers)]
            rng, flood = random.Random(seed), []
            while time.monotonic() < t_end:
                flood.append(asyncio.ensure_future(send(stub, max_tokens, tenant="flood")))
                await asyncio.sleep(rng.expovariate(multiple * rate))
            flood_out = await asyncio.gather(*flood)
            await asyncio.gather(*workers)
        await srv.gateway.routing.flush()
        counts = tally(f"two tenants, one at {multiple:g}x the sustainable rate", flood_out + calm, stored_ids(srv))
        ok = sorted(o.latency_s for o in calm if o.status == "OK")
        counts.extra = {
            "sustainable_rps": rate, "unloaded_latency_s": unloaded_s,
            "calm": dict(Counter(o.status for o in calm)), "flood": dict(Counter(o.status for o in flood_out)),
            "calm_p50_s": _pct(ok, 0.5), "calm_p99_s": _pct(ok, 0.99),
            "refused_by_rule": dict(srv.gateway.lifecycle.admission.refused),
        }
        return counts
    finally:
        await srv.stop()


class _Tenant:
    """A stub whose Generate calls go out as one tenant (for _sustainable_rate)."""

    def __init__(self, stub, tenant: str) -> None:
        self.stub, self.tenant = stub, tenant

    def Generate(self, req, **kw):  # noqa: N802 - the gRPC method's name
        req.tenant = self.tenant
        return self.stub.Generate(req, **kw)
