"""MoE² selector latency per request: branch and bound over maximal feasible sets vs exhaustive search.

For N in 4, 8, 16, 32 experts, random instances (values g_i q_i in [0, 1), energies 0.1-10 J,
latencies 5-500 ms, energy budget 10-60 % of the total, a latency budget admitting ~80 % of the
experts, 5 ms aggregation) are solved by ``select_subset``; the exhaustive reference runs where
2^N is tractable. Also timed: the whole ``MoE2.plan`` (gate output given, cost model over live
profiles, selection, plan) with one replica per expert. Prints p50/p99 in microseconds.

    .venv/bin/python benchmarks/bench_selector.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.base import Candidate, RequestFeatures, RouterSettings  # noqa: E402
from router.cost import CostModel  # noqa: E402
from router.gate import PriorGate  # noqa: E402
from router.moe2 import MoE2  # noqa: E402
from router.selector import Item, exhaustive_subset, select_subset  # noqa: E402
from wattserve.types import ExpertProfile  # noqa: E402


def instance(rng: random.Random, n: int):
    items = [Item(rng.random(), rng.uniform(0.1, 10.0), rng.uniform(5.0, 500.0)) for _ in range(n)]
    budget_j = sum(it.energy_j for it in items) * rng.uniform(0.1, 0.6)
    return items, budget_j, 400.0


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def time_calls(fn, args_list) -> list[float]:
    out = []
    for args in args_list:
        t0 = time.perf_counter_ns()
        fn(*args)
        out.append((time.perf_counter_ns() - t0) / 1000.0)
    return out


def plan_inputs(rng: random.Random, n: int):
    cands = []
    for i in range(n):
        prof = ExpertProfile(
            expert=f"e{i}", replica=0, model="m", engine="torch", device="d", energy_source="modeled:h100",
            priority_class="high", max_batch=8, max_queue=8, max_model_len=4096, params=1, healthy=True,
            running=rng.randint(0, 8), waiting=rng.randint(0, 4), prefill_ms_per_token=rng.uniform(0.01, 1),
            decode_ms_per_token=rng.uniform(5, 50), j_per_token=1.0, decode_ms_per_step_by_batch={1: 10.0, 8: 20.0},
            busy_power_w=rng.uniform(10, 700), sm_clock_mhz=1980.0, max_sm_clock_mhz=1980.0,
        )
        cands.append(Candidate(f"e{i}", 0, True, 0, prof))
    prior = {c.expert: rng.random() for c in cands}
    policy = MoE2(cost=CostModel(), settings=RouterSettings(quality_prior=prior, infeasible="serve_cheapest"))
    req = RequestFeatures(prompt_chars=400, max_tokens=64, gate=PriorGate(prior)(""), energy_budget_j=rng.uniform(0.5, 20),
                          latency_budget_ms=3000.0)
    return policy, req, cands


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    rng = random.Random(0)
    print(f"{'experts':>7} {'selector p50':>13} {'p99':>9} {'nodes p50':>10} {'exhaustive p50':>15} {'p99':>9} "
          f"{'speed-up p50':>12} {'MoE2.plan p50':>14} {'p99':>9}   (microseconds)")
    for n in (4, 8, 16, 32):
        cases = [instance(rng, n) for _ in range(args.requests)]
        calls = [(items, e, lat, 5.0) for items, e, lat in cases]
        fast = time_calls(select_subset, calls)
        nodes = statistics.median(select_subset(*c).nodes for c in calls[:500])
        slow = time_calls(exhaustive_subset, calls[: max(20, args.requests // (1 << max(0, n - 8)))]) if n <= 16 else []
        plans = [plan_inputs(rng, n) for _ in range(min(args.requests, 1000))]
        plan_t = time_calls(lambda p, r, c: p.plan(r, c), plans)
        ex = f"{pct(slow, 0.5):>15.1f} {pct(slow, 0.99):>9.1f} {pct(slow, 0.5) / pct(fast, 0.5):>11.0f}x" if slow else f"{'(2^32 sets)':>15} {'-':>9} {'-':>12}"
        print(f"{n:>7} {pct(fast, 0.5):>13.1f} {pct(fast, 0.99):>9.1f} {nodes:>10.0f} {ex} {pct(plan_t, 0.5):>14.1f} {pct(plan_t, 0.99):>9.1f}")
    print("goal: selector p99 <= 200 us at 8 experts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
