"""What the serving path costs: the synthetic engine behind the full wattserve path (gRPC
gateway -> Ray streaming generator -> engine loop with metering) against a bare grpc.aio
streaming server that emits the same tokens, both in their own process, measured in one run.

    .venv/bin/python benchmarks/bench_gateway_overhead.py [--requests 400] [--concurrency 32] [--tokens 32]

Prints requests/s and tokens/s for both, and the ratios wattserve/bare.
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
import time
from pathlib import Path

import grpc

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc

BARE_SERVER = r'''
import asyncio, sys
import grpc
from runtime.api.gen import wattserve_pb2 as pb, wattserve_pb2_grpc as pb_grpc

class Bare(pb_grpc.InferenceServicer):
    async def Generate(self, request, context):
        for i in range(request.max_tokens):
            yield pb.GenerateResponse(chunk=pb.TokenChunk(text=" tok", token_ids=[0]))
        yield pb.GenerateResponse(usage=pb.Usage(completion_tokens=request.max_tokens))

async def main():
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(Bare(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
'''

CONFIG = """
ray: {num_cpus: 2, object_store_memory_mb: 128}
auth: {enabled: false}  # loopback benchmark: no keys
gateway: {port: 0, max_inflight: 1024}
http: {enabled: false}
experts:
  - {name: synth, engine: {kind: synthetic}, device: cpu, max_batch: 256, max_queue: 256}
"""


def start(cmd: list[str], env=None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
        if m:
            # keep draining output so the child never blocks on a full pipe
            asyncio.get_event_loop().run_in_executor(None, lambda: [None for _ in proc.stdout])
            return proc, m.group(1)
    proc.kill()
    raise SystemExit(f"{cmd[0]} did not start")


async def load(target: str, requests: int, concurrency: int, tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    got = 0
    failures = 0
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def one():
            nonlocal got, failures
            async with sem:
                try:
                    async for msg in stub.Generate(pb.GenerateRequest(prompt="a b c", max_tokens=tokens, expert=""), timeout=60):
                        got += len(msg.chunk.token_ids)
                except grpc.aio.AioRpcError:
                    failures += 1

        await asyncio.gather(*(one() for _ in range(min(concurrency, requests))))  # warm-up
        got = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "requests_per_s": requests / elapsed, "tokens_per_s": got / elapsed, "failures": failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out")
    args = ap.parse_args()
    asyncio.set_event_loop(asyncio.new_event_loop())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "synth.yaml"
        cfg.write_text(CONFIG)
        for name, cmd in (
            ("bare grpc.aio", [sys.executable, "-c", BARE_SERVER]),
            ("wattserve", [str(Path(sys.executable).parent / "wattserve"), "serve", "--config", str(cfg)]),
        ):
            print(f"starting {name} ...", flush=True)
            proc, target = start(cmd, env)
            try:
                r = asyncio.get_event_loop().run_until_complete(load(target, args.requests, args.concurrency, args.tokens))
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(60)
            results[name] = r
            print(f"  {name:<14} {r['requests_per_s']:8.1f} req/s {r['tokens_per_s']:9.0f} tokens/s  failures {r['failures']}")
    bare, ws = results["bare grpc.aio"], results["wattserve"]
    ratios = {k: ws[k] / bare[k] for k in ("requests_per_s", "tokens_per_s")}
    print(f"{args.requests} requests x {args.tokens} tokens, {args.concurrency} in flight")
    print(f"  wattserve / bare: requests/s {ratios['requests_per_s']:.2f}x, tokens/s {ratios['tokens_per_s']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "ratios": ratios, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
