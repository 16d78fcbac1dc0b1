"""Routing commands: ``wattserve gate fit``, ``wattserve route eval``, ``wattserve budget set|show``."""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
from pathlib import Path

from . import say
from .connect import add_connection_args, channel


def _embedding_cache() -> Path:
    from workers.models import default_cache_dir

    return Path(os.environ.get("WATTSERVE_CACHE_DIR") or default_cache_dir()) / "embeddings"


def _embed(prompts, cache: Path | None):
    from tqdm import tqdm

    from router.gate_fit import embed_cached

    with tqdm(total=len(prompts), desc="embedding prompts (MiniLM)", unit="prompt", file=sys.stderr) as bar:
        emb = embed_cached(prompts, cache, progress=bar.update)
        bar.update(bar.total - bar.n)  # a cache hit fills the bar at once
    return emb


# -- gate fit -----------------------------------------------------------------------------------
def cmd_gate_fit(args) -> int:
    from tqdm import tqdm

    from router.gate_fit import count_truncated, embed_cached, fit_gate, read_labelled

    cols = [c.strip() for c in args.columns.split(",")] if args.columns else None
    data = read_labelled(args.data, cols, limit=args.limit, sample=args.sample, seed=args.seed)
    say(f"{len(data.prompts)} prompts, experts (quality columns): {', '.join(data.experts)}")
    truncated = count_truncated(data.prompts)
    say(f"{truncated} of {len(data.prompts)} prompts are longer than MiniLM's 256 word pieces; "
        f"the {args.window} window embeds them" + (f" (first {args.head_tokens} pieces + the end)" if args.window == "head_tail" else ""))
    with tqdm(total=len(data.prompts), desc="embedding prompts (MiniLM)", unit="prompt", file=sys.stderr) as bar:
        emb = embed_cached(data.prompts, None if args.no_cache else _embedding_cache(), progress=bar.update,
                           window=args.window, head_tokens=args.head_tokens)
        bar.update(bar.total - bar.n)
    with tqdm(total=args.epochs, desc="training gate", unit="epoch", file=sys.stderr) as bar:
        def on_epoch(epoch: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)

        rep = fit_gate(data, emb, args.out, holdout=args.holdout, seed=args.seed, hidden=args.hidden,
                       epochs=args.epochs, on_epoch=on_epoch, window=args.window, head_tokens=args.head_tokens,
                       truncated=truncated)
    print(f"held-out report ({rep['rows']} prompts):")
    print(f"  quality of the gate's top choice   {rep['top_choice_quality']:.4f}  (oracle {rep['oracle_quality']:.4f})")
    for e, q in rep["expert_quality"].items():
        print(f"  always {e:<40} {q:.4f}  (gate picks it for {rep['top_choice_share'][e]:.1%}; predicted mean {rep['predicted_mean_quality'][e]:.4f})")
    acc = rep["top_choice_accuracy_where_experts_disagree"]
    if acc is not None:
        print(f"  top choice is a best expert on {acc:.1%} of the {rep['disagreeing_rows']} prompts where experts disagree")
    print(f"  calibration: Brier {rep['brier']:.4f}, ECE {rep['ece']:.4f}")
    auc, within = rep["auc"], rep["within_task_auc"]
    print("  ranking: AUC " + (f"{auc:.4f}" if auc is not None else "n/a") + ", within-task AUC "
          + (f"{within:.4f} over {rep['tasks_ranked']} (task, expert) groups" if within is not None
             else "n/a (no task column, or no task with both right and wrong answers)"))
    for e, a in rep["within_task_auc_by_expert"].items():
        print(f"    within-task AUC for {e:<30} " + (f"{a:.4f}" if a is not None else "n/a"))
    print(f"  prompts cut to MiniLM's 256 word pieces: {truncated} of {len(data.prompts)} ({args.window} window)")
    print(f"gate saved to {args.out} (use it with router.gate_path)")
    return 0


# -- route eval ---------------------------------------------------------------------------------
def _shared_data_dir() -> Path | None:
    env = os.environ.get("WATTSERVE_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


def _eval_gates(args, data, emb, train, test, names):
    """Gate outputs for the held-out rows: a fitted gate from --gate, or one fitted on ``train``."""
    from router.gate import FittedGate, gate_output
    from router.gate_fit import train_mlp

    if args.gate:
        gate = FittedGate(args.gate, names)
        logits, outputs, source = gate.logits(emb[test]), gate.outputs, gate.source
    else:
        import torch

        say(f"fitting a gate on {len(train)} prompts (held out for the evaluation: {len(test)})")
        mlp = train_mlp(emb[train], data.quality[train], seed=args.seed)
        with torch.inference_mode():
            logits = mlp(torch.as_tensor(emb[test])).numpy()
        outputs, source = data.experts, "fitted:on-the-fly"
    return [gate_output(row, outputs, names, source) for row in logits]


def cmd_route_eval(args) -> int:
    import yaml

    from router.evaluate import evaluate, load_experts
    from router.gate_fit import read_labelled, split

    spec_path = Path(args.experts)
    spec = yaml.safe_load(spec_path.read_text())
    experts = load_experts(spec, spec_path.parent, _shared_data_dir())
    tokens = args.output_tokens or int(spec.get("output_tokens", 128))
    for e in experts:
        say(f"{e.name}: {e.j_per_token:.3f} J/token, {e.tpot_ms:.1f} ms/token at batch {e.batch:.0f} ({e.source}){' - ' + e.note if e.note else ''}")
    data = read_labelled(args.data, [e.column for e in experts], limit=args.limit, sample=args.sample, seed=args.seed)
    emb = _embed(data.prompts, _embedding_cache())
    train, test = split(len(data.prompts), args.holdout, args.seed)
    gates = _eval_gates(args, data, emb, train, test, {e.name: e.column for e in experts})
    quality = data.quality[test][:, [data.experts.index(e.column) for e in experts]]
    # The static baselines' "strongest" is the expert with the best mean quality on the training half.
    prior = {e.name: float(data.quality[train][:, data.experts.index(e.column)].mean()) for e in experts}
    curves = evaluate(experts, gates, quality, prior, tokens, steps=args.steps, seed=args.seed,
                      progress=lambda name: say(f"replayed {name}"))
    _report(args, experts, curves, quality, prior, tokens, len(test))
    return 0


def _report(args, experts, curves, quality, prior, tokens, rows) -> None:
    from router.evaluate import plot, summary

    strong = max(prior, key=prior.get)
    k = [e.name for e in experts].index(strong)
    strong_q, strong_e = float(quality[:, k].mean()), experts[k].j_per_token * tokens
    print(f"\n{Path(args.data).name}: {rows} held-out prompts, {tokens} output tokens per request; "
          f"strongest expert {strong}: quality {strong_q:.4f} at {strong_e:.1f} J/request")
    for line in summary(curves, strong_q, strong_e):
        print("  " + line)
    png = Path(args.png)
    plot(curves, png, f"{Path(args.data).name}: quality vs energy ({rows} held-out prompts)")
    print(f"plot: {png}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "data": str(args.data), "rows": rows, "output_tokens": tokens, "strong": strong,
            "strong_quality": strong_q, "strong_energy_j": strong_e,
            "experts": [{"name": e.name, "j_per_token": e.j_per_token, "tpot_ms": e.tpot_ms, "source": e.source}
                        for e in experts],
            "curves": {c.policy: c.points for c in curves},
        }, indent=1))


# -- budget set|show ----------------------------------------------------------------------------
def _admin(args):
    from ..api.gen import wattserve_pb2_grpc as pb_grpc

    ch = channel(args)
    return ch, pb_grpc.AdminStub(ch)


def _print_budget(b) -> None:
    if b.unlimited:
        print(f"  {b.scope:<24} unlimited            used {b.used_j:10.2f} J  ({b.state})")
    else:
        print(f"  {b.scope:<24} {b.energy_budget_j:10.2f} J / {b.window_s:g} s ({b.average_power_w:.2f} W avg)  "
              f"used {b.used_j:10.2f} J, left {b.remaining_j:.2f} J  [{b.state}"
              + (f", retry in {b.retry_after_s:.0f} s" if b.state == "exhausted" else "")
              + f"; throttle at {b.throttle_fraction:.0%}]")


def cmd_budget_set(args) -> int:
    import grpc

    from ..api.gen import wattserve_pb2 as pb

    req = pb.SetEnergyBudgetRequest(scope=args.scope, window_s=args.window_s or 0.0, unlimited=args.unlimited,
                                    throttle_fraction=args.throttle_fraction or 0.0, reason=args.reason or "",
                                    actor=args.actor or f"{getpass.getuser()}@{socket.gethostname()}")
    if args.energy_j is not None:
        req.energy_budget_j = args.energy_j
    if args.average_power_w is not None:
        req.average_power_w = args.average_power_w
    channel, admin = _admin(args)
    with channel:
        try:
            resp = admin.SetEnergyBudget(req, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    c = resp.change
    print(f"{c.scope}: {c.old_budget} -> {c.new_budget} (by {c.actor} from {c.peer})")
    _print_budget(resp.budget)
    return 0


def cmd_budget_show(args) -> int:
    import datetime

    import grpc

    from ..api.gen import wattserve_pb2 as pb

    channel, admin = _admin(args)
    with channel:
        try:
            resp = admin.GetEnergyBudget(pb.GetEnergyBudgetRequest(scopes=args.scope, recent_changes=args.changes),
                                         timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print("energy budgets:")
    for b in resp.budgets:
        _print_budget(b)
    if resp.changes:
        print("recent changes:")
        for c in resp.changes:
            when = datetime.datetime.fromtimestamp(c.unix_s).strftime("%Y-%m-%d %H:%M:%S")
            print(f"  {when} {c.scope}: {c.old_budget} -> {c.new_budget} by {c.actor or 'anonymous'} from {c.peer or '?'}"
                  + (f" ({c.reason})" if c.reason else ""))
    return 0


def register(sub) -> None:
    gate = sub.add_parser("gate", help="train the MoE² gate").add_subparsers(dest="gate_command", required=True)
    s = gate.add_parser("fit", help="fit the gate on a CSV of (prompt, per-expert quality) rows")
    s.add_argument("--data", required=True, help="CSV with a prompt column, one quality column per expert and "
                   "optionally a task column (within-task AUC), e.g. from `wattserve quality measure`")
    s.add_argument("--out", required=True, help="directory to write the fitted gate to")
    s.add_argument("--columns", help="comma-separated quality columns (default: every numeric/boolean column)")
    s.add_argument("--limit", type=int, help="use only the first N rows")
    s.add_argument("--sample", type=int, help="use a seeded random sample of N rows")
    s.add_argument("--holdout", type=float, default=0.2, help="share of rows held out for the report (default 0.2)")
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--hidden", type=int, default=64, help="MLP hidden units")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-cache", action="store_true", help="do not cache prompt embeddings on disk")
    s.add_argument("--window", choices=("head", "head_tail"), default="head_tail",
                   help="what MiniLM reads of a prompt over 256 word pieces: the head, or the head and the "
                        "end where the question is (default head_tail; docs/routing.md)")
    s.add_argument("--head-tokens", type=int, default=32, help="head_tail: word pieces kept from the start (default 32)")
    s.set_defaults(func=cmd_gate_fit)

    route = sub.add_parser("route", help="offline routing evaluation").add_subparsers(dest="route_command", required=True)
    s = route.add_parser("eval", help="replay labelled prompts through every policy: quality vs energy")
    s.add_argument("--data", required=True, help="labelled CSV (e.g. shared/data/routing/routellm/*.csv)")
    s.add_argument("--experts", required=True, help="expert profiles YAML (e.g. configs/eval/routellm_mixtral_gpt4.yaml)")
    s.add_argument("--gate", help="a fitted gate directory (default: fit one on the training split)")
    s.add_argument("--holdout", type=float, default=0.5, help="share of rows evaluated (the rest trains the gate)")
    s.add_argument("--limit", type=int, help="use only the first N rows")
    s.add_argument("--sample", type=int, help="use a seeded random sample of N rows (MMLU is sorted by subject)")
    s.add_argument("--output-tokens", type=int, help="output tokens per request (default from the profile file)")
    s.add_argument("--steps", type=int, default=21, help="knob values per swept policy")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--png", default="route-eval.png", help="where to write the quality-vs-energy plot")
    s.add_argument("--json", help="also write every point to this JSON file")
    s.set_defaults(func=cmd_route_eval)

    budget = sub.add_parser("budget", help="energy budgets of a running server").add_subparsers(dest="budget_command", required=True)
    s = budget.add_parser("set", help="set the cluster's or a tenant's energy budget")
    s.add_argument("scope", help="'cluster' or a tenant name")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--energy-j", type=float, help="joules per window")
    g.add_argument("--average-power-w", type=float, help="average watts over the window")
    g.add_argument("--unlimited", action="store_true", help="remove the limit")
    s.add_argument("--window-s", type=float, help="window length in seconds (default 3600)")
    s.add_argument("--throttle-fraction", type=float, help="throttle to the cheapest expert past this share")
    s.add_argument("--actor", help="who makes the change (default user@host)")
    s.add_argument("--reason", help="why (recorded in the change log)")
    add_connection_args(s, operator=True)
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_budget_set)
    s = budget.add_parser("show", help="show budgets, use and recent changes")
    s.add_argument("scope", nargs="*", help="scopes (default: cluster and every tenant)")
    s.add_argument("--changes", type=int, default=10, help="recent changes to list")
    add_connection_args(s, operator=True)
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_budget_show)
