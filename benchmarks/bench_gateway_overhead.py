"""What the serving path costs: the synthetic engine behind the full wattserve path (gRPC
gateway -> Ray streaming generator -> engine loop with metering) against a bare grpc.aio
streaming server that emits the same tokens, both in their own process, measured in one run.

    .venv/bin/python benchmarks/bench_gateway_overhead.py [--requests 400] [--concurrency 32]
        [--tokens 32] [--rounds 3] [--granularity matched|token] [--step-ms 0]

Both servers stay up for the whole run and the load alternates between them (wattserve, bare,
wattserve, bare, ...), so load from other processes on a shared machine hits both sides alike.

Message granularity: wattserve sends the tokens that reach the gateway together as one gRPC
message, so under load it sends fewer messages than tokens. ``matched`` (the default) makes the
bare server send each request's tokens in as many messages as wattserve sent per request in the
round before it; ``token`` sends one message per token from the bare server (the comparison this
benchmark made before, which is not like for like). Both sides' messages per request are printed.
With the engine as fast as it can be (``--step-ms 0``) wattserve sends each answer in about one
message, so the comparison measures what a request costs; with a paced engine (``--step-ms 2``:
32 in flight can then use 16,000 tokens/s) tokens stream one message each and the gaps between
them show what the path adds to inter-token latency.

Per side: requests/s, tokens/s, messages per request, and latencies as the client sees them:
time to first token, inter-token latency (the gap between consecutive messages that carry tokens,
as vLLM's serving benchmark counts it: at equal granularity both sides have the same gaps to
measure) and time per output token ((last token - first token) / (tokens - 1) per request that
came in more than one message), p50 and p99; then the ratios wattserve/bare per round and their median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from host import cpu_model, start_server  # noqa: E402 - benchmarks/ is the script's directory

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc

# The bare server reads "<mean messages per request>/<ms per token>" from the request's
# ``expert`` field (no messages: one per token), so the benchmark can change it between rounds.
BARE_SERVER = r'''
import asyncio
import grpc
from runtime.api.gen import wattserve_pb2 as pb, wattserve_pb2_grpc as pb_grpc

class Bare(pb_grpc.InferenceServicer):
    calls = 0

    async def Generate(self, request, context):
        n = request.max_tokens
        messages, step_ms = request.expert.split("/")
        if messages:  # a mean such as 1.25: every fourth answer in two messages, the others in one
            Bare.calls += 1
            mean = float(messages)
            whole = int(mean)
            messages = min(n, whole + (int(Bare.calls * (mean - whole)) != int((Bare.calls - 1) * (mean - whole))))
        else:
            messages = n
        sent = 0
        for i in range(messages):
            size = (n - sent) // (messages - i)  # spread the tokens evenly over the messages
            if float(step_ms):
                await asyncio.sleep(size * float(step_ms) / 1000)  # as long as the engine takes for them
            yield pb.GenerateResponse(chunk=pb.TokenChunk(text=" tok" * size, token_ids=[0] * size))
            sent += size
        yield pb.GenerateResponse(usage=pb.Usage(completion_tokens=n))

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
  - {name: synth, engine: {kind: synthetic, step_ms: STEP_MS}, device: cpu, max_batch: 256, max_queue: 256}
"""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def load(target: str, requests: int, concurrency: int, tokens: int, bare: str = "") -> dict:
    """Send ``requests`` Generate calls, ``concurrency`` at a time; time every token message.
    ``bare``: what the bare server reads from ``expert`` (empty for wattserve)."""
    sem = asyncio.Semaphore(concurrency)
    expert = bare
    stats = {"tokens": 0, "messages": 0, "failures": 0}
    ttft_s: list[float] = []
    gaps_s: list[float] = []
    tpot_s: list[float] = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def one(record: bool):
            async with sem:
                t0 = time.perf_counter()
                first = last = None
                got = 0
                try:
                    async for msg in stub.Generate(pb.GenerateRequest(prompt="a b c", max_tokens=tokens, expert=expert),
                                                   timeout=60):
                        n = len(msg.chunk.token_ids)
                        if not n:
                            continue
                        now = time.perf_counter()
                        if not record:
                            continue
                        stats["tokens"] += n
                        stats["messages"] += 1
                        got += n
                        if last is None:
                            first = now
                            ttft_s.append(now - t0)
                        else:
                            gaps_s.append(now - last)
                        last = now
                except grpc.aio.AioRpcError:
                    stats["failures"] += 1
                    return
                if record and last is not None and last > first:  # answers in one message have no TPOT
                    tpot_s.append((last - first) / (got - 1))

        await asyncio.gather(*(one(False) for _ in range(min(concurrency, requests))))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(one(True) for _ in range(requests)))
        elapsed = time.perf_counter() - t0
    ok = max(1, requests - stats["failures"])
    return {
        "seconds": elapsed, "requests_per_s": requests / elapsed, "tokens_per_s": stats["tokens"] / elapsed,
        "messages_per_request": stats["messages"] / ok, "failures": stats["failures"],
        "ttft_ms_p50": 1000 * pct(ttft_s, 0.5), "ttft_ms_p99": 1000 * pct(ttft_s, 0.99),
        "itl_ms_p50": 1000 * pct(gaps_s, 0.5), "itl_ms_p99": 1000 * pct(gaps_s, 0.99),
        "tpot_ms_p50": 1000 * pct(tpot_s, 0.5), "tpot_ms_p99": 1000 * pct(tpot_s, 0.99),
    }


KEYS = ("requests_per_s", "tokens_per_s", "messages_per_request", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50",
        "itl_ms_p99", "tpot_ms_p50", "tpot_ms_p99")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")  # one message per request has no inter-token gaps


def show(name: str, r: dict) -> None:
    print(f"  {name:<10} {r['requests_per_s']:7.1f} req/s {r['tokens_per_s']:8.0f} tok/s "
          f"{r['messages_per_request']:5.2f} msg/req  TTFT p50 {r['ttft_ms_p50']:6.1f} p99 {r['ttft_ms_p99']:6.1f} ms  "
          f"ITL p50 {r['itl_ms_p50']:5.2f} p99 {r['itl_ms_p99']:6.2f} ms  TPOT p50 {r['tpot_ms_p50']:5.2f} ms  "
          f"failures {r['failures']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="pairs of runs, wattserve then bare")
    ap.add_argument("--granularity", choices=("matched", "token"), default="matched",
                    help="matched: bare sends as many messages per request as wattserve did; token: one per token")
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="the synthetic engine's step (0: as fast as it can); the bare server waits as long per token")
    ap.add_argument("--out")
    args = ap.parse_args()
    asyncio.set_event_loop(asyncio.new_event_loop())
    run = asyncio.get_event_loop().run_until_complete
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    print(f"{args.requests} requests x {args.tokens} tokens, {args.concurrency} in flight, "
          f"granularity {args.granularity}, engine step {args.step_ms} ms, {args.rounds} rounds")
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "synth.yaml"
        cfg.write_text(CONFIG.replace("STEP_MS", str(args.step_ms)))
        servers = {}
        try:
            for name, cmd in (
                ("bare", [sys.executable, "-c", BARE_SERVER]),
                ("wattserve", [str(Path(sys.executable).parent / "wattserve"), "serve", "--config", str(cfg)]),
            ):
                print(f"starting {name} ...", flush=True)
                servers[name] = start_server(cmd, env, timeout_s=120)
            messages = None  # wattserve's last mean messages per request, for "matched"
            for i in range(args.rounds):
                results = {}
                for name in ("wattserve", "bare"):  # ABAB: "matched" needs wattserve's count first
                    bare = ""
                    if name == "bare":
                        bare = f"{messages if args.granularity == 'matched' else ''}/{args.step_ms}"
                    results[name] = r = run(load(servers[name][1], args.requests, args.concurrency, args.tokens, bare))
                    if name == "wattserve":
                        messages = max(1.0, round(r["messages_per_request"], 2))
                    show(name, r)
                ratios = {k: ratio(results["wattserve"][k], results["bare"][k]) for k in KEYS}
                print(f"  round {i + 1}: wattserve/bare requests/s {ratios['requests_per_s']:.2f}x, "
                      f"ITL p50 {ratios['itl_ms_p50']:.2f}x, TPOT p50 {ratios['tpot_ms_p50']:.2f}x, "
                      f"TTFT p50 {ratios['ttft_ms_p50']:.2f}x", flush=True)
                rounds.append({"results": results, "ratios": ratios})
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGINT)
            for proc, _ in servers.values():
                proc.wait(60)
    median = {k: statistics.median(r["ratios"][k] for r in rounds) for k in KEYS}  # nan if any is nan
    print(f"median of {len(rounds)} rounds, wattserve/bare: requests/s {median['requests_per_s']:.2f}x, "
          f"tokens/s {median['tokens_per_s']:.2f}x, messages/request {median['messages_per_request']:.2f}x, "
          f"TTFT p50 {median['ttft_ms_p50']:.2f}x, ITL p50 {median['itl_ms_p50']:.2f}x, p99 {median['itl_ms_p99']:.2f}x, "
          f"TPOT p50 {median['tpot_ms_p50']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_model(), "rounds": rounds, "median_ratios": median,
                                              "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
