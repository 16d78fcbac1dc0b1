"""The one place where domain errors become gRPC status codes.

Servicers raise ``wattserve.errors`` exceptions; this interceptor wraps every handler and aborts
the call with the exception's ``grpc_code`` and its message (which says what to fix). A
``retry_after_ms`` detail travels as trailing metadata ``retry-after-ms``. Anything else is a bug:
logged with its traceback, answered INTERNAL without leaking internals.
"""

from __future__ import annotations

import inspect
import logging

import grpc
from grpc import aio

from wattserve.errors import WattserveError

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


def _wrap_unary(behavior, method: str):
    async def handler(request, context):
        try:
            return await behavior(request, context)
        except (WattserveError, Exception) as exc:  # noqa: BLE001
            if isinstance(exc, aio.AbortError):
                raise
            await _abort(context, exc, method)

    return handler


def _wrap_stream(behavior, method: str):
    if not inspect.isasyncgenfunction(behavior):  # writes with context.write() instead of yielding
        return _wrap_unary(behavior, method)

    async def handler(request, context):
        try:
            async for item in behavior(request, context):
                yield item
        except (WattserveError, Exception) as exc:  # noqa: BLE001
            if isinstance(exc, aio.AbortError):
                raise
            await _abort(context, exc, method)

    return handler


class ErrorInterceptor(aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # streaming-request methods (health Watch is server-streaming) pass through
