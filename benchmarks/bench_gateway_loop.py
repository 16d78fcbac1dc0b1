"""Where a gateway's event loop goes: the same Generate load against reduced servers, each in a
process of its own, with the CPU each one spends per request.

    .venv/bin/python benchmarks/bench_gateway_loop.py [--requests 3000] [--rounds 3]
        [--variants bare,interceptor,inprocess,wattserve] [--default-gc]

Variants (every one answers a request in one chunk of ``max_tokens`` tokens and a final message,
as the synthetic engine does at full speed):

- ``bare``: a grpc.aio servicer that yields the two messages (``bench_gateway_overhead.py``'s);
- ``interceptor``: the same behind our ``ErrorInterceptor``, our server options, the health and
  reflection services (everything ``WattserveServer`` adds to gRPC but the servicer);
- ``inprocess``: our servicer and gateway (admission, validation, routing, metering, metrics) over
  an in-memory replica: the gateway without Ray;
- ``wattserve``: ``WattserveServer`` with the synthetic expert, as ``wattserve serve`` runs it
  (Ray, one replica actor, the collector settled as in ``runtime/heap.py``).

Per variant and round: requests/s (32 in flight), the server process's CPU per request and its
main thread's (the event loop), the loop callbacks it ran per request (``asyncio.Handle._run``
counted), the CPU its garbage collector took per request (``gc.callbacks``, thread CPU time),
and for ``wattserve`` the replica actor's CPU per request, the calls per submit and the stream batches
per request of its Ray hop (``runtime/cluster.py``, counted in the gateway). CPU times come from psutil and are
less sensitive to a shared machine's load than requests/s, which is printed for reference only.
The collector is settled (``runtime/heap.py``) in ``inprocess`` and ``wattserve`` once they have
started, as ``wattserve serve`` does, and left as CPython sets it in the two bare variants, as a
bare grpc.aio server runs; ``--default-gc`` leaves it as CPython sets it in every variant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
import yaml
from host import cpu_model, start_server  # noqa: E402 - benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.api.gen import wattserve_pb2 as pb  # noqa: E402
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc  # noqa: E402

VARIANTS = ("bare", "interceptor", "inprocess", "wattserve")

CONFIG = """
ray: {num_cpus: 2, object_store_memory_mb: 128}
auth: {enabled: false}
gateway: {port: 0, max_inflight: 1024, health_interval_s: 3600}
http: {enabled: false}
experts:
  - {name: synth, engine: {kind: synthetic, step_ms: 0}, device: cpu, max_batch: 256, max_queue: 256}
"""


# -- the server side (a child process per variant) ----------------------------------------------
class _Probe:
    """Loop callbacks run and collector CPU seconds, written to a file on SIGUSR1."""

    def __init__(self, path: str) -> None:
        import asyncio.events
        import gc

        self.path = path
        self.gateway = None  # wattserve's: its replica streams' counters are dumped too
        self.callbacks = 0
        self.gc_s = 0.0
        self._gc_start = 0.0
        run = asyncio.events.Handle._run
        probe = self

        def counted(handle):
            probe.callbacks += 1
            return run(handle)

        asyncio.events.Handle._run = counted
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.thread_time()
        else:
            self.gc_s += time.thread_time() - self._gc_start

    def dump(self) -> None:
        stats = {"callbacks": self.callbacks, "gc_s": self.gc_s, "submits": 0, "calls": 0, "batches": 0}
        for state in self.gateway.replicas.states() if self.gateway else ():
            mux = getattr(state.client, "_mux", None)  # the Ray replica's multiplexed stream
            if mux is not None:
                stats["submits"] += getattr(mux, "submits", 0)  # counted since issue 17's third pass
                stats["calls"] += getattr(mux, "calls_submitted", 0)
                stats["batches"] += getattr(mux, "batches_read", 0)
        Path(self.path).write_text(json.dumps(stats))


class _Bare(pb_grpc.InferenceServicer):
    async def Generate(self, request, context):
        n = request.max_tokens
        yield pb.GenerateResponse(chunk=pb.TokenChunk(text=" tok" * n, token_ids=[0] * n))
        yield pb.GenerateResponse(usage=pb.Usage(completion_tokens=n))


def _in_memory_gateway():
    """Our gateway over a replica in this process that answers like the synthetic engine."""
    from runtime.config import parse_config
    from runtime.gateway import Gateway
    from runtime.gateway.replicas import ReplicaClient, ReplicaStream
    from wattserve.types import ExpertProfile, FinishReason, RequestUsage, StreamEvent

    class Stream(ReplicaStream):
        def __init__(self, call) -> None:
            self.call, self.sent = call, False

        async def next(self) -> list:
            rid, n = self.call.request_id, self.call.max_tokens
            await asyncio.sleep(0)  # an answer comes from elsewhere: one turn of the loop
            if not self.sent:
                self.sent = True
                return [StreamEvent(rid, " tok" * n, (0,) * n)]
            return [StreamEvent(rid, usage=RequestUsage(3, n, 0.1, 0.2, 0.01, "modeled:bench", FinishReason.LENGTH))]

        def cancel(self) -> None:
            pass

    class Replica(ReplicaClient):
        async def profile(self) -> ExpertProfile:
            return ExpertProfile(expert=self.expert, replica=self.index, model="synthetic", engine="synthetic",
                                 device="cpu", energy_source="modeled:bench", priority_class="normal", max_batch=256,
                                 max_queue=256, max_model_len=2048, params=0, healthy=True, running=0, waiting=0,
                                 prefill_ms_per_token=0.01, decode_ms_per_token=0.01, j_per_token=0.0003)

        def generate(self, call) -> ReplicaStream:
            return Stream(call)

        def abort(self, request_id: str) -> None:
            pass

        async def score(self, call):
            raise NotImplementedError

    return Gateway(parse_config(yaml.safe_load(CONFIG)), [Replica("synth", 0)])


async def _serve(variant: str, stats_path: str, settle: bool) -> None:
    from grpc import aio
    from grpc_health.v1 import health_pb2_grpc
    from grpc_health.v1._async import HealthServicer
    from grpc_reflection.v1alpha import reflection

    from runtime.api.interceptors import ErrorInterceptor
    from runtime.api.server import SERVICE_NAMES, TRANSPORT_HEADROOM, WattserveServer
    from runtime.api.servicer import InferenceServicer
    from runtime.config import parse_config
    from runtime.heap import settle_heap

    probe = _Probe(stats_path)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, probe.dump)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if variant == "wattserve":
        server = WattserveServer(parse_config(yaml.safe_load(CONFIG)), progress=lambda _: None)
        port = await server.start()
        probe.gateway = server.gateway
        if settle:
            settle_heap()  # as ``wattserve serve`` does
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await stop.wait()
        await server.stop(grace_s=1.0)
        return
    gw = parse_config(yaml.safe_load(CONFIG)).gateway
    ours = variant != "bare"
    server = aio.server(
        interceptors=[ErrorInterceptor(None, gw.max_metadata_bytes, gw.max_message_bytes)] if ours else [],
        options=[("grpc.max_receive_message_length", TRANSPORT_HEADROOM * gw.max_message_bytes),
                 ("grpc.max_send_message_length", gw.max_message_bytes),
                 ("grpc.max_metadata_size", 4 * gw.max_metadata_bytes),
                 ("grpc.absolute_max_metadata_size", 8 * gw.max_metadata_bytes)] if ours else [],
    )
    servicer = _Bare()
    if variant == "inprocess":
        gateway = _in_memory_gateway()
        await gateway.start()
        servicer = InferenceServicer(gateway)
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    if ours:
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
        reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    if settle and variant == "inprocess":
        settle_heap()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(1.0)


# -- the client side ----------------------------------------------------------------------------
def _start(variant: str, stats_path: str, settle: bool) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, __file__, "--serve", variant, "--stats", stats_path] + ([] if settle else ["--default-gc"])
    return start_server(cmd, {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})


async def _load(target: str, requests: int, concurrency: int, tokens: int) -> float:
    slots = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def one() -> None:
            async with slots:
                async for _ in stub.Generate(pb.GenerateRequest(prompt="a b c", max_tokens=tokens), timeout=60):
                    pass

        await asyncio.gather(*(one() for _ in range(2 * concurrency)))  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        return time.perf_counter() - start


def _replica_cpu_s(server: psutil.Process) -> dict[int, float]:
    """CPU seconds of the replica actor processes ``server`` started (through its Ray node)."""
    out = {}
    for p in server.children(recursive=True):
        try:
            if any("ExpertActor" in part for part in p.cmdline()):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        except psutil.Error:
            continue
    return out


def _snapshot(proc: psutil.Process, stats_path: str) -> dict:
    os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(0.3)  # the handler runs on the server's loop
    stats = json.loads(Path(stats_path).read_text())
    t = proc.cpu_times()
    main = next((th.user_time + th.system_time for th in proc.threads() if th.id == proc.pid), 0.0)
    return {"cpu_s": t.user + t.system, "main_s": main, "replicas": _replica_cpu_s(proc), **stats}


def _round(proc: psutil.Process, stats_path: str, target: str, args) -> dict:
    before = _snapshot(proc, stats_path)
    wall = asyncio.run(_load(target, args.requests, args.concurrency, args.tokens))
    after = _snapshot(proc, stats_path)
    n = args.requests
    replica_s = sum(after["replicas"].get(pid, s) - s for pid, s in before["replicas"].items())
    return {
        "requests_per_s": n / wall,
        "cpu_ms": 1e3 * (after["cpu_s"] - before["cpu_s"]) / n,
        "main_ms": 1e3 * (after["main_s"] - before["main_s"]) / n,
        "callbacks": (after["callbacks"] - before["callbacks"]) / n,
        "gc_ms": 1e3 * (after["gc_s"] - before["gc_s"]) / n,
        "replica_ms": 1e3 * replica_s / n,
        # the Ray hop (wattserve only): calls per submit, and stream batches read per request
        "calls_per_submit": (after["calls"] - before["calls"]) / max(1, after["submits"] - before["submits"]),
        "batches_per_request": (after["batches"] - before["batches"]) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--default-gc", action="store_true", help="leave the collector as CPython sets it")
    ap.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)  # the child's side
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.stats, settle=not args.default_gc))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; "
          f"{args.requests} requests x {args.tokens} tokens, {args.concurrency} in flight; collector "
          f"{'as CPython sets it' if args.default_gc else 'settled in our variants (runtime/heap.py)'}", flush=True)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            for v in variants:
                stats = str(Path(tmp) / f"{v}.json")
                proc, target = _start(v, stats, settle=not args.default_gc)
                servers[v] = (proc, target, stats)
            for i in range(args.rounds):
                for v in variants:  # alternating: a shared machine's load hits every variant alike
                    proc, target, stats = servers[v]
                    r = _round(psutil.Process(proc.pid), stats, target, args)
                    results[v].append(r)
                    print(f"  round {i + 1} {v:<12} {r['requests_per_s']:6.0f} req/s  server CPU {r['cpu_ms']:.3f} ms/req, "
                          f"main thread {r['main_ms']:.3f}, collector {r['gc_ms']:.3f}; {r['callbacks']:.1f} loop "
                          f"callbacks/req" + (f"; replica {r['replica_ms']:.3f} ms/req; {r['calls_per_submit']:.1f} "
                                               f"calls/submit, {r['batches_per_request']:.2f} stream batches/req"
                                               if v == "wattserve" else ""),
                          flush=True)
        finally:
            for proc, _, _ in servers.values():
                proc.send_signal(signal.SIGINT)
            for proc, _, _ in servers.values():
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"median of {args.rounds} rounds (ms of CPU per request):")
    for v, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"  {v:<12} server {med['cpu_ms']:.3f}, main thread {med['main_ms']:.3f}, collector {med['gc_ms']:.3f}, "
              f"{med['callbacks']:.1f} callbacks/req" + (f", replica {med['replica_ms']:.3f}, {med['calls_per_submit']:.1f} "
                                                          f"calls/submit, {med['batches_per_request']:.2f} batches/req"
                                                          if v == "wattserve" else "")
              + f"; {med['requests_per_s']:.0f} req/s")


if __name__ == "__main__":
    main()
