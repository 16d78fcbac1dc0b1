"""The command line as a user runs it: `wattserve serve` in its own process, then the client
commands against it, then Ctrl-C. Nothing may be left running."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from runtime.security.keys import digest_of
from tests.runtime.grpc_helpers import start_serve_process, stop_process

BIN = Path(sys.executable).parent / "wattserve"
pytestmark = pytest.mark.timeout(240)


def _ray_processes(server_pid: int) -> list[psutil.Process]:
    """The Ray head processes (GCS, raylet) under the serve process. Counting every raylet on the
    machine instead mistook other Ray instances (this session's, another run's) for ours."""
    try:
        under = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ours = []
    for p in under:
        with contextlib.suppress(psutil.Error):
            program = (p.cmdline() or [""])[0]
            if "raylet" in program or "gcs_server" in program:
                ours.append(p)
    return ours


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _new_key(role: str, name: str, keys_file: Path) -> str:
    """`wattserve auth new-key`: the key on stdout, its digest line appended to the keys file."""
    res = subprocess.run([str(BIN), "auth", "new-key", role, name, "--append", str(keys_file)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.fixture
def keys(tmp_path) -> dict[str, str]:
    keys_file = tmp_path / "keys.txt"
    out = {"client": _new_key("client", "default", keys_file), "operator": _new_key("operator", "ops", keys_file)}
    assert all(k not in keys_file.read_text() for k in out.values()), "the keys file holds digests only"
    return out


@pytest.fixture
def served(tmp_path, tiny_llama, keys):
    cfg = tmp_path / "cli.yaml"
    cfg.write_text(
        f"""
ray: {{num_cpus: 2, object_store_memory_mb: 96}}
gateway: {{port: 0}}
auth: {{keys_file: keys.txt}}
experts:
  - name: edge
    model: {{kind: local, path: "{tiny_llama}"}}
    engine: {{kind: torch, threads: 1}}
    max_model_len: 256
"""
    )
    proc, lines, target, _ = start_serve_process(cfg)
    ray_heads: list[psutil.Process] = []
    try:
        assert target, "server did not come up:\n" + "".join(lines)
        ray_heads = _ray_processes(proc.pid)
        assert ray_heads, "the serve process started no Ray head of its own"
        yield target, proc, lines
    finally:
        stop_process(proc, signal.SIGINT)
    assert not [p.pid for p in ray_heads if _alive(p)], "ray processes left behind"


def _cli(*args: str, key: str | None = None, operator_key: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WATTSERVE_API_KEY", "WATTSERVE_OPERATOR_KEY")}
    env.update({"WATTSERVE_API_KEY": key} if key else {})
    env.update({"WATTSERVE_OPERATOR_KEY": operator_key} if operator_key else {})
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=60, env=env)


def _wait_line(proc, lines: list[str], text: str) -> bool:
    """Read the server's output until a line holds ``text`` (False if it exits first)."""
    while True:
        line = proc.stdout.readline()
        if not line:
            return False
        lines.append(line)
        if text in line:
            return True


def test_serve_generate_status_and_ctrl_c(served, keys, tmp_path):
    target, proc, lines = served
    assert any("send a prompt" in line and "wattserve generate" in line for line in lines)
    gen = _cli("generate", "--target", target, "--max-tokens", "7", "Hello world", key=keys["client"])
    assert gen.returncode == 0, gen.stderr
    assert re.search(r"expert edge/0 \| \d+ prompt \+ \d+ completion tokens", gen.stderr)
    assert "energy" in gen.stderr and "(modeled:cpu)" in gen.stderr
    status = _cli("status", "--target", target, key=keys["client"], operator_key=keys["operator"])
    assert status.returncode == 0, status.stderr
    assert "replicas healthy 1/1" in status.stdout and "edge" in status.stdout
    bad = _cli("generate", "--target", target, "--expert", "nope", "x", key=keys["client"])
    assert bad.returncode == 1 and "INVALID_ARGUMENT: unknown expert 'nope'" in bad.stderr
    # without a key, or with a client key on an operator command: refused, and nothing leaks
    anon = _cli("generate", "--target", target, "x")
    assert anon.returncode == 1 and "UNAUTHENTICATED" in anon.stderr
    denied = _cli("status", "--target", target, "--api-key", keys["client"])
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    # the same process serves HTTP (a free port, since gRPC's is 0), sharing the gateway's metrics
    http = next(m.group(1) for line in lines if (m := re.search(r"(http://127\.0\.0\.1:\d+)", line)))
    scrape = urllib.request.Request(http + "/metrics", headers={"Authorization": f"Bearer {keys['operator']}"})
    with urllib.request.urlopen(scrape, timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'wattserve_requests_total{api="grpc",expert="edge",status="ok"} 1.0' in metrics
    assert 'wattserve_requests_total{api="grpc",expert="none",status="invalid_argument"} 1.0' in metrics
    # --system/--chat send a chat: the expert renders it with its template, a longer prompt
    chat = _cli("generate", "--target", target, "--max-tokens", "3", "--system", "Be brief.", "Hello world",
                key=keys["client"])
    assert chat.returncode == 0, chat.stderr
    prompt_tokens = [int(re.search(r"(\d+) prompt", out.stderr).group(1)) for out in (gen, chat)]
    assert prompt_tokens[1] > prompt_tokens[0] + 3
    # key rotation without a restart: a new client key replaces the old one on SIGHUP
    keys_file = tmp_path / "keys.txt"
    rotated = _new_key("client", "default", keys_file)
    keys_file.write_text("\n".join(line for line in keys_file.read_text().splitlines()
                                   if line.startswith("operator") or line.endswith(digest_of(rotated).hex())) + "\n")
    proc.send_signal(signal.SIGHUP)
    assert _wait_line(proc, lines, "API keys reloaded: 1 client, 1 operator")
    old = _cli("generate", "--target", target, "--max-tokens", "2", "x", key=keys["client"])
    assert old.returncode == 1 and "UNAUTHENTICATED" in old.stderr
    new = _cli("generate", "--target", target, "--max-tokens", "2", "x", key=rotated)
    assert new.returncode == 0, new.stderr
    keys_file.write_text("client default sha256:abc\n")  # malformed: nothing changes
    proc.send_signal(signal.SIGHUP)
    assert _wait_line(proc, lines, "API keys not reloaded, the old keys stay in force")
    assert _cli("generate", "--target", target, "--max-tokens", "2", "x", key=rotated).returncode == 0
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    log = "".join(lines) + proc.stdout.read()
    assert "WARNING: authentication" not in log and "WARNING: TLS" not in log  # loopback with keys
    assert all(k not in log for k in keys.values()), "an API key reached the server's output"


def test_bad_config_exits_with_a_message(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("experts: [{name: a, engine: synthetic, colour: red}]\n")
    res = subprocess.run([str(BIN), "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert f"{cfg}: experts.0.colour: unknown key" in res.stderr
