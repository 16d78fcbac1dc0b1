"""Chaos and overload on loopback, small enough for a shared 2-core machine: counts, not timings
(``benchmarks/bench_chaos.py`` runs the same scenarios bigger and writes the report table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import chaos_lifecycle as lifecycle
from tests import chaos_scenarios as chaos

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]


async def test_killing_an_expert_during_a_burst(ray_session, tmp_path):
    c = await chaos.kill_expert_during_burst(tmp_path, requests=24, max_tokens=40, step_ms=20.0, kill_after_tokens=40)
    print(json.dumps(c.as_dict()))
    assert c.hung == 0 and c.lost_charges == 0
    assert c.refused == 0 and c.accepted == c.sent == 24
    # replica 0 was streaming to some: they end UNAVAILABLE with a clear message
    assert c.failed_clean >= 1 and set(c.statuses) <= {"OK", "UNAVAILABLE"}
    assert all("died while serving this request" in d for d in c.extra["failures"])
    # requests still queued on it (no token yet) were retried once on replica 1 and completed
    assert c.retried >= 1 and c.completed >= c.retried


async def test_restarting_the_gateway_mid_run_loses_no_charge(ray_session, tmp_path):
    c = await chaos.restart_gateway_mid_run(tmp_path, workers=4, restart_after=12, then=12)
    print(json.dumps(c.as_dict()))
    assert c.hung == 0 and c.lost_charges == 0
    assert c.extra["completed_before_restart"] >= 12 and c.extra["completed_after_restart"] >= 12
    assert c.refused + c.failed_clean == c.sent - c.completed  # the rest were refused or cut cleanly
    # the restored ledger holds every stored charge, and at least what the clients saw finish
    assert c.extra["ledger_used_j_after_restart"] == pytest.approx(c.extra["stored_j"], rel=1e-9)
    assert c.extra["stored_j"] >= c.extra["completed_j"] * (1 - 1e-9)


async def test_overload_refuses_fast_and_keeps_accepted_latency(ray_session, tmp_path):
    c = await chaos.overload(tmp_path, multiple=5.0, duration_s=3.0)
    print(json.dumps(c.as_dict()))
    x = c.extra
    assert c.hung == 0 and c.lost_charges == 0 and c.failed_clean == 0
    assert c.refused > 0 and c.completed > 0 and c.sent == c.completed + c.refused
    assert x["slo_violations"] == 0  # accepted requests keep the SLO (2 service times x 4)
    assert x["refusal_max_s"] < x["slo_s"]  # refusals come back at once, not after a timeout
    assert x["rss_growth_mb"] < 200  # bounded queues: memory does not grow with the offered load


async def test_cancellations_deadlines_and_dropped_streams_release_everything(ray_session, tiny_llama, tmp_path):
    c = await lifecycle.cancel_and_deadline_storm(tmp_path, tiny_llama, requests=40)
    print(json.dumps(c.as_dict()))
    x = c.extra
    assert c.hung == 0 and c.lost_charges == 0 and c.refused == 0
    assert set(c.statuses) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, c.statuses
    assert x["by_kind"]["complete"] == {"OK": 8}
    assert x["by_kind"]["deadline"].get("DEADLINE_EXCEEDED", 0) >= 6  # 400 tokens cannot finish in <= 0.5 s
    assert x["by_kind"]["cancel_after_token"] == {"CANCELLED": 8} and x["by_kind"]["http_drop"] == {"CANCELLED": 8}
    assert not any(x["held_after"].values()), x["held_after"]  # no admission, replica, queue slot held
    assert x["full_batch_after"] == {"OK": 8}  # every KV slot is usable again: a full batch per expert
    assert x["replicas_unchanged"]  # no actor died or restarted


async def test_a_flooding_tenant_does_not_starve_a_calm_one(ray_session, tmp_path):
    c = await lifecycle.two_tenant_overload(tmp_path, multiple=5.0, duration_s=3.0)
    print(json.dumps(c.as_dict()))
    x = c.extra
    assert c.hung == 0 and c.lost_charges == 0 and c.failed_clean == 0
    assert set(x["calm"]) == {"OK"} and x["calm"]["OK"] > 0  # fair admission: never refused
    assert x["flood"].get("RESOURCE_EXHAUSTED", 0) > 0 and x["flood"].get("OK", 0) > 0
    assert x["refused_by_rule"]["fair_share"] > 0 and x["refused_by_rule"]["server"] == 0


async def test_killing_the_power_governor_and_node_agent_under_load(ray_session, tmp_path):
    c = await lifecycle.power_plane_restart(tmp_path)
    print(json.dumps(c.as_dict()))
    x = c.extra
    assert c.hung == 0 and c.failed_clean == 0 and c.refused == 0 and c.completed > 0  # serving never stopped
    assert x["lp_capped_before"] and x["governor_restarted"] and x["governor_ticking"] and x["governor_capping_again"]
    assert x["agent_experts_after_restart"] == 2  # the restarted agent knows its experts again
    assert x["fresh_readings_and_capping_after_agent_restart"] and x["hp_never_capped"]


def test_losing_a_node_of_a_two_node_cluster(tmp_path):
    """In its own process: it needs a two-node Ray cluster of its own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    res = subprocess.run([sys.executable, "-m", "tests.chaos_scenarios", "node-loss", "--requests", "40",
                          "--tmp", str(tmp_path)], capture_output=True, text=True, timeout=280, cwd=ROOT, env=env)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("CHAOS-RESULT ")), None)
    assert line, f"no result (rc {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    c = json.loads(line.removeprefix("CHAOS-RESULT "))
    print(json.dumps(c))
    assert c["hung"] == 0 and c["lost_charges"] == 0 and c["sent"] == 40
    assert c["accepted"] == c["completed"] + c["failed_clean"] and c["refused"] == 0
    x = c["extra"]
    assert x["healthy_after"] == {"onhead/0": True, "onworker/0": False}
    assert x["completed_after_removal"] >= 1 and c["completed"] >= 30  # service continued on the head node
