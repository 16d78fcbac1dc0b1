"""Live routing on a served config: ``model=auto`` against every expert pinned, on a labelled set.

Starts ``wattserve serve --config CONFIG --port 0 --http-port -1`` (or uses ``--target``), then sends
every item of a labelled JSONL set once per policy: ``auto`` (the router decides; no budget) and
each expert pinned. The default set is ``data/quality/heldout.jsonl``, prompts the shipped gate
never saw (``prompts.jsonl`` is what it was fitted on: quality measured there is in-sample; the
script counts how many sent prompts the gate trained on, from ``gate.json``, and warns).
Short-answer items go through ``Generate`` (greedy, stop at a newline), multiple-choice items
through ``Score``; both are scored with the same rules as ``wattserve quality measure``
(``router/quality.py``). Policies take turns item by item (the order rotates), so load from other
processes hits them alike.

Prints per policy: requests, the split between experts, mean quality, total and per-request
joules with their energy source, mean latency; then per task the quality and joules of every
policy, and a paired comparison of ``auto`` against each pinned expert on the same items: the
quality difference with a paired bootstrap interval (items resampled), the items only one of them
got right, and the joules ratio with its interval. Works whatever the router does (prices energy
or not): it only reads which expert answered. ``--summarise OUT.json`` prints the same from a run's
JSON (also from a run cut short: the JSON is rewritten every 10 items).

    .venv/bin/python benchmarks/bench_routing_live.py [--config configs/local.yaml] [--limit 0]
        [--data data/quality/heldout.jsonl] [--target 127.0.0.1:50051] [--json out.json]
    .venv/bin/python benchmarks/bench_routing_live.py --summarise out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
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
        reason, predicted_j = resp.routing_reason, resp.predicted_energy_j
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
        reason, predicted_j = usage.routing_reason, usage.predicted_energy_j
    return {"experts": answered, "right": right, "energy_j": energy_j, "sources": sorted(sources),
            "latency_ms": (time.perf_counter() - t0) * 1000, "path": "score" if item.kind == "mc" else "generate",
            "task": item.task, "id": item.id, "reason": reason, "predicted_energy_j": predicted_j}


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


def _aligned(results: dict[str, list[dict]]) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """Item ids every policy answered (in the order sent) and each policy's result by id."""
    by_id = {p: {r.get("id", str(n)): r for n, r in enumerate(rs)} for p, rs in results.items()}
    first = next(iter(results.values()), [])
    ids = [r.get("id", str(n)) for n, r in enumerate(first)]
    return [i for i in ids if all(i in rows for rows in by_id.values())], by_id


def paired(results: dict[str, list[dict]], a: str, b: str, n_boot: int = 4000, seed: int = 0) -> dict:
    """``a`` against ``b`` on the items both answered: quality difference (a − b) and joules ratio
    (a / b), each with a 95 % paired bootstrap interval (items resampled with replacement, the
    same draw for both), and the items only one of them got right."""
    import numpy as np

    ids, by_id = _aligned(results)
    if not ids:
        raise ValueError("no item was answered under both policies")
    ra = np.array([float(by_id[a][i]["right"]) for i in ids])
    rb = np.array([float(by_id[b][i]["right"]) for i in ids])
    ea = np.array([by_id[a][i]["energy_j"] for i in ids])
    eb = np.array([by_id[b][i]["energy_j"] for i in ids])
    idx = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    diffs = (ra[idx] - rb[idx]).mean(axis=1)
    ratios = ea[idx].sum(axis=1) / np.maximum(eb[idx].sum(axis=1), 1e-12)
    return {"items": len(ids), "quality_a": float(ra.mean()), "quality_b": float(rb.mean()),
            "quality_diff": float(ra.mean() - rb.mean()),
            "quality_diff_ci95": [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))],
            "only_a_right": int(((ra == 1) & (rb == 0)).sum()), "only_b_right": int(((ra == 0) & (rb == 1)).sum()),
            "energy_j_a": float(ea.sum()), "energy_j_b": float(eb.sum()),
            "energy_ratio": float(ea.sum() / eb.sum()) if eb.sum() > 0 else float("inf"),
            "energy_ratio_ci95": [float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))]}


def where_auto_differs(results: dict[str, list[dict]], pinned: str) -> dict[str, dict]:
    """Per task, the items ``auto`` sent to some other expert than ``pinned``: on the rest both
    answers come from the same expert, so the difference auto makes is here (its joules elsewhere
    differ only by measurement noise)."""
    ids, by_id = _aligned(results)
    out: dict[str, dict] = {}
    for i in ids:
        a, b = by_id["auto"][i], by_id[pinned][i]
        if sorted(a["experts"]) == [pinned]:
            continue
        cell = out.setdefault(a["task"], {"items": 0, "only_auto_right": 0, "only_pinned_right": 0,
                                          "energy_j_auto": 0.0, "energy_j_pinned": 0.0})
        cell["items"] += 1
        cell["only_auto_right"] += int(a["right"] and not b["right"])
        cell["only_pinned_right"] += int(b["right"] and not a["right"])
        cell["energy_j_auto"] += a["energy_j"]
        cell["energy_j_pinned"] += b["energy_j"]
    return out


_PREDICTED = re.compile(r"(\w+) w=[\d.]+ q=[\d.]+ \(([\d.eE+-]+) J|(\w+) not added: .*? price x ([\d.eE+-]+) J")


def cost_ranking(results: dict[str, list[dict]]) -> dict[str, list[int]]:
    """Per task, on Score items: how often the joules auto's plan predicted (read from its routing
    reason) put two experts in the order their pinned requests measured: [agreeing, compared]."""
    ids, by_id = _aligned(results)
    pinned = [p for p in results if p != "auto"]
    out: dict[str, list[int]] = {}
    for i in ids:
        a = by_id["auto"][i]
        if a.get("path") != "score" or len(pinned) != 2:
            continue
        predicted = {m[1] or m[3]: float(m[2] or m[4]) for m in _PREDICTED.finditer(a.get("reason", ""))}
        x, y = pinned
        if x not in predicted or y not in predicted:
            continue
        measured = by_id[x][i]["energy_j"] - by_id[y][i]["energy_j"]
        cell = out.setdefault(a["task"], [0, 0])
        cell[0] += int((predicted[x] > predicted[y]) == (measured > 0))
        cell[1] += 1
    return out


def per_task(results: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """task -> policy -> items, quality, joules, answers per expert (items every policy answered)."""
    ids, by_id = _aligned(results)
    out: dict[str, dict[str, dict]] = {}
    for i in ids:
        task = next(iter(by_id.values()))[i]["task"]
        for p in results:
            r = by_id[p][i]
            cell = out.setdefault(task, {}).setdefault(p, {"items": 0, "right": 0, "energy_j": 0.0, "answered_by": Counter()})
            cell["items"] += 1
            cell["right"] += int(r["right"])
            cell["energy_j"] += r["energy_j"]
            cell["answered_by"]["+".join(sorted(r["experts"]))] += 1
    for cells in out.values():
        for cell in cells.values():
            cell["quality"] = cell["right"] / cell["items"]
            cell["answered_by"] = dict(cell["answered_by"])
    return out


def gate_overlap(prompts: list[str], gate_dir: str | None) -> tuple[int | None, int | None, str]:
    """How many ``prompts`` the gate trained on, and how many are its own held-out rows, from the
    prompt hashes ``gate fit`` records in ``gate.json``; (None, None, why) when it cannot tell."""
    from router.eval_data import prompt_sha1

    if not gate_dir:
        return None, None, "the server reports no fitted gate"
    try:
        meta = json.loads((Path(gate_dir) / "gate.json").read_text())
    except (OSError, ValueError) as exc:
        return None, None, f"cannot read {Path(gate_dir) / 'gate.json'}: {exc}"
    if not meta.get("train_prompt_sha1"):
        return None, None, f"{gate_dir}/gate.json lists no training prompts (fitted before they were recorded)"
    trained, heldout = set(meta["train_prompt_sha1"]), set(meta.get("heldout_prompt_sha1") or ())
    hashes = [prompt_sha1(p) for p in prompts]
    return sum(h in trained for h in hashes), sum(h in heldout for h in hashes), f"{gate_dir}/gate.json"


def report(results: dict[str, list[dict]], meta: dict) -> dict:
    """Print the tables; returns the summary, per-task and paired figures for the JSON."""
    summary = summarise(results)
    ids, by_id = _aligned(results)
    tasks = Counter(by_id[next(iter(results))][i]["task"] for i in ids)
    print(f"\n{len(ids)} items ({', '.join(f'{t} {n}' for t, n in tasks.items())}) from {meta.get('data', '?')}; "
          f"gate {meta.get('gate') or '-'}; target {meta.get('target')}; CPU {meta.get('cpu')}")
    if meta.get("overlap"):
        print(meta["overlap"])
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
    tasks_table = per_task(results)
    policies = list(results)
    print("\nper task: quality (right/items) and joules per policy; * where auto's right count differs from that policy's")
    print(f"{'task':<24} {'items':>5}  " + "  ".join(f"{p:>17}" for p in policies) + "  auto answered by")
    for task, cells in tasks_table.items():
        auto = cells.get("auto")
        row = []
        for p in policies:
            c = cells[p]
            mark = "*" if auto is not None and p != "auto" and c["right"] != auto["right"] else " "
            row.append(f"{c['quality']:.3f}{mark} {c['energy_j']:8.1f} J")
        who = ", ".join(f"{e} {n}" for e, n in sorted(auto["answered_by"].items())) if auto else ""
        print(f"{task:<24} {cells[policies[0]]['items']:>5}  " + "  ".join(f"{x:>17}" for x in row) + f"  {who}")
    pairs = {}
    if "auto" in results:
        print("\nauto against each expert pinned, paired on the same items (95 % bootstrap intervals):")
        for p in policies:
            if p == "auto":
                continue
            d = pairs[p] = paired(results, "auto", p)
            lo, hi = d["quality_diff_ci95"]
            rlo, rhi = d["energy_ratio_ci95"]
            print(f"  auto - {p:<6} quality {d['quality_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]  "
                  f"(only auto right {d['only_a_right']}, only {p} right {d['only_b_right']}, of {d['items']})  "
                  f"joules x{d['energy_ratio']:.3f} [{rlo:.3f}, {rhi:.3f}] ({d['energy_j_a']:.1f} vs {d['energy_j_b']:.1f} J)")
        for p in policies:
            if p == "auto":
                continue
            differs = where_auto_differs(results, p)
            if not differs:
                continue
            n = sum(c["items"] for c in differs.values())
            print(f"\nwhere auto did not answer with {p} alone ({n} items): items, only auto right, only {p} right, joules auto vs {p}")
            for task, c in differs.items():
                print(f"  {task:<24} {c['items']:>4}  {c['only_auto_right']:>3}  {c['only_pinned_right']:>3}  "
                      f"{c['energy_j_auto']:8.1f} vs {c['energy_j_pinned']:8.1f} J")
            pairs[p]["where_auto_differs"] = differs
    ranking = cost_ranking(results) if "auto" in results else {}
    if ranking:
        agree, n = sum(c[0] for c in ranking.values()), sum(c[1] for c in ranking.values())
        print(f"\nScore: the experts' predicted joules (auto's plan) in the order the pinned requests measured: {agree} of {n} "
              f"({', '.join(f'{t} {c[0]}/{c[1]}' for t, c in ranking.items())})")
    return {"summary": summary, "per_task": tasks_table, "paired": pairs, "cost_ranking": ranking}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    ap.add_argument("--target", help="a running server (default: start one with --config)")
    ap.add_argument("--data", default=str(ROOT / "data" / "quality" / "heldout.jsonl"))
    ap.add_argument("--limit", type=int, default=0, help="items, spread over the tasks (default 0: all)")
    ap.add_argument("--tasks", help="comma-separated tasks to keep (default: all)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--mc-norm", choices=("per_char", "sum"), default="per_char")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    ap.add_argument("--start-timeout-s", type=float, default=600.0)
    ap.add_argument("--json", help="write the per-policy summary and every result here")
    ap.add_argument("--gate", help="the served gate's directory, for the overlap check (default: what the server reports)")
    ap.add_argument("--summarise", metavar="JSON", help="print the tables of an earlier run's --json (sends nothing)")
    args = ap.parse_args()

    if args.summarise:
        saved = json.loads(Path(args.summarise).read_text())
        report(saved["results"], saved)
        return 0

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

    # A run stopped with SIGTERM (kill PID) still stops the server it started and keeps its JSON.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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
            gate_dir = args.gate or (gate.split(":", 1)[1] if gate.startswith("fitted:") else None)
            trained, own_heldout, how = gate_overlap([it.prompt for it in items], gate_dir)
            if trained is None:
                overlap = f"WARNING: cannot tell whether the gate saw these prompts ({how})"
            elif trained:
                overlap = (f"WARNING: {trained} of {len(items)} prompts are in the gate's training set ({how}): "
                           "auto's quality on them is in-sample; use data/quality/heldout.jsonl")
            else:
                overlap = (f"overlap check: none of the {len(items)} prompts is in the gate's training set "
                           f"({own_heldout} are rows it held out when fitted; {how})")
            print(overlap, file=sys.stderr, flush=True)
            policies = ["auto", *experts]
            results: dict[str, list[dict]] = {p: [] for p in policies}
            cpu = cpu_model()
            t0 = time.monotonic()
            for n, item in enumerate(items):
                order = policies[n % len(policies):] + policies[: n % len(policies)]
                for p in order:
                    results[p].append(ask(stub, pb, item, "" if p == "auto" else p, args.max_tokens, args.mc_norm, args.timeout_s))
                if (n + 1) % 10 == 0 or n + 1 == len(items):
                    print(f"  {n + 1}/{len(items)} items, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
                    if args.json:  # a run cut short keeps what it measured
                        Path(args.json).write_text(json.dumps({"target": target, "gate": gate, "data": args.data, "items": n + 1, "cpu": cpu,
                                                               "overlap": overlap, "partial": True, "results": results}))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    meta = {"target": target, "gate": gate, "data": args.data, "cpu": cpu_model(), "overlap": overlap}
    out = report(results, meta)
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "items": len(items), **out, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
