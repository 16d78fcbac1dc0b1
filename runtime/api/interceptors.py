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
from collections.abc import Callable

import grpc
from grpc import aio

from wattserve.errors import InvalidRequest, RequestTooLarge, WattserveError

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
        "code": _ERROR_CODES.get(type(exc).__name__, "model_not_found" if status == 404 else exc.grpc_code.lower()),
    }
    return status, {"error": body}, headers


#: OpenAI-style ``code`` values where the gRPC code name would be vague
_ERROR_CODES = {"BudgetInfeasible": "budget_infeasible", "BudgetExhausted": "budget_exhausted",
                "RequestTooLarge": "request_too_large"}


def _decoder(deserializer, method: str, max_message_bytes: int | None = None):
    """Parse request bytes in the handler, where a malformed body becomes INVALID_ARGUMENT (gRPC
    would answer UNKNOWN with a Python class name if its own deserializer failed), and so does a
    message over ``gateway.max_message_bytes``: the transport's own limit sits above it
    (``server.py``), so the caller learns which limit it crossed instead of a RESOURCE_EXHAUSTED
    that reads as "retry later"."""
    if deserializer is None:
        return lambda raw: raw

    def decode(raw):
        if max_message_bytes is not None and len(raw) > max_message_bytes:
            raise RequestTooLarge(
                f"the request message is {len(raw)} bytes; this server accepts at most {max_message_bytes} "
                "(gateway.max_message_bytes; a prompt at most gateway.max_prompt_bytes)", param="prompt")
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends: the bytes are not this message
            if "UTF-8" in str(exc):  # upb: "String field had bad UTF-8"
                raise InvalidRequest(f"a string field of the {method} request is not valid UTF-8: protobuf "
                                     "strings (prompt, messages, stop, ...) must be UTF-8 text") from None
            raise InvalidRequest(f"the request is not a valid protobuf message for {method}") from None

    return decode


async def _decoded(request_iterator, decode):
    async for raw in request_iterator:
        yield decode(raw)


def _checked(guard, decode, request, streaming_request: bool, refused):
    """The credential check and the decoded request; a refusal here (before any servicer code)
    is reported to ``refused`` so that operators see it in the request counters."""
    try:
        guard()
        return _decoded(request, decode) if streaming_request else decode(request)
    except WattserveError as exc:
        if refused is not None:
            refused(exc)
        raise


def _wrap_unary(behavior, method: str, guard, decode, streaming_request: bool = False, refused=None):
    async def handler(request, context):
        try:
            request = _checked(guard, decode, request, streaming_request, refused)
            return await behavior(request, context)
        except (WattserveError, Exception) as exc:  # noqa: BLE001
            if isinstance(exc, aio.AbortError):
                raise
            await _abort(context, exc, method)

    return handler


def _wrap_stream(behavior, method: str, guard, decode, streaming_request: bool = False, refused=None):
    if not inspect.isasyncgenfunction(behavior):  # writes with context.write() instead of yielding
        return _wrap_unary(behavior, method, guard, decode, streaming_request, refused)

    async def handler(request, context):
        try:
            request = _checked(guard, decode, request, streaming_request, refused)
            async for item in behavior(request, context):
                yield item
        except (WattserveError, Exception) as exc:  # noqa: BLE001
            if isinstance(exc, aio.AbortError):
                raise
            await _abort(context, exc, method)

    return handler


class ErrorInterceptor(aio.ServerInterceptor):
    """Checks metadata size and credentials, then maps the handler's domain errors to codes.

    ``keys`` None: auth is off (every caller is anonymous). ``max_metadata_bytes`` and
    ``max_message_bytes`` None: no check beyond gRPC's own transport limits. ``on_refused(method,
    exc)`` hears of every call refused before its servicer ran (bad credentials, a message that
    is too large or not the method's protobuf message), for the request counters.
    """

    def __init__(self, keys: KeyStore | None = None, max_metadata_bytes: int | None = None,
                 max_message_bytes: int | None = None,
                 on_refused: Callable[[str, WattserveError], None] | None = None) -> None:
        self.keys = keys
        self.max_metadata_bytes = max_metadata_bytes
        self.max_message_bytes = max_message_bytes
        self.on_refused = on_refused

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
        decode = _decoder(handler.request_deserializer, method, self.max_message_bytes)
        out = handler.response_serializer
        refused = None if self.on_refused is None else (lambda exc: self.on_refused(method, exc))
        # request_deserializer None: the handler gets bytes and decodes them itself, after the
        # credential check (an unauthenticated caller learns nothing about the body).
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, guard, decode, refused=refused), response_serializer=out)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, guard, decode, refused=refused), response_serializer=out)
        if handler.stream_stream:  # StreamImages (and reflection, which raises nothing of ours)
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, guard, decode, True, refused), response_serializer=out)
        return grpc.stream_unary_rpc_method_handler(  # client streaming: none of ours, guarded all the same
            _wrap_unary(handler.stream_unary, method, guard, decode, True, refused), response_serializer=out)
