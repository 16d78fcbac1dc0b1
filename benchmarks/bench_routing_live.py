"""Live routing on a served config: ``model=auto`` against every expert pinned, on a labelled set.

Starts ``wattserve serve --config CONFIG --port 0 --http-port -1`` (or uses ``--target``), then sends
every item of a labelled JSONL set (``data/quality/prompts.jsonl``) once per policy: ``auto`` (the
router decides; no budget) and each expert pinned. Short-answer items go through ``Generate``
(greedy, stop at a newline), multiple-choice items through ``Score``; both are scored with the
same rules as ``wattserve quality measure`` (``router/quality.py``). Policies take turns item by
item (the order rotates), so load from other processes hits them alike.

Prints per policy: requests, the split between experts, mean quality, total and per-request
joules with their energy source, mean latency; side by side. Works whatever the router does
(prices energy or not): it only reads which expert answered.

    .venv/bin/python benchmarks/bench_routing_live.py [--config configs/local.yaml] [--limit 60]
        [--target 127.0.0.1:50051] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host import cpu_model  # noqa: E402 - benchmarks/ is the script's directory

from router.quality import exact_match, read_items  # noqa: E402

LISTENING = re.compile(r"listening on (\S+:\d+)")


def start_server(config: str, timeout_s: float) -> tuple[subprocess.Popen, str]:
    """``wattserve serve`` on free ports; returns the process and its gRPC target."""
    cmd = [sys.executable, "-c", "import sys; from runtime.cli import main; sys.exit(main())",
           "serve", "--config", config, "--port", "0", "--http-port", "-1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"wattserve serve exited with {proc.returncode} before listening")
            continue
        m = LISTENING.search(line)
        if m:
            return proc, m.group(1)
    proc.terminate()
    raise RuntimeError(f"wattserve serve did not listen within {timeout_s:.0f} s")


def ask(stub, pb, item, expert: str, max_tokens: int, norm: str, timeout_s: float) -> dict:
    """One request; returns who answered, right or wrong, joules and their source, latency."""
    t0 = time.perf_counter()
    if item.kind == "mc":
        resp = stub.Score(pb.ScoreRequest(prompt=item.prompt, choices=list(item.choices), expert=expert,
                                          choice_norm=norm), timeout=timeout_s)
        right = resp.best_choice == item.gold  # the served answer, ranked as the labels were measured
        answered = [c.expert for c in resp.experts]
        sources = {c.energy_source for c in resp.experts}
        energy_j = resp.energy_j
    else:
        req = pb.GenerateRequest(prompt=item.prompt, max_tokens=max_tokens, expert=expert,
                                 sampling=pb.SamplingParams(temperature=0.0, stop=["\n"]))
        text, usage = [], None
        for msg in stub.Generate(req, timeout=timeout_s):
            if msg.HasField("chunk"):
                text.append(msg.chunk.text)
            else:
                usage = msg.usage
        right = exact_match("".join(text), item.answers, item.match)
        answered, sources, energy_j = [usage.expert], {usage.energy_source}, usage.energy_j
    return {"experts": answered, "right": right, "energy_j": energy_j, "sources": sorted(sources),
            "latency_ms": (time.perf_counter() - t0) * 1000, "path": "score" if item.kind == "mc" else "generate",
            "task": item.task}


def summarise(results: dict[str, list[dict]]) -> dict:
    out = {}
    for policy, rs in results.items():
        split = Counter(e for r in rs for e in r["experts"])
        answers = sum(split.values()) or 1
        total = sum(r["energy_j"] for r in rs)
        out[policy] = {
            "requests": len(rs),
            "split": {e: n / answers for e, n in sorted(split.items())},
            "quality": sum(r["right"] for r in rs) / len(rs),
            "energy_j": total,
            "energy_j_per_request": total / len(rs),
            "energy_sources": sorted({s for r in rs for s in r["sources"]}),
            "latency_ms_mean": sum(r["latency_ms"] for r in rs) / len(rs),
            "by_path": {path: _path(part) for path in ("generate", "score")
                        if (part := [r for r in rs if r.get("path") == path])},
        }
    return out


def _path(rs: list[dict]) -> dict:
    """One path's requests: quality, joules, who answered (``+``-joined when several experts did)."""
    return {"requests": len(rs), "quality": sum(r["right"] for r in rs) / len(rs),
            "energy_j": sum(r["energy_j"] for r in rs),
            "answered_by": dict(Counter("+".join(sorted(r["experts"])) for r in rs))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    ap.add_argument("--target", help="a running server (default: start one with --config)")
    ap.add_argument("--data", default=str(ROOT / "data" / "quality" / "prompts.jsonl"))
    ap.add_argument("--limit", type=int, default=60, help="items (spread over the tasks; default 60)")
    ap.add_argument("--tasks", help="comma-separated tasks to keep (default: all)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--mc-norm", choices=("per_char", "sum"), default="per_char")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    ap.add_argument("--start-timeout-s", type=float, default=600.0)
    ap.add_argument("--json", help="write the per-policy summary and every result here")
    args = ap.parse_args()

    import grpc

    from runtime.api.gen import wattserve_pb2 as pb
    from runtime.api.gen import wattserve_pb2_grpc as pb_grpc

    items = read_items(args.data)
    if args.tasks:
        keep = {t.strip() for t in args.tasks.split(",")}
        items = [it for it in items if it.task in keep]
    # Round-robin over tasks so a limit keeps the mix.
    by_task: dict[str, list] = {}
    for it in items:
        by_task.setdefault(it.task, []).append(it)
    mixed = [q for group in zip(*by_task.values(), strict=False) for q in group]
    items = mixed[: args.limit] if args.limit else mixed

    proc = None
    target = args.target
    if target is None:
        print(f"starting wattserve serve --config {args.config} ...", file=sys.stderr, flush=True)
        proc, target = start_server(args.config, args.start_timeout_s)
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.InferenceStub(ch)
            admin = pb_grpc.AdminStub(ch)
            experts = [e.name for e in admin.ListExperts(pb.ListExpertsRequest(), timeout=30).experts]
            gate = admin.GetStatus(pb.GetStatusRequest(), timeout=30).gate
            policies = ["auto", *experts]
            results: dict[str, list[dict]] = {p: [] for p in policies}
            t0 = time.monotonic()
            for n, item in enumerate(items):
                order = policies[n % len(policies):] + policies[: n % len(policies)]
                for p in order:
                    results[p].append(ask(stub, pb, item, "" if p == "auto" else p, args.max_tokens, args.mc_norm, args.timeout_s))
                if (n + 1) % 10 == 0 or n + 1 == len(items):
                    print(f"  {n + 1}/{len(items)} items, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    summary = summarise(results)
    tasks = Counter(it.task for it in items)
    print(f"\n{len(items)} items ({', '.join(f'{t} {n}' for t, n in tasks.items())}); gate {gate or '-'}; target {target}; "
          f"CPU {cpu_model()}")
    print(f"{'policy':<8} {'requests':>8} {'quality':>8} {'J total':>9} {'J/req':>7} {'ms/req':>8}  split  (energy source)")
    for p, s in summary.items():
        split = ", ".join(f"{e} {v:.0%}" for e, v in s["split"].items())
        print(f"{p:<8} {s['requests']:>8} {s['quality']:>8.3f} {s['energy_j']:>9.1f} {s['energy_j_per_request']:>7.2f} "
              f"{s['latency_ms_mean']:>8.0f}  {split}  ({', '.join(s['energy_sources'])})")
    for p, s in summary.items():
        for path, part in s["by_path"].items():
            who = ", ".join(f"{e} {n}" for e, n in sorted(part["answered_by"].items()))
            print(f"  {p:<8} {path:<8} {part['requests']:>4} requests  quality {part['quality']:.3f}  "
                  f"{part['energy_j']:7.1f} J  answered by {who}")
    if args.json:
        Path(args.json).write_text(json.dumps({"target": target, "gate": gate, "items": len(items), "cpu": cpu_model(),
                                               "summary": summary, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
