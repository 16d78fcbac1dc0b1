"""What benchmarks share: the CPU they were measured on (printed beside every number), and
starting a server as a process of its own."""

from __future__ import annotations

import platform
import re
import subprocess
import threading
import time


def cpu_model() -> str:
    """lscpu's "Model name" (the CPU varies between machines of the same kind), else the platform's guess."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    return name or platform.processor() or "unknown"


def start_server(cmd: list[str], env=None, timeout_s: float = 180.0) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` and wait for its "listening on 127.0.0.1:PORT" line; returns the process and
    that address. Its output is drained from then on, so it never blocks on a full pipe."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    raise SystemExit(f"{' '.join(cmd[:3])} did not start within {timeout_s:.0f} s")
