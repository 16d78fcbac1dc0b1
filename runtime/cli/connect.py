"""How every client command reaches a server: target, API key and TLS options in one place.

``add_connection_args`` adds ``--target``, ``--api-key`` and the ``--tls-*`` options to a
subcommand; ``channel(args)`` opens a gRPC channel that sends ``authorization: Bearer <key>`` on
every call. Keys come from ``--api-key`` or the environment (``WATTSERVE_API_KEY``; operator
commands first try ``WATTSERVE_OPERATOR_KEY``) so they need not appear in shell history.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc import aio

from ..security.tls import ClientTls

DEFAULT_TARGET = os.environ.get("WATTSERVE_TARGET", "127.0.0.1:50051")
API_KEY_ENV = "WATTSERVE_API_KEY"
OPERATOR_KEY_ENV = "WATTSERVE_OPERATOR_KEY"


def add_connection_args(parser, *, operator: bool = False) -> None:
    """``--target``, ``--api-key``, ``--tls``/``--tls-ca``/``--tls-cert``/``--tls-key``/``--tls-server-name``."""
    envs = f"${OPERATOR_KEY_ENV}, then ${API_KEY_ENV}" if operator else f"${API_KEY_ENV}"
    g = parser.add_argument_group("connection")
    g.add_argument("--target", default=DEFAULT_TARGET, help=f"server address (default {DEFAULT_TARGET}, env WATTSERVE_TARGET)")
    g.add_argument("--api-key", help=f"{'operator' if operator else 'client'} API key (default {envs}; none: auth off)")
    g.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs (implied by --tls-ca)")
    g.add_argument("--tls-ca", help="PEM CA bundle to trust for the server certificate")
    g.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    g.add_argument("--tls-key", help="PEM key of --tls-cert")
    g.add_argument("--tls-server-name", help="name to expect in the server certificate (default: the target host)")
    parser.set_defaults(_operator=operator)


def api_key(args) -> str | None:
    if getattr(args, "api_key", None):
        return args.api_key
    envs = (OPERATOR_KEY_ENV, API_KEY_ENV) if getattr(args, "_operator", False) else (API_KEY_ENV,)
    return next((os.environ[e] for e in envs if os.environ.get(e)), None)


def client_tls(args) -> ClientTls | None:
    if not (getattr(args, "tls", False) or getattr(args, "tls_ca", None) or getattr(args, "tls_cert", None)):
        return None
    return ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)


def metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


def channel(args):
    """A blocking gRPC channel to ``args.target`` with the key and TLS the arguments give."""
    return open_channel(args.target, api_key(args), client_tls(args))


def open_channel(target: str, key: str | None = None, tls: ClientTls | None = None) -> grpc.Channel:
    ch = grpc.secure_channel(target, tls.grpc_credentials(), tls.grpc_options()) if tls else grpc.insecure_channel(target)
    return grpc.intercept_channel(ch, _KeyInterceptor(key)) if key else ch


def open_aio_channel(target: str, key: str | None = None, tls: ClientTls | None = None, options=()) -> aio.Channel:
    """The asyncio twin of :func:`open_channel` (the load tester, tests)."""
    kinds = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    interceptors = [kind(key) for kind in kinds] if key else None
    opts = list(options) + (tls.grpc_options() if tls else [])
    if tls:
        return aio.secure_channel(target, tls.grpc_credentials(), opts, interceptors=interceptors)
    return aio.insecure_channel(target, opts, interceptors=interceptors)


def _with_key(details, key: str):
    """``details`` (a ClientCallDetails namedtuple) with the authorization header added."""
    pairs = [*(details.metadata or ()), *metadata(key)]
    # grpc.aio wants its own Metadata type (a plain list is dropped on streaming calls)
    meta = aio.Metadata(*pairs) if isinstance(details, aio.ClientCallDetails) else pairs
    return details._replace(metadata=meta)


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every call of a blocking channel."""

    def __init__(self, key: str) -> None:
        self._key = key

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_key(details, self._key), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_key(details, self._key), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_with_key(details, self._key), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_with_key(details, self._key), request_iterator)


class _AioKey:
    def __init__(self, key: str) -> None:
        self._key = key


# grpc.aio files an interceptor under the first interface it implements (an elif chain), so each
# kind of call needs its own class.
class _AioUnaryUnary(_AioKey, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_key(details, self._key), request)


class _AioUnaryStream(_AioKey, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_key(details, self._key), request)


class _AioStreamUnary(_AioKey, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_key(details, self._key), request_iterator)


class _AioStreamStream(_AioKey, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_key(details, self._key), request_iterator)


def admin_call(args, method: str, request):
    """One Admin RPC against ``--target``; None (after printing the status) when it fails."""
    from ..api.gen import wattserve_pb2_grpc as pb_grpc

    with channel(args) as ch:
        try:
            return getattr(pb_grpc.AdminStub(ch), method)(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return None
