"""Small helpers the end-to-end tests share: reading a Generate stream, waiting for a condition."""

from __future__ import annotations

import asyncio
import time

from runtime.api.gen import wattserve_pb2 as pb


async def collect(stub, req, timeout=60):
    """Text, token ids and usage of one ``Inference.Generate`` call (checks nothing follows usage)."""
    text, ids, usage = "", [], None
    async for msg in stub.Generate(req, timeout=timeout):
        if msg.HasField("chunk"):
            assert usage is None, "no chunk may follow the usage message"
            text += msg.chunk.text
            ids.extend(msg.chunk.token_ids)
        else:
            usage = msg.usage
    return text, ids, usage


async def wait_for(predicate, timeout_s=30.0) -> bool:
    """Poll the async ``predicate`` every 0.1 s until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return False


def start_serve_process(config_path, timeout_s: float = 150.0, env: dict[str, str] | None = None):
    """Start ``wattserve serve --config config_path`` as its own process (``env`` added to this
    process's environment) and read its output until it says it is ready. Returns (process, lines
    read, gRPC target, HTTP base URL or None); the caller stops the process. Asserts (with the
    output) when it did not come up in time."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    binary = Path(sys.executable).parent / "wattserve"
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(binary), "serve", "--config", str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    target = http = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
        target = target or (m.group(1) if m else None)
        m = re.search(r"HTTP .*: (http://127\.0\.0\.1:\d+)", line)
        http = http or (m.group(1) if m else None)
        if "Ctrl-C stops the server" in line:
            break
    if not target:
        proc.kill()
        proc.wait()
        raise AssertionError("server did not come up:\n" + "".join(lines))
    return proc, lines, target, http


def stop_process(proc, sig: int | None = None, timeout_s: float = 60.0) -> None:
    """Send ``sig`` (SIGTERM by default) to ``proc`` if it still runs, wait up to ``timeout_s`` for
    it to exit, then kill it."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if sig is None else sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def request(prompt="The capital of France is", max_tokens=16, expert="", **kw) -> pb.GenerateRequest:
    """A GenerateRequest that ignores EOS (so ``max_tokens`` is what comes back)."""
    sampling = pb.SamplingParams(ignore_eos=kw.pop("ignore_eos", True))
    return pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, expert=expert, sampling=sampling, **kw)
