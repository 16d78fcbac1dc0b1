"""The load tester's own ceiling: how many requests/s and tokens/s ``wattserve loadtest`` drives,
against the smallest reference load generators (a grpc.aio and an aiohttp client loop), on the
same targets in the same run:

* bare servers that stream N tokens without any model or Ray (a grpc.aio servicer and an aiohttp
  SSE handler in the OpenAI shape): here the client is the bottleneck, so the ratio is the
  harness's own overhead;
* wattserve with the synthetic (null) engine, over gRPC and HTTP: the server is the bottleneck.

Then an open-loop sweep against the bare gRPC server: the rate asked vs the rate achieved and
the p99 lag between a request's scheduled and actual send time (where measurements degrade).

    .venv/bin/python benchmarks/bench_loadtest_ceiling.py [--requests 1000] [--concurrency 32] [--tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import grpc

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.loadtest import Bounds, LoadTestOptions, WorkloadSpec, run_loadtest

BARE_GRPC = r'''
import asyncio
import grpc
from runtime.api.gen import wattserve_pb2 as pb, wattserve_pb2_grpc as pb_grpc

class Bare(pb_grpc.InferenceServicer):
    async def Generate(self, request, context):
        for _ in range(request.max_tokens):
            yield pb.GenerateResponse(chunk=pb.TokenChunk(text=" tok", token_ids=[0]))
        yield pb.GenerateResponse(usage=pb.Usage(completion_tokens=request.max_tokens, prompt_tokens=3,
                                                 expert="bare", energy_j=0.0, energy_source="none"))

async def main():
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(Bare(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
'''

BARE_HTTP = r'''
import json
from aiohttp import web

def event(obj):
    return b"data: " + json.dumps(obj).encode() + b"\n\n"

async def completions(request):
    body = await request.json()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for _ in range(body["max_tokens"]):
        await resp.write(event({"choices": [{"index": 0, "text": " tok", "finish_reason": None}]}))
    await resp.write(event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "wattserve": {"expert": "bare"}}))
    await resp.write(event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": body["max_tokens"],
                                                     "energy_joules": 0.0, "energy_source": "none"}}))
    await resp.write(b"data: [DONE]\n\n")
    return resp

async def start():
    app = web.Application()
    app.add_routes([web.post("/v1/completions", completions)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)

import asyncio
loop = asyncio.new_event_loop()
loop.run_until_complete(start())
loop.run_forever()
'''

CONFIG = """
ray: {num_cpus: 2, object_store_memory_mb: 128}
auth: {enabled: false}  # loopback benchmark: no keys
gateway: {port: 0, max_inflight: 1024}
http: {port: 0}
experts:
  - {name: synth, engine: {kind: synthetic}, device: cpu, max_batch: 256, max_queue: 256}
"""


def start(cmd: list[str], pattern: str, until: str | None = None) -> tuple[subprocess.Popen, list]:
    """Start a server; return once ``until`` is printed (or ``pattern`` first matches) and what matched."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    found: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        found += re.findall(pattern, line)
        if (until is None and found) or (until is not None and until in line):
            # keep draining output so the child never blocks on a full pipe
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, found
    proc.kill()
    raise SystemExit(f"{cmd} did not start")


# -- reference loops: the least a client can do ---------------------------------------------------
async def _workers(one, requests: int, concurrency: int) -> float:
    """Run ``one()`` ``requests`` times with ``concurrency`` workers; returns the seconds taken."""
    left = requests

    async def worker():
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


async def ref_grpc(target: str, requests: int, concurrency: int, tokens: int) -> dict:
    got = 0
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        req = pb.GenerateRequest(prompt="a b c", max_tokens=tokens, sampling=pb.SamplingParams(ignore_eos=True))

        async def one():
            nonlocal got
            async for msg in stub.Generate(req, timeout=60):
                got += len(msg.chunk.token_ids)

        elapsed = await _workers(one, requests, concurrency)
    return {"requests_per_s": requests / elapsed, "tokens_per_s": got / elapsed}


async def ref_http(base: str, requests: int, concurrency: int, tokens: int) -> dict:
    got = 0
    body = {"model": "auto", "prompt": "a b c", "max_tokens": tokens, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one():
            nonlocal got
            async with s.post(base + "/v1/completions", json=body) as r:
                async for line in r.content:
                    got += line.count(b" tok")  # chunks that arrived together carry several

        elapsed = await _workers(one, requests, concurrency)
    return {"requests_per_s": requests / elapsed, "tokens_per_s": got / elapsed}


async def harness(api: str, target: str, requests: int, concurrency: int, tokens: int) -> dict:
    opts = LoadTestOptions(
        api=api, target=target, progress=False, out_dir=None, metrics_url=None,
        workload=WorkloadSpec(arrival="closed", input_tokens=3, output_tokens=tokens),
        bounds=Bounds(duration_s=300, max_requests=requests, max_concurrency=concurrency),
    )
    t0 = time.perf_counter()
    s = (await run_loadtest(opts)).summary
    elapsed = time.perf_counter() - t0
    assert s["failed"] == 0, s["errors_by_status"]
    return {"requests_per_s": requests / elapsed, "tokens_per_s": s["total_output_tokens"] / elapsed}


async def open_loop(target: str, rate: float, seconds: float, tokens: int) -> dict:
    opts = LoadTestOptions(
        api="grpc", target=target, progress=False, out_dir=None, metrics_url=None,
        workload=WorkloadSpec(arrival="poisson", rate_per_s=rate, input_tokens=3, output_tokens=tokens),
        bounds=Bounds(duration_s=seconds, max_requests=int(rate * seconds * 2)),
    )
    s = (await run_loadtest(opts)).summary
    return {"rate": rate, "sent": s["num_prompts"], "achieved_per_s": s["request_throughput"],
            "p99_send_lag_ms": s["p99_send_lag_ms"], "median_ttft_ms": s["median_ttft_ms"], "failed": s["failed"]}


def compare(name: str, ref: dict, ours: dict, results: dict) -> None:
    ratio = ours["requests_per_s"] / ref["requests_per_s"]
    results[name] = {"reference": ref, "loadtest": ours, "ratio": ratio}
    print(f"  {name:<26} reference {ref['requests_per_s']:8.1f} req/s {ref['tokens_per_s']:9.0f} tok/s | "
          f"loadtest {ours['requests_per_s']:8.1f} req/s {ours['tokens_per_s']:9.0f} tok/s | ratio {ratio:.2f}x", flush=True)


async def measure(targets: dict, args, results: dict) -> None:
    n, c, t = args.requests, args.concurrency, args.tokens
    for name, (api, target) in targets.items():
        ref_fn = ref_grpc if api == "grpc" else ref_http
        await ref_fn(target, min(100, n), c, t)  # warm-up: connections, server caches
        refs, ours = [], []
        for _ in range(args.repeat):  # interleaved, best of each: other load on the host only slows a run
            refs.append(await ref_fn(target, n, c, t))
            ours.append(await harness(api, target, n, c, t))
        compare(name, max(refs, key=lambda r: r["requests_per_s"]), max(ours, key=lambda r: r["requests_per_s"]), results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs per client; the best is reported")
    ap.add_argument("--rates", default="100,200,400,800", help="open-loop sweep against the bare gRPC server")
    ap.add_argument("--out")
    args = ap.parse_args()
    results: dict = {"args": vars(args)}
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "synth.yaml"
        cfg.write_text(CONFIG)
        try:
            p, (grpc_bare,) = start([sys.executable, "-c", BARE_GRPC], r"listening on (127\.0\.0\.1:\d+)")
            procs.append(p)
            p, (http_bare,) = start([sys.executable, "-c", BARE_HTTP], r"listening on (http://127\.0\.0\.1:\d+)")
            procs.append(p)
            print("starting wattserve (synthetic engine) ...", flush=True)
            p, found = start([str(Path(sys.executable).parent / "wattserve"), "serve", "--config", str(cfg)],
                             r"listening on (127\.0\.0\.1:\d+)|(http://127\.0\.0\.1:\d+)", until="Ctrl-C")
            procs.append(p)
            ws_grpc = next(g for g, _ in found if g)
            ws_http = next(h for _, h in found if h)
            targets = {"bare grpc.aio server": ("grpc", grpc_bare), "bare aiohttp SSE server": ("openai", http_bare),
                       "wattserve synthetic, gRPC": ("grpc", ws_grpc), "wattserve synthetic, HTTP": ("openai", ws_http)}
            print(f"{args.requests} requests x {args.tokens} tokens, {args.concurrency} in flight (closed loop)", flush=True)
            asyncio.run(measure(targets, args, results))
            print("open loop (Poisson) against the bare gRPC server, 5 s per rate:", flush=True)
            sweep = []
            for rate in (float(r) for r in args.rates.split(",")):
                row = asyncio.run(open_loop(grpc_bare, rate, 5.0, args.tokens))
                sweep.append(row)
                print(f"  asked {rate:6.0f}/s sent {row['sent']:5d} achieved {row['achieved_per_s']:7.1f}/s "
                      f"p99 send lag {row['p99_send_lag_ms']:7.2f} ms median TTFT {row['median_ttft_ms']:6.2f} ms", flush=True)
            results["open_loop"] = sweep
        finally:
            for p in procs:
                p.send_signal(signal.SIGINT)
            for p in procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
