"""Fuzzing the request surfaces with hypothesis: gRPC Generate, Score and StreamImages (typed
fields at extreme and malformed values, and raw bytes that are not protobuf at all) and the
OpenAI-compatible HTTP API (JSON of any shape, bytes that are not JSON, odd headers).

Every answer must be well formed: a valid stream / response, or an error with an expected status
and a message (never INTERNAL, UNKNOWN, HTTP 500, or an expert that died); the server and every
expert replica must be up and unchanged (same pids) afterwards.

The volume is fixed and derandomized (``EXAMPLES``: the same examples on every run, so the suite
stays well inside its time budget and a failure reproduces); ``WATTSERVE_FUZZ_SCALE=10`` runs ten
times as many for a deeper search.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import threading
import zlib
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.api.server import WattserveServer
from runtime.cli.connect import open_channel
from runtime.config import parse_config

pytestmark = pytest.mark.timeout(600)

SCALE = int(os.environ.get("WATTSERVE_FUZZ_SCALE", "1"))
EXAMPLES = {"generate": 250, "score": 100, "grpc_bytes": 100, "stream_images": 40,
            "http_completions": 200, "http_chat": 120, "http_bytes": 80}
TRIED: Counter = Counter()  # examples actually run, per surface (reported at the end)
ANSWERED: Counter = Counter()  # of those, answered with a valid result (not an error)
OUTCOMES: Counter = Counter()
ENV = "WATTSERVE_FUZZ_KEYS"
CLIENT_KEY, OPERATOR_KEY = "ws-fuzz-client-key-0123456789", "ws-fuzz-operator-key-0123456789"
GRPC_ALLOWED = {"INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}
HTTP_ALLOWED = {200, 400, 401, 403, 404, 412, 413, 429}


def fuzz_settings(surface: str):
    return settings(max_examples=EXAMPLES[surface] * SCALE, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])


class ServerThread:
    """The real server on its own event loop in a thread, so hypothesis drives it synchronously."""

    def __init__(self, config) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self.server = WattserveServer(config, progress=lambda m: None)

    def run(self, coro, timeout_s: float = 300.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def __enter__(self) -> WattserveServer:
        self.thread.start()
        self.run(self.server.start())
        return self.server

    def __exit__(self, *exc) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(ray_session, tiny_llama, tiny_diffusion_dir, tmp_path_factory):
    os.environ[ENV] = f"client fuzz {CLIENT_KEY};operator ops {OPERATOR_KEY}"
    config = parse_config({
        "gateway": {"port": 0, "health_interval_s": 0.5, "max_tokens_limit": 8, "max_prompt_bytes": 4096,
                    "max_score_choices": 8, "max_inflight": 64},
        "http": {"port": 0},
        "auth": {"keys_env": ENV},
        "model_cache_dir": str(tmp_path_factory.mktemp("cache")),
        "experts": [
            {"name": "syn", "engine": {"kind": "synthetic", "step_ms": 1, "max_model_len": 64}, "max_batch": 8},
            {"name": "tiny", "model": {"kind": "local", "path": str(tiny_llama)}, "engine": {"kind": "torch", "threads": 1},
             "max_batch": 4, "max_model_len": 128},
            {"name": "img", "model": {"kind": "local", "path": str(tiny_diffusion_dir)},
             "engine": {"kind": "diffusion", "threads": 1, "t_index_list": [20, 40], "max_sessions": 2,
                        "max_pixels": 4096, "max_frame_bytes": 65536}},
        ],
    })
    thread = ServerThread(config)
    try:
        with thread as srv:
            before = _replicas(srv)
            yield srv
            after = _replicas(srv)
            assert after == before, f"an expert replica died or restarted while fuzzing: {before} -> {after}"
    finally:
        os.environ.pop(ENV, None)


def _replicas(srv) -> dict:
    with open_channel(f"127.0.0.1:{srv.port}", OPERATOR_KEY) as ch:
        experts = pb_grpc.AdminStub(ch).ListExperts(pb.ListExpertsRequest(), timeout=60)
    return {(e.name, r.replica): (r.pid, r.healthy) for e in experts.experts for r in e.replicas}


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


# -- strategies ------------------------------------------------------------------------------------------
texts = st.one_of(st.text(max_size=40), st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
                  st.integers(4000, 5000).map(lambda n: "word " * (n // 5)), st.just(""))
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
doubles = st.floats(allow_nan=True, allow_infinity=True)
int32 = st.integers(-(2**31), 2**31 - 1)
names = st.one_of(st.just(""), st.sampled_from(["syn", "tiny", "img", "fuzz", "ops"]), st.text(max_size=80))
keys = st.sampled_from([CLIENT_KEY] * 6 + [OPERATOR_KEY, None, "Bearer", "ws-wrong-key-0123456789"])


# A valid request with 0-3 fields replaced by anything: most examples reach the engines, and
# each malformed field is tried against otherwise valid requests.
WILD = {
    "prompt": texts,
    "max_tokens": int32,
    "temperature": st.one_of(st.sampled_from([1e-38, 1e-6, 100.0, 101.0]), floats32),
    "top_p": st.one_of(st.sampled_from([0.0, 1e-7, 0.1]), floats32),
    "top_k": st.one_of(st.sampled_from([1, 50_000, 2**31 - 1]), int32),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.text(max_size=300), max_size=20),
    "expert": names,
    "priority": st.integers(-3, 8),
    "tenant": names,
    "request_id": st.text(max_size=200),
    "energy_budget_j": doubles,
    "latency_budget_ms": doubles,
    "compute_budget": doubles,
    "messages": st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "tool", ""]),
                                   content=texts), max_size=4),
}
SAMPLING = {"temperature", "top_p", "top_k", "seed", "stop"}
words = st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Z", "C")), min_size=1, max_size=8),
                 min_size=1, max_size=12).map(" ".join)


def _mutations(draw, fields: list[str]) -> list[str]:
    """Which fields to replace: none in half the examples, else one to three."""
    count = draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))
    return draw(st.lists(st.sampled_from(fields), min_size=count, max_size=count, unique=True))


@st.composite
def generate_requests(draw):
    fields = {"prompt": draw(words), "max_tokens": draw(st.integers(1, 8)), "expert": draw(st.sampled_from(["", "syn", "tiny"])),
              "temperature": draw(st.sampled_from([0.0, 0.7, 1.0])), "ignore_eos": draw(st.booleans())}
    for name in _mutations(draw, sorted(WILD)):
        fields[name] = draw(WILD[name])
    if "messages" in fields and draw(st.booleans()):
        fields["prompt"] = ""  # a chat, not a chat beside a prompt
    sampling = pb.SamplingParams(**{k: v for k, v in fields.items() if k in SAMPLING or k == "ignore_eos"})
    rest = {k: v for k, v in fields.items() if k not in SAMPLING and k != "ignore_eos"}
    return pb.GenerateRequest(sampling=sampling, **rest)


def _meta(key) -> tuple:
    if key is None:
        return ()
    return (("authorization", key if key == "Bearer" else f"Bearer {key}"),)


def _code(exc: grpc.RpcError) -> str:
    return exc.code().name


# -- gRPC --------------------------------------------------------------------------------------------------
@fuzz_settings("generate")
@given(req=generate_requests(), key=keys)
def test_fuzz_generate(channel, req, key):
    TRIED["generate"] += 1
    chunks, usage = 0, None
    try:
        for msg in pb_grpc.InferenceStub(channel).Generate(req, metadata=_meta(key), timeout=60):
            assert usage is None, "nothing may follow the usage message"
            if msg.HasField("chunk"):
                chunks += 1
            else:
                usage = msg.usage
    except grpc.RpcError as exc:
        assert _code(exc) in GRPC_ALLOWED and exc.details(), (_code(exc), exc.details())
        return
    assert usage is not None and usage.completion_tokens <= 8 and usage.energy_source
    ANSWERED["generate"] += 1


@fuzz_settings("score")
@given(prompt=st.one_of(words, words, words, texts),
       choices=st.one_of(st.lists(words, min_size=1, max_size=8), st.lists(words, min_size=1, max_size=8),
                         st.lists(texts, max_size=12)),
       expert=st.one_of(st.sampled_from(["", "syn", "tiny"] * 3), names), tenant=st.one_of(st.just(""), st.just(""), names),
       budget=st.one_of(st.none(), st.none(), st.none(), doubles), key=keys)
def test_fuzz_score(channel, prompt, choices, expert, tenant, budget, key):
    TRIED["score"] += 1
    req = pb.ScoreRequest(prompt=prompt, choices=choices, expert=expert, tenant=tenant)
    if budget is not None:
        req.energy_budget_j = budget
    try:
        resp = pb_grpc.InferenceStub(channel).Score(req, metadata=_meta(key), timeout=60)
    except grpc.RpcError as exc:
        assert _code(exc) in GRPC_ALLOWED and exc.details(), (_code(exc), exc.details())
        return
    assert len(resp.choice_probs) == len(choices) and 0 <= resp.best_choice < len(choices)
    assert abs(sum(resp.choice_probs) - 1.0) < 1e-6
    ANSWERED["score"] += 1


@fuzz_settings("grpc_bytes")
@given(method=st.sampled_from(["Generate", "Score", "GenerateImage"]), body=st.binary(max_size=400))
def test_fuzz_grpc_raw_bytes(channel, method, body):
    """Bytes that are mostly not a valid protobuf of the method's request type."""
    TRIED["grpc_bytes"] += 1
    path = f"/wattserve.v1.Inference/{method}"
    call = (channel.unary_stream if method == "Generate" else channel.unary_unary)(path)
    try:
        out = call(body, metadata=_meta(CLIENT_KEY), timeout=60)
        if method == "Generate":
            list(out)
    except grpc.RpcError as exc:
        assert _code(exc) in GRPC_ALLOWED and exc.details(), (_code(exc), exc.details())


@st.composite
def image_messages(draw):
    params = pb.ImageParams(prompt=draw(st.text(max_size=30)), width=draw(st.integers(-1, 80)),
                            height=draw(st.integers(-1, 80)), t_index_list=draw(st.lists(st.integers(-5, 60), max_size=4)),
                            cfg_type=draw(st.integers(-1, 6)), output_format=draw(st.integers(-1, 5)))
    cfg = pb.ImageStreamConfig(params=params, frame_buffer_size=draw(st.integers(-2, 20)), expert=draw(names))
    frames = draw(st.lists(st.builds(
        pb.Image, data=st.binary(max_size=2000), format=st.integers(-1, 5), width=st.integers(-2, 70),
        height=st.integers(-2, 70), channels=st.integers(-1, 5)), max_size=4))
    first = [] if draw(st.integers(0, 9)) == 0 else [pb.StreamImagesRequest(config=cfg)]
    return first + [pb.StreamImagesRequest(frame=f) for f in frames]


@fuzz_settings("stream_images")
@given(messages=image_messages())
def test_fuzz_stream_images(channel, messages):
    TRIED["stream_images"] += 1
    try:
        for _ in pb_grpc.InferenceStub(channel).StreamImages(iter(messages), metadata=_meta(CLIENT_KEY), timeout=60):
            pass
    except grpc.RpcError as exc:
        assert _code(exc) in GRPC_ALLOWED and exc.details(), (_code(exc), exc.details())


# -- HTTP --------------------------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=10)
field_values = st.one_of(json_values, st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=200))


HTTP_WILD = ["model", "max_tokens", "temperature", "top_p", "stream", "stop", "seed", "n", "energy_budget_j",
             "latency_budget_ms", "compute_budget", "deadline_ms", "priority", "tenant", "request_id", "top_k",
             "ignore_eos", "stream_options", "logprobs", "unknown_field"]


@st.composite
def completion_bodies(draw, chat: bool):
    """A valid body (streaming or not) with 0-3 fields set to any JSON value."""
    body = {"model": draw(st.sampled_from(["auto", "syn", "tiny"])), "max_tokens": draw(st.integers(1, 8)),
            "stream": draw(st.booleans())}
    if chat:
        valid = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                "content": words}), min_size=1, max_size=3)
        body["messages"] = draw(st.one_of(
            valid, valid, valid,
            st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "tool", ""]),
                                            "content": st.one_of(st.text(max_size=100), json_values)}), max_size=4),
            field_values))
    else:
        body["prompt"] = draw(st.one_of(words, words, words, words, st.lists(st.text(max_size=20), max_size=3), field_values))
    for name in _mutations(draw, HTTP_WILD):
        body[name] = draw(field_values)
    return body


header_values = st.dictionaries(st.sampled_from(["x-energy-budget-j", "x-latency-budget-ms", "x-compute-budget",
                                                 "x-deadline-ms", "x-priority", "x-tenant", "x-request-id"]), st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                                                                     max_size=40), max_size=3)
headers = st.one_of(st.just({}), st.just({}), header_values)  # most examples get past the headers to the engines


def _post(server, path: str, raw: bytes, extra: dict) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json",
                                                      "Authorization": f"Bearer {CLIENT_KEY}", **extra})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type", "")
    finally:
        conn.close()


def _check_http(status: int, data: bytes, content_type: str) -> None:
    assert status in HTTP_ALLOWED, (status, data[:300])
    OUTCOMES[f"http {status}" + ("" if status == 200 else f" {json.loads(data)['error']['message'][:50]}")] += 1
    if status != 200:
        err = json.loads(data)["error"]
        assert isinstance(err["message"], str) and err["message"]
        return
    if content_type.startswith("text/event-stream"):
        events = [ln[6:] for ln in data.decode().splitlines() if ln.startswith("data: ")]
        assert events and events[-1] == "[DONE]"
        assert all("error" not in json.loads(e) for e in events[:-1]), events
    else:
        assert json.loads(data)["choices"]
    ANSWERED["http"] += 1


@fuzz_settings("http_completions")
@given(body=completion_bodies(chat=False), extra=headers)
def test_fuzz_http_completions(server, body, extra):
    TRIED["http_completions"] += 1
    _check_http(*_post(server, "/v1/completions", json.dumps(body).encode(), extra))


@fuzz_settings("http_chat")
@given(body=completion_bodies(chat=True), extra=headers)
def test_fuzz_http_chat(server, body, extra):
    TRIED["http_chat"] += 1
    _check_http(*_post(server, "/v1/chat/completions", json.dumps(body).encode(), extra))


@fuzz_settings("http_bytes")
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), raw=st.binary(max_size=500))
def test_fuzz_http_raw_bytes(server, path, raw):
    TRIED["http_bytes"] += 1
    _check_http(*_post(server, path, raw, {}))


@pytest.mark.parametrize("encoding, raw, status", [
    ("gzip", gzip.compress(b'{"model": "syn", "prompt": "a b", "max_tokens": 2}'), 200),
    ("deflate", zlib.compress(b'{"model": "syn", "prompt": "a b", "max_tokens": 2}'), 200),
    ("gzip", b'{"model": "syn", "prompt": "a b"}', 400),  # says gzip, is not
    ("deflate", b"\x1f\x8b\x08\x00 not deflate", 400),
])
def test_http_body_in_a_content_encoding_it_is_not_in_is_400(server, encoding, raw, status, caplog):
    """A body the handler cannot decompress is the client's error, in words (it was a 500). A body
    so short that aiohttp's parser fails on it before any handler runs still gets aiohttp's own
    plain-text 400."""
    got, data, content_type = _post(server, "/v1/completions", raw, {"Content-Encoding": encoding})
    assert got == status, data[:300]
    _check_http(got, data, content_type)
    if status == 400:
        err = json.loads(data)["error"]
        assert f"Content-Encoding: {encoding}" in err["message"] and err["param"] == "body", err
    # nothing left for aiohttp to drain (and fail on) after the answer: no traceback in the log
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


# -- each configured limit, one by one (the fuzzer hits them at random; these name them) -------------------
def _invalid(call, *args, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        out = call(*args, metadata=_meta(CLIENT_KEY), timeout=60)
        if not hasattr(out, "DESCRIPTOR"):  # a stream: drain it
            list(out)
    assert _code(err.value) == "INVALID_ARGUMENT" and fragment in err.value.details(), err.value.details()


@pytest.mark.parametrize("req, fragment", [
    (pb.GenerateRequest(prompt="x" * 4097, expert="syn"), "at most 4096"),  # gateway.max_prompt_bytes
    (pb.GenerateRequest(prompt="x", max_tokens=9, expert="syn"), "limit of 8"),  # gateway.max_tokens_limit
    (pb.GenerateRequest(prompt="word " * 200, max_tokens=4, expert="tiny"), "128"),  # prompt tokens > max_model_len
])
def test_generate_limits(channel, req, fragment):
    _invalid(pb_grpc.InferenceStub(channel).Generate, req, fragment=fragment)


def test_score_choice_limit(channel):  # gateway.max_score_choices
    req = pb.ScoreRequest(prompt="pick", choices=[f"c{i}" for i in range(9)], expert="syn")
    _invalid(pb_grpc.InferenceStub(channel).Score, req, fragment="8")


def test_stream_images_size_and_rate_limits(channel):
    cfg = pb.StreamImagesRequest(config=pb.ImageStreamConfig(params=pb.ImageParams(prompt="a cat")))
    big = pb.StreamImagesRequest(config=pb.ImageStreamConfig(params=pb.ImageParams(prompt="a cat", width=80,
                                                                                    height=80)))  # > max_pixels
    frame = pb.Image(data=bytes(80 * 80 * 3), format=pb.IMAGE_FORMAT_RAW_RGB, width=80, height=80)
    _invalid(pb_grpc.InferenceStub(channel).StreamImages, iter([big, pb.StreamImagesRequest(frame=frame)]),
             fragment="4096")
    small = pb.Image(data=bytes(16 * 16 * 3), format=pb.IMAGE_FORMAT_RAW_RGB, width=16, height=16)
    flood = [cfg] + [pb.StreamImagesRequest(frame=small)] * 400  # all at once: far above 60 fps after a burst of 30
    _invalid(pb_grpc.InferenceStub(channel).StreamImages, iter(flood), fragment="faster than")


def test_fuzz_volume_and_server_still_serving(channel, server):
    """Last: report the volume, and the server answers a plain request after all of it."""
    print("fuzz examples tried:", dict(TRIED), "total", sum(TRIED.values()), "answered:", dict(ANSWERED))
    print(OUTCOMES.most_common(15))
    if len(TRIED) == len(EXAMPLES):  # the whole module ran (not a -k selection)
        assert all(TRIED[k] >= EXAMPLES[k] * SCALE for k in EXAMPLES), TRIED
    usage = list(pb_grpc.InferenceStub(channel).Generate(
        pb.GenerateRequest(prompt="a b c", max_tokens=3, expert="syn"), metadata=_meta(CLIENT_KEY), timeout=60))[-1].usage
    assert usage.completion_tokens == 3
