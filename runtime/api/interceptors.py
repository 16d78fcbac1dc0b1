"""The one place where domain errors become status codes: gRPC (the interceptor) and HTTP
(:func:`http_error`, used by the OpenAI-compatible API).

The interceptor is also where every call is checked before any servicer code runs: request
metadata size, then the caller's key (``auth.py``: UNAUTHENTICATED / PERMISSION_DENIED with no
detail). The caller's principal is kept in a context variable for the servicers.

Servicers raise ``wattserve.errors`` exceptions; this interceptor wraps every handler and aborts
the call with the exception's ``grpc_code`` and its message (which says what to fix). A
``retry_after_ms`` detail travels as trailing metadata ``retry-after-ms`` (HTTP: ``Retry-After``
in whole seconds and ``retry-after-ms``). Anything else is a bug: logged with its traceback,
answered INTERNAL (HTTP 500) without leaking internals.
"""

from __future__ import annotations

import inspect
import logging

import grpc
from grpc import aio

from wattserve.errors import InvalidRequest, WattserveError

from ..security.keys import KeyStore
from .auth import authorize, check_metadata_size, grpc_access, set_principal

log = logging.getLogger(__name__)


async def _abort(context: aio.ServicerContext, exc: BaseException, method: str):
    if isinstance(exc, WattserveError):
        code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
        trailers = ()
        if "retry_after_ms" in exc.details:
            trailers = (("retry-after-ms", str(int(exc.details["retry_after_ms"]))),)
        await context.abort(code, exc.message, trailing_metadata=trailers)
    log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see server logs")


#: OpenAI's error ``type`` for each HTTP status we answer with
_HTTP_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "request_cancelled",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def http_error(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, OpenAI-style error body, headers) for an exception raised while serving HTTP."""
    if not isinstance(exc, WattserveError):
        log.error("unexpected error serving HTTP", exc_info=exc)
        body = {"message": f"internal error ({type(exc).__name__}); see server logs", "type": "server_error",
                "param": None, "code": "internal"}
        return 500, {"error": body}, {}
    status = exc.http_status
    headers = {}
    if "retry_after_ms" in exc.details:
        retry_ms = int(exc.details["retry_after_ms"])
        headers = {"Retry-After": str(max(1, -(-retry_ms // 1000))), "retry-after-ms": str(retry_ms)}
    body = {
        "message": exc.message,
        "type": _HTTP_ERROR_TYPES.get(status, "server_error"),
        "param": exc.details.get("param"),
        "code": "model_not_found" if status == 404 else exc.grpc_code.lower(),
    }
    return status, {"error": body}, headers


def _decoder(deserializer, method: str):
    """Parse request bytes in the handler, where a malformed body becomes INVALID_ARGUMENT (gRPC
    would answer UNKNOWN with a Python class name if its own deserializer failed)."""
    if deserializer is None:
        return lambda raw: raw

    def decode(raw):
        try:
            return deserializer(raw)
        except Exception:  # noqa: BLE001 - DecodeError and friends: the bytes are not this message
            raise InvalidRequest(f"the request is not a valid protobuf message for {method}") from None

    return decode


async def _decoded(request_iterator, decode):
    async for raw in request_iterator:
        yield decode(raw)


def _wrap_unary(behavior, method: str, guard, decode, streaming_request: bool = False):
    async def handler(request, context):
        try:
            guard()
            request = _decoded(request, decode) if streaming_request else decode(request)
            return await behavior(request, context)
        except (WattserveError, Exception) as exc:  # noqa: BLE001
            if isinstance(exc, aio.AbortError):
                raise
            await _abort(context, exc, method)

    return handler


def _wrap_stream(behavior, method: str, guard, decode, streaming_request: bool = False):
    if not inspect.isasyncgenfunction(behavior):  # writes with context.write() instead of yielding
        return _wrap_unary(behavior, method, guard, decode, streaming_request)

    async def handler(request, context):
        try:
            guard()
            request = _decoded(request, decode) if streaming_request else decode(request)
            async for item in behavior(request, context):
                yield item
        except (WattserveError, Exception) as exc:  # noqa: BLE001
            if isinstance(exc, aio.AbortError):
                raise
            await _abort(context, exc, method)

    return handler


class ErrorInterceptor(aio.ServerInterceptor):
    """Checks metadata size and credentials, then maps the handler's domain errors to codes.

    ``keys`` None: auth is off (every caller is anonymous). ``max_metadata_bytes`` None: no
    check beyond gRPC's own transport limit.
    """

    def __init__(self, keys: KeyStore | None = None, max_metadata_bytes: int | None = None) -> None:
        self.keys = keys
        self.max_metadata_bytes = max_metadata_bytes

    def _guard(self, details):
        """What runs first inside every handler: raises InvalidRequest, Unauthenticated or
        PermissionDenied (mapped like any domain error), or records the caller."""
        metadata = tuple(details.invocation_metadata or ())
        access = grpc_access(details.method)

        def guard() -> None:
            if self.max_metadata_bytes is not None:
                check_metadata_size(metadata, self.max_metadata_bytes)
            header = next((v for k, v in metadata if k == "authorization"), None)
            if isinstance(header, bytes):
                header = header.decode("latin-1")
            set_principal(authorize(self.keys, access, header))

        return guard

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        guard = self._guard(handler_call_details)
        decode = _decoder(handler.request_deserializer, method)
        out = handler.response_serializer
        # request_deserializer None: the handler gets bytes and decodes them itself, after the
        # credential check (an unauthenticated caller learns nothing about the body).
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, guard, decode), response_serializer=out)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, guard, decode), response_serializer=out)
        if handler.stream_stream:  # StreamImages (and reflection, which raises nothing of ours)
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, guard, decode, True), response_serializer=out)
        return grpc.stream_unary_rpc_method_handler(  # client streaming: none of ours, guarded all the same
            _wrap_unary(handler.stream_unary, method, guard, decode, True), response_serializer=out)
