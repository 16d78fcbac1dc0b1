"""``wattserve loadtest`` against a real server on loopback (gRPC and HTTP), synthetic experts and
a tiny model: trace replay at a high time scale, records vs summary, errors by code, plots,
progress output, and the CLI itself."""

from __future__ import annotations

import asyncio
import io
import json
import sys

import pytest

from runtime.api.server import WattserveServer
from runtime.config import parse_config
from runtime.loadtest import Bounds, LoadTestOptions, WorkloadSpec, run_loadtest
from runtime.loadtest.workload import shared_data_dir

pytestmark = pytest.mark.timeout(300)

needs_traces = pytest.mark.skipif(shared_data_dir() is None, reason="shared/data (Azure traces) is absent")


@pytest.fixture(scope="module")
async def server(ray_session, tiny_llama, tmp_path_factory):
    config = parse_config(
        {
            "auth": {"enabled": False},  # loopback test server: no keys
            "gateway": {"port": 0, "max_inflight": 64, "health_interval_s": 0.2},
            "http": {"port": 0},
            "model_cache_dir": str(tmp_path_factory.mktemp("cache")),
            "experts": [
                {"name": "fast", "engine": {"kind": "synthetic", "step_ms": 1}, "max_batch": 16, "max_queue": 32},
                {"name": "tiny", "model": {"kind": "local", "path": str(tiny_llama)}, "engine": {"kind": "torch", "threads": 1},
                 "device": "simulated:h100", "max_batch": 8, "max_queue": 32, "max_model_len": 256},
            ],
        },
        "test-loadtest",
    )
    srv = WattserveServer(config, progress=lambda msg: None)
    await srv.start()
    yield srv
    await srv.stop()


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_traces
@pytest.mark.parametrize("api", ["grpc", "openai"])
async def test_trace_replay_writes_a_consistent_report(server, tmp_path, api):
    target = f"127.0.0.1:{server.port}" if api == "grpc" else f"http://127.0.0.1:{server.http_port}"
    progress = io.StringIO()
    opts = LoadTestOptions(
        api=api, target=target,
        # conv replayed 500x faster: ~2,700 requests/min of the trace's own arrival pattern
        workload=WorkloadSpec(arrival="trace", trace="conv", time_scale=0.002, max_input_tokens=48,
                              max_output_tokens=6, model_mix="fast=3,tiny=1,ghost=1", energy_budget_mix="none=1,0.001=1",
                              latency_budget_mix="none=1,60000=1", seed=7),
        bounds=Bounds(duration_s=30, max_requests=40, timeout_s=60),
        slos_ms={"e2el": 60000.0}, out_dir=tmp_path, metrics_interval_s=0.2,
    )
    report = await run_loadtest(opts, progress_stream=progress)
    s = report.summary
    records = _read_jsonl(tmp_path / "records.jsonl")
    csv_lines = (tmp_path / "records.csv").read_text().strip().splitlines()
    assert len(records) == s["num_prompts"] == 40 == len(csv_lines) - 1
    ok = [r for r in records if r["ok"]]
    assert s["completed"] == len(ok) > 0 and s["failed"] == 40 - len(ok)
    assert s["total_output_tokens"] == sum(r["completion_tokens"] for r in ok)
    # the unknown expert is refused with its API's code; nothing else fails
    ghost = "INVALID_ARGUMENT" if api == "grpc" else "404"
    assert set(s["errors_by_status"]) == {ghost} and s["errors_by_status"][ghost] == s["failed"]
    assert all(r["expert"] in ("fast", "tiny") and r["energy_j"] > 0 for r in ok)
    assert s["energy_sources"].keys() <= {"modeled:cpu", "modeled:h100"}
    assert s["total_energy_j"] == pytest.approx(sum(r["energy_j"] for r in ok))
    budgeted = [r for r in ok if r["energy_budget_j"] is not None]
    assert s["budget_violations"]["energy"] == sum(r["energy_j"] > 0.001 for r in budgeted)
    assert all(r["budget_met"] is (r["energy_j"] <= 0.001) for r in budgeted if r["latency_budget_ms"] is None)
    assert all(r["send_lag_ms"] is not None and r["scheduled_s"] >= 0 for r in records)
    assert s["request_goodput"] == pytest.approx(len(ok) / s["duration"])
    assert all(r["completion_tokens"] == r["max_tokens"] for r in ok)  # ignore_eos: the trace's lengths
    for name in ("latency_cdf.png", "timeline.png", "energy_hist.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 1000 or name == "summary.json"
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "summary.json").read_text())["completed"] == s["completed"]
    assert "sent=40" in progress.getvalue() and "failed=" in progress.getvalue()
    if api == "openai":
        assert s["power_samples"] > 0  # sampled from the same server's /metrics


async def test_closed_loop_keeps_the_concurrency_and_the_bounds(server, tmp_path):
    opts = LoadTestOptions(
        api="grpc", target=f"127.0.0.1:{server.port}",
        workload=WorkloadSpec(arrival="closed", input_tokens=8, output_tokens=20, model_mix="fast"),
        bounds=Bounds(duration_s=30, max_requests=30, max_concurrency=4), out_dir=None, progress=False,
    )
    report = await run_loadtest(opts)
    assert report.summary["completed"] == 30 and report.summary["failed"] == 0
    # never more than 4 in flight: each request's send is after the 4th-previous one finished
    recs = sorted(report.result.records, key=lambda r: r.sent_s)
    ends = sorted(r.sent_s + r.e2e_ms / 1000 for r in recs)
    for i, r in enumerate(recs[4:], start=4):
        assert r.sent_s >= ends[i - 4] - 1e-3


async def test_the_cli_runs_a_poisson_load_and_prints_progress(server, tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from runtime.cli import main; sys.exit(main())", "loadtest", "--target", f"127.0.0.1:{server.port}",
        "--arrival", "poisson", "--rate", "50", "--input-tokens", "16", "--output-tokens", "4", "--model", "fast",
        "--max-requests", "25", "--duration-s", "20", "--goodput", "ttft:10000", "--out", str(tmp_path),
        "--priority-mix", "high=1,low=1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "requests completed / failed      25 / 0" in out.decode()
    assert "sent=25" in err.decode() and "wrote" in err.decode()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["completed"] == 25 and summary["request_rate"] == 50.0
    assert {p.name for p in tmp_path.iterdir()} >= {"records.csv", "records.jsonl", "latency_cdf.png", "timeline.png", "energy_hist.png"}


async def test_a_remote_target_is_refused_without_allow_remote(tmp_path):
    from wattserve.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="--allow-remote"):
        await run_loadtest(LoadTestOptions(api="grpc", target="10.1.2.3:50051", progress=False))
