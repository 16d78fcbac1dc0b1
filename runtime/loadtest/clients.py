"""Load-test clients: send one :class:`RequestSpec`, time every streamed chunk, return a
:class:`Record`. gRPC (``wattserve.v1.Inference/Generate``) or the OpenAI-compatible HTTP API
(``/v1/completions`` with SSE streaming and ``stream_options.include_usage``).

Timing is ``time.perf_counter`` in the client process: TTFT is send -> first chunk with text or
tokens, each inter-token latency is the gap between two such chunks (a chunk carries the tokens
that arrived together, as in vLLM's benchmark), E2E is send -> end of stream.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import aiohttp
import grpc

from ..api.gen import wattserve_pb2 as pb
from ..api.gen import wattserve_pb2_grpc as pb_grpc
from .workload import RequestSpec


@dataclass(slots=True)
class Record:
    """What happened to one request. Times in ms; ``sent_s`` and ``scheduled_s`` from run start."""

    index: int
    api: str
    scheduled_s: float | None
    sent_s: float
    status: str  # OK / a gRPC code name, or 200 / an HTTP status
    ok: bool
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    target_input_tokens: int = 0
    max_tokens: int = 0
    expert: str = ""
    energy_j: float | None = None
    energy_source: str = ""
    energy_budget_j: float | None = None
    latency_budget_ms: float | None = None
    priority: str = "normal"
    budget_met: bool | None = None  # None: the request had no budget
    error: str = ""

    @property
    def send_lag_ms(self) -> float | None:
        return None if self.scheduled_s is None else 1000.0 * (self.sent_s - self.scheduled_s)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["send_lag_ms"] = self.send_lag_ms
        return out


class _Timer:
    """Chunk arrival times of one stream."""

    __slots__ = ("t0", "first", "last", "itl_ms")

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.itl_ms: list[float] = []

    def chunk(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.itl_ms.append(1000.0 * (now - self.last))
        self.last = now

    def fill(self, rec: Record) -> None:
        end = time.perf_counter()
        rec.ttft_ms = None if self.first is None else 1000.0 * (self.first - self.t0)
        rec.e2e_ms = 1000.0 * (end - self.t0)
        rec.itl_ms = self.itl_ms


def _new_record(spec: RequestSpec, api: str, started: float) -> Record:
    return Record(
        index=spec.index, api=api, scheduled_s=spec.send_at_s, sent_s=time.perf_counter() - started,
        status="", ok=False, target_input_tokens=spec.input_tokens, max_tokens=spec.max_tokens,
        energy_budget_j=spec.energy_budget_j, latency_budget_ms=spec.latency_budget_ms, priority=spec.priority,
    )


def judge_budget(rec: Record) -> None:
    """Set ``budget_met`` from the request's budgets and what it cost (E2E for latency)."""
    checks = []
    if rec.energy_budget_j is not None and rec.energy_j is not None:
        checks.append(rec.energy_j <= rec.energy_budget_j)
    if rec.latency_budget_ms is not None and rec.e2e_ms is not None:
        checks.append(rec.e2e_ms <= rec.latency_budget_ms)
    rec.budget_met = all(checks) if checks else None


class GrpcClient:
    api = "grpc"

    def __init__(self, target: str, *, tenant: str = "", temperature: float = 0.0, ignore_eos: bool = True,
                 timeout_s: float = 120.0, api_key: str | None = None) -> None:
        self.target = target
        self.api_key = api_key
        self.tenant = tenant
        self.sampling = pb.SamplingParams(temperature=temperature, ignore_eos=ignore_eos)
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub = None

    async def __aenter__(self):
        from ..cli.connect import open_aio_channel

        self._channel = open_aio_channel(self.target, self.api_key)
        self._stub = pb_grpc.InferenceStub(self._channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()

    async def send(self, spec: RequestSpec, started: float) -> Record:
        req = pb.GenerateRequest(
            prompt=spec.prompt, max_tokens=spec.max_tokens, sampling=self.sampling, expert=spec.expert,
            priority=pb.Priority.Value(f"PRIORITY_{spec.priority.upper()}"), tenant=self.tenant,
        )
        if spec.energy_budget_j is not None:
            req.energy_budget_j = spec.energy_budget_j
        if spec.latency_budget_ms is not None:
            req.latency_budget_ms = spec.latency_budget_ms
        rec = _new_record(spec, self.api, started)
        timer = _Timer()
        streamed = 0
        try:
            async for msg in self._stub.Generate(req, timeout=self.timeout_s):
                if msg.HasField("chunk"):
                    timer.chunk()
                    streamed += len(msg.chunk.token_ids)
                else:
                    u = msg.usage
                    rec.prompt_tokens, rec.completion_tokens = u.prompt_tokens, u.completion_tokens
                    rec.expert, rec.energy_j, rec.energy_source = u.expert, u.energy_j, u.energy_source
            rec.status, rec.ok = "OK", True
        except grpc.aio.AioRpcError as exc:
            rec.status, rec.error = exc.code().name, (exc.details() or "")[:300]
            rec.completion_tokens = streamed
        timer.fill(rec)
        if rec.ok:
            judge_budget(rec)
        return rec


class OpenAIClient:
    api = "openai"

    def __init__(self, base_url: str, *, tenant: str = "", temperature: float = 0.0, ignore_eos: bool = True,
                 timeout_s: float = 120.0, max_connections: int = 0, api_key: str | None = None) -> None:
        self.url = base_url.rstrip("/") + "/v1/completions"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.tenant = tenant
        self.temperature = temperature
        self.ignore_eos = ignore_eos
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self):
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.max_connections), timeout=self.timeout,
                                              headers=self.headers)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    def _body(self, spec: RequestSpec) -> dict:
        body = {
            "model": spec.expert or "auto", "prompt": spec.prompt, "max_tokens": spec.max_tokens,
            "temperature": self.temperature, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": self.ignore_eos, "priority": spec.priority,
        }
        for key in ("energy_budget_j", "latency_budget_ms"):
            if getattr(spec, key) is not None:
                body[key] = getattr(spec, key)
        if self.tenant:
            body["tenant"] = self.tenant
        return body

    async def send(self, spec: RequestSpec, started: float) -> Record:
        rec = _new_record(spec, self.api, started)
        timer = _Timer()
        try:
            async with self._session.post(self.url, json=self._body(spec)) as resp:
                rec.status = str(resp.status)
                if resp.status != 200:
                    rec.error = (await resp.text())[:300]
                else:
                    await self._read_events(resp, rec, timer)
        except (aiohttp.ClientError, TimeoutError) as exc:
            rec.status, rec.error = "connection_error" if isinstance(exc, aiohttp.ClientError) else "timeout", str(exc)[:300]
        timer.fill(rec)
        if rec.ok:
            judge_budget(rec)
        return rec

    async def _read_events(self, resp: aiohttp.ClientResponse, rec: Record, timer: _Timer) -> None:
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                rec.ok = rec.expert != ""
                return
            event = json.loads(data)
            if "error" in event:
                rec.status, rec.error = f"stream:{event['error'].get('code')}", event["error"].get("message", "")[:300]
                return
            if event.get("choices") and event["choices"][0].get("text"):
                timer.chunk()
            if "wattserve" in event:
                rec.expert = event["wattserve"]["expert"]
            usage = event.get("usage")
            if usage:
                rec.prompt_tokens, rec.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                rec.energy_j, rec.energy_source = usage.get("energy_joules"), usage.get("energy_source", "")
