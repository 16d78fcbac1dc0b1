"""Fault and overload scenarios against a real server on loopback, shared by the tests (small
sizes, asserting on counts) and ``benchmarks/bench_chaos.py`` (bigger sizes, the report table).

Every scenario returns a :class:`Counts`:

- ``sent``: requests issued; ``refused``: answered RESOURCE_EXHAUSTED, or the server was not
  reachable (restart window) — refused before admission, cleanly;
- ``accepted``: admitted by the server = ``completed`` + ``failed_clean``;
- ``failed_clean``: admitted, then ended with a status code and a message (e.g. UNAVAILABLE when
  the expert died mid-stream, CANCELLED when the gateway stopped);
- ``hung``: no answer before the client's (generous) deadline: must be 0;
- ``lost_charges``: completed requests whose energy is not in the durable budget ledger: must be 0.

Synthetic engines (``step_ms``) on simulated H100 devices make the timing and the energy
deterministic enough for a shared 2-core machine. Run as a module for the node-loss scenario,
which needs its own two-node Ray cluster in a fresh process::

    python -m tests.chaos_scenarios node-loss --requests 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from wattserve.errors import ConfigError

TENANT = "chaos"
CLIENT_TIMEOUT_S = 60.0  # a request with no answer by then is counted as hung


@dataclass
class Outcome:
    status: str  # "OK", a gRPC status code name, or "HUNG"
    details: str = ""
    tokens: int = 0
    energy_j: float = 0.0
    request_id: str = ""
    latency_s: float = 0.0

    @property
    def unreachable(self) -> bool:
        return self.status == "UNAVAILABLE" and "failed to connect" in self.details.lower()


@dataclass
class Counts:
    scenario: str
    sent: int = 0
    accepted: int = 0
    completed: int = 0
    failed_clean: int = 0
    refused: int = 0
    hung: int = 0
    lost_charges: int = 0
    retried: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def tally(scenario: str, outcomes: list[Outcome], stored_ids: set[str] | None = None, retried: int = 0) -> Counts:
    c = Counts(scenario, sent=len(outcomes), retried=retried)
    c.statuses = dict(Counter(o.status for o in outcomes))
    for o in outcomes:
        if o.status == "OK":
            c.completed += 1
        elif o.status == "HUNG":
            c.hung += 1
        elif o.status == "RESOURCE_EXHAUSTED" or o.unreachable:
            c.refused += 1
        else:
            c.failed_clean += 1
    c.accepted = c.completed + c.failed_clean
    if stored_ids is not None:
        c.lost_charges = sum(1 for o in outcomes if o.status == "OK" and o.energy_j > 0 and o.request_id not in stored_ids)
    return c


# -- clients ----------------------------------------------------------------------------------------
async def send(stub, max_tokens: int, *, expert: str = "", timeout_s: float = CLIENT_TIMEOUT_S,
               seen: Counter | None = None, tenant: str = TENANT) -> Outcome:
    """One Generate; never raises. A client-side deadline is a hang (the server sets none).
    ``seen["tokens"]`` counts streamed tokens across requests."""
    started = time.monotonic()
    out = Outcome("OK")
    req = pb.GenerateRequest(prompt="one two three four", max_tokens=max_tokens, expert=expert, tenant=tenant,
                             sampling=pb.SamplingParams(ignore_eos=True))
    try:
        async for msg in stub.Generate(req, timeout=timeout_s):
            if msg.HasField("chunk"):
                out.tokens += len(msg.chunk.token_ids)
                if seen is not None:
                    seen["tokens"] += len(msg.chunk.token_ids)
            else:
                out.energy_j, out.request_id = msg.usage.energy_j, msg.usage.request_id
    except grpc.aio.AioRpcError as exc:
        out.status = "HUNG" if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else exc.code().name
        out.details = exc.details() or ""
    out.latency_s = time.monotonic() - started
    return out


def expert(name: str, *, step_ms: float = 10.0, replicas: int = 1, max_batch: int = 8, max_queue: int = 32,
           **extra) -> dict:
    """A synthetic expert on a simulated H100: every request has (modeled) energy to charge."""
    return {"name": name, "engine": {"kind": "synthetic", "step_ms": step_ms, "model_params": 135_000_000},
            "device": "simulated:h100", "replicas": replicas, "max_batch": max_batch, "max_queue": max_queue,
            "max_restarts": 3, **extra}


def server_config(experts: list[dict], ledger: Path | None, port: int = 0, **gateway) -> dict:
    return {
        "auth": {"enabled": False},  # loopback only
        "gateway": {"port": port, "health_interval_s": 0.2, "max_inflight": 256, **gateway},
        "http": {"enabled": False},
        "ledger": {"path": str(ledger) if ledger else None},
        "tenants": [{"name": TENANT}],
        "experts": experts,
    }


async def start_server(cfg: dict):
    from runtime.api.server import WattserveServer
    from runtime.config import parse_config

    srv = WattserveServer(parse_config(cfg, "chaos"), progress=lambda m: None)
    await srv.start()
    return srv


def stored_ids(srv) -> set[str]:
    return {rid for _, _, rid, kind in srv.gateway.routing.store.charges() if kind == "finished"}


async def replica_pids(channel) -> dict[tuple[str, int], int]:
    experts = await pb_grpc.AdminStub(channel).ListExperts(pb.ListExpertsRequest(), timeout=30)
    return {(e.name, r.replica): r.pid for e in experts.experts for r in e.replicas}


# -- 1. an expert process dies during a burst -----------------------------------------------------------
async def kill_expert_during_burst(tmp: Path, requests: int = 24, max_tokens: int = 40, step_ms: float = 20.0,
                                   kill_after_tokens: int = 40) -> Counts:
    """``requests`` at once over two replicas of one expert; replica 0's process is SIGKILLed once
    ``kill_after_tokens`` tokens have streamed. Its streaming requests end UNAVAILABLE; those
    still queued on it (no token yet) are retried once on replica 1 and complete."""
    srv = await start_server(server_config(
        [expert("burst", step_ms=step_ms, replicas=2, max_batch=4, max_queue=64)], tmp / "ledger.sqlite3"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            victim = (await replica_pids(ch))[("burst", 0)]
            seen: Counter = Counter()
            tasks = [asyncio.ensure_future(send(stub, max_tokens, seen=seen)) for _ in range(requests)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and seen["tokens"] < kill_after_tokens:
                await asyncio.sleep(0.02)
            os.kill(victim, signal.SIGKILL)
            tokens_at_kill = seen["tokens"]
            outcomes = await asyncio.gather(*tasks)
            await srv.gateway.routing.flush()
            counts = tally("kill an expert process during a burst", outcomes, stored_ids(srv), srv.gateway.counters.retried)
            counts.extra = {"tokens_streamed_at_kill": tokens_at_kill,
                            "failures": dict(Counter(o.details[:80] for o in outcomes if o.status != "OK"))}
            return counts
    finally:
        await srv.stop()


def _replicas(srv) -> list:
    return [r.profile for r in srv.gateway.admin.replicas() if r.profile is not None]


# -- 2. the gateway restarts mid-run -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def restart_gateway_mid_run(tmp: Path, workers: int = 4, max_tokens: int = 30, step_ms: float = 10.0,
                                  restart_after: int = 12, then: int = 12, grace_s: float = 0.1) -> Counts:
    """``workers`` clients send requests back to back. After ``restart_after`` completions the
    server stops (in-flight requests are cut after ``grace_s``) and a new one starts on the same
    port with the same ledger file; the clients go on until ``then`` more have completed. Every
    completed request's charge must be in the restored ledger."""
    ledger = tmp / "ledger.sqlite3"
    for attempt in range(3):  # a free port can be taken (by a Ray worker) before the server binds it
        port = free_port()
        cfg = server_config([expert("steady", step_ms=step_ms, max_batch=8)], ledger, port=port)
        try:
            srv = await start_server(cfg)
            break
        except ConfigError:
            if attempt == 2:
                raise
    outcomes: list[Outcome] = []
    goal = [restart_after]
    reached, stop = asyncio.Event(), asyncio.Event()

    async def worker() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            while not stop.is_set():
                out = await send(stub, max_tokens)
                outcomes.append(out)
                if sum(o.status == "OK" for o in outcomes) >= goal[0]:
                    reached.set()
                if out.status != "OK":
                    await asyncio.sleep(0.5)  # back off while the server is away

    tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
    await asyncio.wait_for(reached.wait(), 120)
    await srv.stop(grace_s=grace_s)
    completed_before = sum(o.status == "OK" for o in outcomes)
    await _names_released(["wattserve:steady:0"])
    srv = await start_server(cfg)
    try:
        reached.clear()
        goal[0] = completed_before + then
        await asyncio.wait_for(reached.wait(), 120)
        stop.set()
        await asyncio.gather(*tasks)
        await srv.gateway.routing.flush()
        counts = tally("restart the gateway mid-run", outcomes, stored_ids(srv))
        used = {s.scope: s.used_j for s in srv.gateway.routing.budget_status([TENANT])}
        stored = sum(j for t, j, _, _ in srv.gateway.routing.store.charges() if t == TENANT)
        counts.extra = {"completed_before_restart": completed_before,
                        "completed_after_restart": counts.completed - completed_before,
                        "ledger_used_j_after_restart": used[f"tenant:{TENANT}"], "stored_j": stored,
                        "completed_j": sum(o.energy_j for o in outcomes if o.status == "OK")}
        return counts
    finally:
        await srv.stop()


async def _names_released(names: list[str], timeout_s: float = 30.0) -> None:
    """Wait until killed named actors are gone, so a new server in this driver can take the names
    (a restarted gateway process would start a fresh Ray instance instead)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = []
        for name in names:
            try:
                ray.get_actor(name)
                alive.append(name)
            except ValueError:
                pass
        if not alive:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"actors {names} still registered after {timeout_s} s")


# -- 3. overload at a multiple of the sustainable rate ----------------------------------------------------
async def overload(tmp: Path, multiple: float = 5.0, duration_s: float = 3.0, max_tokens: int = 8,
                   step_ms: float = 25.0, max_batch: int = 4, slo_factor: float = 4.0, seed: int = 0) -> Counts:
    """Measure the sustainable rate (closed loop at ``max_batch`` in flight), then offer
    ``multiple`` times it as Poisson arrivals for ``duration_s``. Admission holds at most
    ``max_batch`` running and as many queued; the rest must be refused at once."""
    import psutil

    srv = await start_server(server_config([expert("hot", step_ms=step_ms, max_batch=max_batch, max_queue=max_batch)],
                                           tmp / "ledger.sqlite3", max_inflight=2 * max_batch))
    proc = psutil.Process()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            rate, unloaded_s = await _sustainable_rate(stub, max_batch, max_tokens)
            rss0 = proc.memory_info().rss
            rng, tasks, t_end = random.Random(seed), [], time.monotonic() + duration_s
            while time.monotonic() < t_end:
                tasks.append(asyncio.ensure_future(send(stub, max_tokens)))
                await asyncio.sleep(rng.expovariate(multiple * rate))
            outcomes = await asyncio.gather(*tasks)
            rss1 = proc.memory_info().rss
        await srv.gateway.routing.flush()
        counts = tally(f"overload at {multiple:g}x the sustainable rate", outcomes, stored_ids(srv))
        ok = sorted(o.latency_s for o in outcomes if o.status == "OK")
        refused = [o.latency_s for o in outcomes if o.status == "RESOURCE_EXHAUSTED"]
        slo_s = slo_factor * 2 * unloaded_s  # two service times (one queued ahead at most) times a margin
        counts.extra = {
            "sustainable_rps": rate, "offered_rps": multiple * rate, "unloaded_latency_s": unloaded_s,
            "slo_s": slo_s, "slo_violations": sum(1 for x in ok if x > slo_s),
            "accepted_p50_s": _pct(ok, 0.5), "accepted_p99_s": _pct(ok, 0.99),
            "refusal_p99_s": _pct(sorted(refused), 0.99), "refusal_max_s": max(refused, default=0.0),
            "rss_growth_mb": (rss1 - rss0) / 2**20,
        }
        return counts
    finally:
        await srv.stop()


async def _sustainable_rate(stub, concurrency: int, max_tokens: int, rounds: int = 4) -> tuple[float, float]:
    """(requests per second at ``concurrency`` in flight, mean latency of one request) in s."""
    await send(stub, max_tokens)  # warm-up
    started = time.monotonic()
    results = []
    for _ in range(rounds):
        results += await asyncio.gather(*(send(stub, max_tokens) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return len(results) / elapsed, sum(o.latency_s for o in results) / len(results)


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


# -- 4. a node of a two-node Ray cluster is lost ----------------------------------------------------------
async def node_loss(tmp: Path, requests: int = 40, max_tokens: int = 20, step_ms: float = 10.0,
                    concurrency: int = 8) -> Counts:
    """A head node and a worker node (``ray.cluster_utils.Cluster`` on this machine), one expert
    on each (placed by custom resources). Requests flow; the worker node is removed half way;
    its expert goes unhealthy, the router stops choosing it, and the rest complete on the head's
    expert. Must run in a process without another Ray instance (``python -m tests.chaos_scenarios``)."""
    import ray
    from ray.cluster_utils import Cluster

    obj = 80 * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head_node": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "object_store_memory": obj})
    worker = cluster.add_node(num_cpus=1, resources={"worker_node": 1}, node_ip_address="127.0.0.1",
                              object_store_memory=obj)
    ray.init(address=cluster.address, namespace="wattserve-chaos", _node_ip_address="127.0.0.1", log_to_driver=False)
    srv = None
    try:
        experts = [expert("onhead", step_ms=step_ms, resources={"custom": {"head_node": 1}}),
                   expert("onworker", step_ms=step_ms, resources={"custom": {"worker_node": 1}})]
        srv = await start_server(server_config(experts, tmp / "ledger.sqlite3"))
        outcomes: list[Outcome] = []
        sem = asyncio.Semaphore(concurrency)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)

            async def one() -> None:
                async with sem:
                    outcomes.append(await send(stub, max_tokens))

            tasks = [asyncio.ensure_future(one()) for _ in range(requests)]
            while len(outcomes) < requests // 4:
                await asyncio.sleep(0.05)
            before = Counter(_served_by(srv))
            cluster.remove_node(worker)
            removed_at = len(outcomes)
            await asyncio.gather(*tasks)
            await srv.gateway.routing.flush()
            counts = tally("lose a node of a two-node Ray cluster", outcomes, stored_ids(srv), srv.gateway.counters.retried)
            healthy = {f"{r.expert}/{r.index}": r.healthy for r in srv.gateway.admin.replicas()}
            counts.extra = {"finished_before_removal": removed_at, "requests_by_expert_before": dict(before),
                            "healthy_after": healthy,
                            "completed_after_removal": sum(o.status == "OK" for o in outcomes[removed_at:])}
            return counts
    finally:
        if srv is not None:
            await srv.stop()
        ray.shutdown()
        cluster.shutdown()


def _served_by(srv) -> list[str]:
    return [p.expert for p in _replicas(srv) for _ in range(p.requests_finished)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=["node-loss"])
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--tmp", default=None)
    args = p.parse_args(argv)
    import tempfile

    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="wattserve-chaos-"))
    # Ray's own files in a directory of our own: a cluster in the default /tmp/ray registers itself
    # as "the current cluster", and any ray.init() on this machine (other test runs) would join it
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: unix socket paths
    # Both nodes on loopback: otherwise ray.init() rewrites 127.0.0.1 into the host's address,
    # where this GCS does not listen (read by ray at import, hence before node_loss imports it)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        counts = asyncio.run(node_loss(tmp, requests=args.requests))
    finally:
        import shutil

        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)  # the cluster has shut down: its logs go
    print("CHAOS-RESULT " + json.dumps(counts.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
