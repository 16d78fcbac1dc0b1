"""The OpenAI-compatible HTTP API, Prometheus ``/metrics`` and ``/health`` (aiohttp).

Runs on the same asyncio loop as the grpc.aio server and drives the same
:meth:`Gateway.generate` lifecycle: this module only moves bytes. Request bodies become a
:class:`~runtime.gateway.Request` in ``openai_protocol.py``; domain errors become OpenAI-style error bodies
in ``interceptors.http_error`` (the HTTP twin of the gRPC interceptor).

Streaming uses server-sent events (``data: {...}`` lines, ``data: [DONE]`` last). The first
item is awaited before the response starts, so validation, admission and routing errors still
get a proper status code; an error after that is sent as a ``data: {"error": ...}`` event. When
the client disconnects, aiohttp cancels the handler and the gateway aborts the work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from wattserve.errors import InvalidRequest, RequestTooLarge, WattserveError

from ..config import HttpConfig
from ..engine_metrics import engine_metrics_text
from ..gateway import Chunk, Final, Gateway
from ..security.config import AuthConfig, TlsConfig
from ..security.keys import ANONYMOUS, KeyStore, bind_tenant
from ..security.tls import server_ssl_context
from .auth import PRINCIPAL_KEY, check_metadata_size, http_auth_middleware
from .interceptors import http_error
from .openai_protocol import (
    AUTO_MODEL,
    ChatRequest,
    CompletionRequest,
    StreamFormatter,
    full_response,
    parse_body,
    to_request,
)

log = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error_response(exc: BaseException) -> web.Response:
    status, body, headers = http_error(exc)
    return web.json_response(body, status=status, headers=headers)


def _plain_error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status)


_CLOSE_AFTER = web.RequestKey("close_after", bool)  # the body was unreadable: end the connection


@web.middleware
async def _openai_errors(request: web.Request, handler):
    """aiohttp's own errors (unknown path, wrong method, body too large) in OpenAI's shape."""
    try:
        response = await handler(request)
        if request.get(_CLOSE_AFTER):
            response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"{exc.reason}: {request.method} {request.path}"
        if exc.status == 404:
            if f"/v1{request.path}" in _V1_PATHS:  # the commonest slip: a client base_url without /v1
                message += (f" (did you mean /v1{request.path}? an OpenAI client's base_url ends in /v1, "
                            "e.g. http://127.0.0.1:8000/v1)")
            message += f"; this server answers {_ENDPOINTS}"
        return _plain_error(exc.status, message)


_V1_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/feedback", "/v1/models")
_ENDPOINTS = ("POST /v1/completions, POST /v1/chat/completions, POST /v1/feedback, GET /v1/models, "
              "GET /v1/models/{model}, GET /metrics, GET /health")


class HttpApi:
    """The aiohttp application and its runner, bound to one gateway and one metrics registry."""

    def __init__(
        self, gateway: Gateway, registry: CollectorRegistry, config: HttpConfig, *, healthy: Callable[[], bool],
        keys: KeyStore | None = None, auth: AuthConfig | None = None, tls: TlsConfig | None = None,
    ) -> None:
        self.gateway = gateway
        self.registry = registry
        self.config = config
        self.healthy = healthy
        self.tls = tls or TlsConfig()
        self.created = int(time.time())
        self.port = 0
        self._runner: web.AppRunner | None = None
        metrics_public = auth.metrics_public if auth else False
        self.app = web.Application(
            client_max_size=config.max_body_bytes,
            middlewares=[http_auth_middleware(keys, metrics_public, self._auth_refused), self._header_limit,
                         _openai_errors],
        )
        self.app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.post("/v1/feedback", self.feedback),
                web.get("/v1/models", self.models),
                web.get("/v1/models/{model}", self.model),
                web.get("/metrics", self.metrics),
                web.get("/health", self.health),
            ]
        )

    async def start(self) -> int:
        """Listen on the configured address; returns the bound port."""
        # handler_cancellation: a client that disconnects cancels its handler, which aborts the
        # request on its expert (aiohttp otherwise lets the handler run to the end).
        # access_log None: no request lines (with their headers) in our logs. The parser's own
        # per-header limits sit at our metadata limit, so no header can make it allocate more.
        limit = self.gateway.config.gateway.max_metadata_bytes
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     max_line_size=limit, max_field_size=limit, max_headers=64)
        await self._runner.setup()
        ssl_context = server_ssl_context(self.tls) if self.tls.enabled else None
        site = web.TCPSite(self._runner, self.config.host, self.config.port, ssl_context=ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _refused(self, request: web.Request, exc: BaseException) -> web.Response:
        """The error response for a request refused before the gateway saw it; generation requests
        are counted (wattserve_requests_total, wattserve_refused_requests_total, GetStatus)."""
        if request.path in GENERATION_PATHS and isinstance(exc, WattserveError):
            self.gateway.refused("http", exc)
        return _error_response(exc)

    def _auth_refused(self, exc: BaseException, request: web.Request) -> web.Response:
        return self._refused(request, exc)

    @web.middleware
    async def _header_limit(self, request: web.Request, handler):
        try:
            check_metadata_size(request.raw_headers, self.gateway.config.gateway.max_metadata_bytes)
        except InvalidRequest as exc:
            return self._refused(request, exc)
        return await handler(request)

    # -- generation -------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CompletionRequest, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, ChatRequest, chat=True)

    async def _generate(self, request: web.Request, model: type, *, chat: bool) -> web.StreamResponse:
        try:
            body = await self._json(request)
            parsed = parse_body(model, body)
            creq = to_request(parsed, request.headers)
            creq = dataclasses.replace(creq, tenant=bind_tenant(request.get(PRINCIPAL_KEY, ANONYMOUS), creq.tenant))
        except Exception as exc:  # noqa: BLE001 - mapped to a status by http_error
            return self._refused(request, exc)
        async with contextlib.aclosing(self.gateway.generate(creq)) as items:
            try:
                first = await anext(items)
            except Exception as exc:  # noqa: BLE001 - before any byte is sent: a real status code
                return _error_response(exc)
            if parsed.stream:
                include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
                # vLLM names the serving model in every chunk: so do we, the expert that answers
                # (known from the first chunk; "auto" only if the stream ends before one)
                expert = first.expert if isinstance(first, (Chunk, Final)) and first.expert else creq.expert or AUTO_MODEL
                fmt = StreamFormatter(chat, creq.request_id, expert, include_usage)
                return await self._stream(request, first, items, fmt)
            return await self._collect(first, items, chat, creq.request_id)

    async def _json(self, request: web.Request) -> object:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise RequestTooLarge(f"request body is larger than this server's limit of {self.config.max_body_bytes} "
                                  "bytes (http.max_body_bytes)", param="body") from None
        except web.RequestPayloadError as exc:  # e.g. a Content-Encoding the bytes are not in
            # The rest of the body cannot be read either: end it here and close the connection after
            # the answer (aiohttp would otherwise drain it after the response, fail again and log a
            # traceback per such request).
            request.content.feed_eof()
            request[_CLOSE_AFTER] = True
            encoding = request.headers.get("Content-Encoding", "identity")
            raise InvalidRequest(f"the request body could not be read as sent (Content-Encoding: {encoding}): {exc}",
                                 param="body", reason="invalid_json") from None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}", reason="invalid_json") from None

    async def _collect(self, first, items, chat: bool, request_id: str) -> web.Response:
        parts: list[str] = []
        item = first
        try:
            while not isinstance(item, Final):
                parts.append(item.text)
                item = await anext(items)
        except Exception as exc:  # noqa: BLE001 - nothing sent yet
            return _error_response(exc)
        return web.json_response(full_response(chat, request_id, "".join(parts), item))

    async def _stream(self, request: web.Request, first, items, fmt: StreamFormatter) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await resp.prepare(request)
        item = first
        try:
            while True:
                if isinstance(item, Chunk):
                    if item.text:
                        await _send(resp, fmt.text(item.text))
                else:
                    for payload in fmt.final(item):
                        await _send(resp, payload)
                    break
                item = await anext(items)
        except (ConnectionResetError, ConnectionError):
            return resp  # the client left; leaving the `async with` aborts the request
        except Exception as exc:  # noqa: BLE001 - headers are out: report in-band, as OpenAI does
            _, body, _ = http_error(exc)
            await _send(resp, body)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # -- feedback (wattserve's own; the twin of gRPC Inference.Feedback) -------------------------------
    async def feedback(self, request: web.Request) -> web.Response:
        """``{"request_id": ..., "score": 0..1, "tenant"?: ...}`` -> the answering expert and its
        quality correction now. 400 bad score, 404 unknown id, 409 already scored."""
        try:
            body = await self._json(request)
            if not isinstance(body, dict) or set(body) - {"request_id", "score", "tenant"}:
                raise InvalidRequest('the body must be a JSON object {"request_id": str, "score": number in [0, 1], '
                                     '"tenant": optional str}')
            request_id, score, tenant = body.get("request_id"), body.get("score"), body.get("tenant") or ""
            if not isinstance(request_id, str) or not isinstance(tenant, str):
                raise InvalidRequest("request_id and tenant must be strings", param="request_id")
            if score is None:
                raise InvalidRequest("score is required: a number in [0, 1] (1: a good answer, 0: a wrong one)",
                                     param="score")
            tenant = bind_tenant(request.get(PRINCIPAL_KEY, ANONYMOUS), tenant)
            served, correction = await self.gateway.feedback(request_id, score, tenant)
        except Exception as exc:  # noqa: BLE001 - mapped to a status by http_error
            status, err, headers = http_error(exc)
            if status == 404:
                err["error"]["code"] = "request_not_found"
            elif status == 409:
                err["error"]["type"] = "invalid_request_error"
            return web.json_response(err, status=status, headers=headers)
        return web.json_response({"object": "feedback", "request_id": request_id, "expert": served.expert,
                                  "predicted_quality": served.predicted_quality, "quality_correction": correction})

    # -- models, metrics, health ------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_cards()})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        card = next((c for c in self._model_cards() if c["id"] == name), None)
        if card is None:
            known = ", ".join(c["id"] for c in self._model_cards())
            body = {"error": {"message": f"unknown model {name!r}; known: {known}", "type": "not_found_error",
                              "param": "model", "code": "model_not_found"}}
            return web.json_response(body, status=404)
        return web.json_response(card)

    def _model_cards(self) -> list[dict]:
        admin = self.gateway.admin
        policy = admin.status().routing_policy
        cards = [{"id": AUTO_MODEL, "object": "model", "created": self.created, "owned_by": "wattserve",
                  "wattserve": {"description": f"the router ({policy}) picks an expert per request"}}]
        for e in admin.experts("text"):  # image experts are served over gRPC (StreamImages, GenerateImage)
            spec, p = e.spec, e.profile
            cards.append({
                "id": spec.name, "object": "model", "created": self.created, "owned_by": "wattserve",
                "wattserve": {
                    "model": p.model if p else spec.model_label,
                    "engine": spec.engine.kind,
                    "device": spec.device.label,
                    "energy_source": p.energy_source if p else "",
                    "max_model_len": p.max_model_len if p else spec.max_model_len,
                    "replicas": len(e.replicas),
                    "healthy_replicas": e.healthy_replicas,
                },
            })
        return cards

    async def metrics(self, request: web.Request) -> web.Response:
        # wattserve's series, then the engines' own (vLLM's vllm:*, labelled by expert and replica)
        engines = await engine_metrics_text(self.gateway.admin)
        return web.Response(body=generate_latest(self.registry) + engines, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(self, request: web.Request) -> web.Response:
        st = self.gateway.admin.status()
        ok = self.healthy()
        body = {"status": "ok" if ok else "unavailable", "healthy_replicas": st.healthy_replicas,
                "total_replicas": st.total_replicas}
        return web.json_response(body, status=200 if ok else 503)


async def _send(resp: web.StreamResponse, payload: dict) -> None:
    await resp.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
