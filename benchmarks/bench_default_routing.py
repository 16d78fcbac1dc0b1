"""Where the default router sends a mixed prompt set, and the joules, against always-edge and
always-cloud: the real default experts of configs/local.yaml (default router settings), embedded
Ray, gRPC, one request at a time.

    .venv/bin/python benchmarks/bench_default_routing.py [--modes auto edge cloud auto]

Each mode replays the same prompts: ``auto`` lets the router choose, ``edge``/``cloud`` pin an
expert. Running ``auto`` first and last shows the start (each replica's start-up probe has
measured its costs; with ``--no-probe`` an expert that never served is priced by its cost_priors)
and the routing once both have served. Prints each request's
expert, predicted and measured joules, then per mode the split and the total measured energy.
No quality column: these prompts have no labels (bench_routing_live.py measures quality on the labelled set).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
from host import cpu_model  # noqa: E402 - benchmarks/ is the script's directory

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc

LOCAL = Path(__file__).resolve().parents[1] / "configs" / "local.yaml"

#: (prompt, max_tokens): short questions and longer answers
PROMPTS = [
    ("What is the capital of France?", 16),
    ("2 + 2 =", 8),
    ("Name a primary colour.", 8),
    ("Translate 'thank you' into Spanish.", 12),
    ("Write a short story about a robot who learns to paint, with a beginning, a middle and an end.", 64),
    ("Explain in detail how photosynthesis works, step by step, for a high-school student.", 64),
    ("Summarise the following text: " + "The quick brown fox jumps over the lazy dog. " * 6, 48),
    ("List five tips for writing clean Python code and explain each one.", 64),
]




async def run(modes: list[str], probe: bool = True) -> None:
    import ray

    from runtime.api.server import WattserveServer
    from runtime.config import load_config
    from workers.models import default_cache_dir

    ray.init(num_cpus=2, object_store_memory=96 * 1024 * 1024, _node_ip_address="127.0.0.1",
             include_dashboard=False, log_to_driver=False)
    cfg = load_config(LOCAL)
    cfg.gateway.port, cfg.http.port, cfg.ledger.path = 0, 0, None
    cfg.model_cache_dir = str(default_cache_dir())
    for e in cfg.experts:
        e.startup_probe = probe
    srv = WattserveServer(cfg, progress=print)
    await srv.start()
    summary = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            for mode in modes:
                split: dict[str, int] = {}
                total = 0.0
                for prompt, n in PROMPTS:
                    usage = None
                    req = pb.GenerateRequest(prompt=prompt, max_tokens=n, expert="" if mode == "auto" else mode)
                    async for msg in stub.Generate(req, timeout=600):
                        if msg.HasField("usage"):
                            usage = msg.usage
                    split[usage.expert] = split.get(usage.expert, 0) + 1
                    total += usage.energy_j
                    print(f"{mode:<6} {n:>3} tokens -> {usage.expert:<6} predicted {usage.predicted_energy_j:6.2f} J, "
                          f"measured {usage.energy_j:6.2f} J ({usage.energy_source}), {usage.completion_tokens} tokens")
                summary.append((mode, split, total))
    finally:
        await srv.stop()
        ray.shutdown()
    print(f"\nCPU: {cpu_model()}; start-up probes {'on' if probe else 'off'}; price: router.quality_per_j={cfg.router.quality_per_j} "
          f"(default {cfg.router.price.default_quality_per_j}/J)")
    print(f"{'mode':<8} {'split':<28} {'energy J':>9}")
    for mode, split, total in summary:
        print(f"{mode:<8} {', '.join(f'{k} {v}' for k, v in sorted(split.items())):<28} {total:9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["auto", "edge", "cloud", "auto"],
                    choices=["auto", "edge", "cloud"], help="runs in order over the same prompts")
    ap.add_argument("--no-probe", action="store_true", help="no start-up probes: cold experts priced by cost_priors")
    args = ap.parse_args()
    asyncio.run(run(args.modes, probe=not args.no_probe))


if __name__ == "__main__":
    main()
