"""The command line as a user runs it: `wattserve serve` in its own process, then the client
commands against it, then Ctrl-C. Nothing may be left running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "wattserve"
pytestmark = pytest.mark.timeout(240)


def _ray_processes() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


@pytest.fixture
def served(tmp_path, tiny_llama):
    cfg = tmp_path / "cli.yaml"
    cfg.write_text(
        f"""
ray: {{num_cpus: 2, object_store_memory_mb: 96}}
gateway: {{port: 0}}
experts:
  - name: edge
    model: {{kind: local, path: "{tiny_llama}"}}
    engine: {{kind: torch, threads: 1}}
    max_model_len: 256
"""
    )
    before = _ray_processes()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(BIN), "serve", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, target = [], None
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
        target = target or (m.group(1) if m else None)
        if "Ctrl-C stops the server" in line:
            break
    try:
        assert target, "server did not come up:\n" + "".join(lines)
        yield target, proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert _ray_processes() <= before, "ray processes left behind"


def test_serve_generate_status_and_ctrl_c(served):
    target, proc, lines = served
    assert any("send a prompt" in line and "wattserve generate" in line for line in lines)
    gen = subprocess.run([str(BIN), "generate", "--target", target, "--max-tokens", "7", "Hello world"], capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    assert re.search(r"expert edge/0 \| \d+ prompt \+ \d+ completion tokens", gen.stderr)
    assert "energy" in gen.stderr and "(modeled:cpu)" in gen.stderr
    status = subprocess.run([str(BIN), "status", "--target", target], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "replicas healthy 1/1" in status.stdout and "edge" in status.stdout
    bad = subprocess.run([str(BIN), "generate", "--target", target, "--expert", "nope", "x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "INVALID_ARGUMENT: unknown expert 'nope'" in bad.stderr
    # the same process serves HTTP (a free port, since gRPC's is 0), sharing the gateway's metrics
    http = next(m.group(1) for line in lines if (m := re.search(r"(http://127\.0\.0\.1:\d+)", line)))
    with urllib.request.urlopen(http + "/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'wattserve_requests_total{api="grpc",expert="edge",status="ok"} 1.0' in metrics
    assert 'wattserve_requests_total{api="grpc",expert="none",status="invalid_argument"} 1.0' in metrics
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0


def test_bad_config_exits_with_a_message(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("experts: [{name: a, engine: synthetic, colour: red}]\n")
    res = subprocess.run([str(BIN), "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert f"{cfg}: experts.0.colour: unknown key" in res.stderr
