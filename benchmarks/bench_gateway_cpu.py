"""The gateway's own CPU time per Generate request, without the gRPC transport or Ray: the
servicer (protobuf in and out), the lifecycle (admission, validation, routing, dispatch,
accounting, metrics) and an in-memory replica (``tests/fakes.FakeReplicaClient``) that answers
each request in one chunk and a final message, as the synthetic engine does at full speed.

    .venv/bin/python benchmarks/bench_gateway_cpu.py [--requests 5000] [--repeats 5] [--concurrency 32]
        [--count-calls]

What ``bench_gateway_overhead.py`` cannot separate from the gRPC and Ray machinery around it:
process CPU seconds (``time.process_time``) per request, each repeat printed and their median.
The collector is tuned as in ``wattserve serve`` (``runtime/heap.py``; ``--default-gc``: not).
Compare two versions of the code by running this from each checkout in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import time

import yaml

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.servicer import InferenceServicer
from runtime.config import parse_config
from runtime.gateway import Gateway
from runtime.heap import settle_heap
from tests.fakes import FakeReplicaClient

# the synthetic expert of bench_gateway_overhead.py, served by an in-memory replica
CONFIG = """
auth: {enabled: false}
gateway: {max_inflight: 1024, health_interval_s: 3600}
http: {enabled: false}
experts:
  - {name: synth, engine: {kind: synthetic}, device: cpu, max_batch: 256, max_queue: 256}
"""


class _Context:
    """What the servicer asks of a gRPC context: no deadline."""

    def time_remaining(self) -> None:
        return None


async def measure(requests: int, repeats: int, concurrency: int, settle: bool = True,
                  count_calls: bool = False) -> list[float]:
    """Microseconds of CPU per request, one figure per repeat; with ``count_calls``, function calls
    per request instead (Python functions and builtins, counted by cProfile): the same figure on a
    loaded machine as on a quiet one, where CPU time moves by tens of percent."""
    replica = FakeReplicaClient("synth", tokens=1)  # one chunk, then the final message
    gateway = Gateway(parse_config(yaml.safe_load(CONFIG)), [replica])
    await gateway.start()
    if settle:
        settle_heap()
    servicer = InferenceServicer(gateway)
    message = pb.GenerateRequest(prompt="a b c", max_tokens=32)
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with slots:
            async for _ in servicer.Generate(message, _Context()):
                pass

    per_request_us = []
    try:
        for _ in range(repeats):
            replica.calls.clear()
            if count_calls:
                profile = cProfile.Profile()
                profile.enable()
                await asyncio.gather(*(one() for _ in range(requests)))
                profile.disable()
                per_request_us.append(pstats.Stats(profile).total_calls / requests)
                continue
            start = time.process_time()
            await asyncio.gather(*(one() for _ in range(requests)))
            per_request_us.append(1e6 * (time.process_time() - start) / requests)
    finally:
        await gateway.stop()
    return per_request_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--default-gc", action="store_true", help="leave the collector as CPython sets it")
    ap.add_argument("--count-calls", action="store_true",
                    help="function calls per request (cProfile) instead of CPU time: independent of the machine's load")
    args = ap.parse_args()
    us = asyncio.run(measure(args.requests, args.repeats, args.concurrency, settle=not args.default_gc,
                             count_calls=args.count_calls))
    if args.count_calls:
        print(f"function calls per request (Python and builtins, no gRPC transport, no Ray): "
              f"{' '.join(f'{x:.0f}' for x in us)}; median {statistics.median(us):.0f}")
        return
    print(f"gateway CPU per request (no gRPC transport, no Ray): {' '.join(f'{x:.0f}' for x in us)} us; "
          f"median {statistics.median(us):.0f} us")


if __name__ == "__main__":
    main()
