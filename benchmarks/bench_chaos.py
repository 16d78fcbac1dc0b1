"""The fault and overload scenarios of issue 9 at benchmark size, as the report table: requests
sent, accepted, completed, failed with a clean status, refused, hung (must be 0) and lost ledger
charges (must be 0) per scenario, plus the overload latencies and memory.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_chaos.py [--scale 2] [--out chaos.json]

The same scenarios run small in ``tests/runtime/test_chaos.py`` (``tests/chaos_scenarios.py``,
``tests/chaos_lifecycle.py``). Synthetic engines on simulated devices keep the energy modeled
and the timing of the burst reproducible; the node-loss scenario runs in a child process, since
it needs a two-node Ray cluster of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import chaos_lifecycle as lifecycle  # noqa: E402 - after the path is set
from tests import chaos_scenarios as chaos  # noqa: E402

COLUMNS = ["sent", "accepted", "completed", "failed_clean", "refused", "hung", "lost_charges", "retried"]


async def in_ray(tmp: Path, scale: int) -> list[dict]:
    import ray

    from tests.tiny_models import build_model

    ray.init(num_cpus=2, object_store_memory=96 * 1024 * 1024, _node_ip_address="127.0.0.1",
             include_dashboard=False, namespace="wattserve-bench-chaos", log_to_driver=False)
    try:
        model = build_model(tmp / "tiny-llama", "llama")
        runs = [
            ("burst", chaos.kill_expert_during_burst(tmp / "burst", requests=24 * scale, kill_after_tokens=40 * scale)),
            ("restart", chaos.restart_gateway_mid_run(tmp / "restart", restart_after=12 * scale, then=12 * scale)),
            ("storm", lifecycle.cancel_and_deadline_storm(tmp / "storm", model, requests=40 * scale)),
            ("power", lifecycle.power_plane_restart(tmp / "power")),
            ("overload", chaos.overload(tmp / "overload", multiple=5.0, duration_s=5.0 * scale)),
            ("tenants", lifecycle.two_tenant_overload(tmp / "tenants", multiple=5.0, duration_s=5.0 * scale)),
        ]
        out = []
        for name, coro in runs:
            (tmp / name).mkdir(parents=True, exist_ok=True)
            counts = await coro
            print(json.dumps(counts.as_dict()), flush=True)
            out.append(counts.as_dict())
        return out
    finally:
        ray.shutdown()


def node_loss(tmp: Path, scale: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "tests.chaos_scenarios", "node-loss", "--requests", str(40 * scale),
                          "--tmp", str(tmp)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("CHAOS-RESULT ")), None)
    if line is None:
        raise RuntimeError(f"node-loss gave no result (rc {res.returncode}): {res.stderr[-2000:]}")
    return json.loads(line.removeprefix("CHAOS-RESULT "))


def table(rows: list[dict]) -> str:
    lines = ["| scenario | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    lines += [f"| {r['scenario']} | " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, default=2, help="multiplies the request counts of the test sizes")
    p.add_argument("--out", default=None, help="also write every scenario's counts as JSON here")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="wattserve-bench-chaos-"))
    rows = asyncio.run(in_ray(tmp, args.scale))
    (tmp / "node").mkdir()
    rows.append(node_loss(tmp / "node", args.scale))
    print(table(rows))
    over = next(r for r in rows if r["scenario"].startswith("overload"))["extra"]
    print("overload: " + ", ".join(f"{k} {v:.3g}" for k, v in over.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["hung"] == 0 and r["lost_charges"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
