"""Who may call what, for both transports. The gRPC interceptor (``interceptors.py``) and the HTTP
middleware below ask :func:`authorize` and keep the caller's :class:`Principal` for the request:
the servicers read it with :func:`current_principal` to bind the tenant (``bind_tenant``) and to
record which operator changed a budget.

Access levels:

========================================  ==========================================
gRPC ``grpc.health.v1.Health/*``, HTTP    public (load balancers and orchestrators)
``/health``
gRPC ``wattserve.v1.Inference/*``, HTTP   a client key (its tenant) or an operator key
``/v1/*``, reflection, anything else
gRPC ``wattserve.v1.Admin/*``, HTTP       an operator key
``/metrics`` (unless auth.metrics_public)
========================================  ==========================================

Failures carry no detail: UNAUTHENTICATED / 401 for a missing, malformed or unknown key (the
same message for each), PERMISSION_DENIED / 403 for a client key on an operator method.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from typing import Literal

from aiohttp import web

from wattserve.errors import InvalidRequest, PermissionDenied, WattserveError

from ..security.keys import ANONYMOUS, KeyStore, Principal

Access = Literal["public", "client", "operator"]

#: where the HTTP middleware keeps the caller for the handlers
PRINCIPAL_KEY = web.RequestKey("principal", Principal)
_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("wattserve_principal", default=ANONYMOUS)

PUBLIC_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)
OPERATOR_GRPC_PREFIXES = ("/wattserve.v1.Admin/",)
PUBLIC_HTTP_PATHS = frozenset({"/health"})
OPERATOR_HTTP_PATHS = frozenset({"/metrics"})  # the HTTP admin routes


def current_principal() -> Principal:
    """The caller of the request being served (ANONYMOUS when auth is off)."""
    return _PRINCIPAL.get()


def set_principal(principal: Principal) -> None:
    _PRINCIPAL.set(principal)


def grpc_access(method: str) -> Access:
    if method.startswith(PUBLIC_GRPC_PREFIXES):
        return "public"
    if method.startswith(OPERATOR_GRPC_PREFIXES):
        return "operator"
    return "client"


def http_access(path: str, metrics_public: bool) -> Access:
    if path in PUBLIC_HTTP_PATHS or (metrics_public and path == "/metrics"):
        return "public"
    if path in OPERATOR_HTTP_PATHS:
        return "operator"
    return "client"


def authorize(keys: KeyStore | None, access: Access, authorization: str | None) -> Principal:
    """The caller's principal if it may use a route of ``access``; raises Unauthenticated or
    PermissionDenied. Without keys (auth off) everyone is ANONYMOUS and allowed."""
    if keys is None or access == "public":
        return ANONYMOUS
    principal = keys.authenticate(authorization)
    if access == "operator" and not principal.is_operator:
        raise PermissionDenied("this method needs an operator key")
    return principal


def metadata_size(pairs: Iterable[tuple[str, str | bytes]]) -> int:
    """Bytes of request metadata as HTTP/2 counts them roughly: names plus values."""
    return sum(len(k) + len(v) for k, v in pairs)


def check_metadata_size(pairs: Iterable[tuple[str, str | bytes]], limit: int) -> None:
    size = metadata_size(pairs)
    if size > limit:
        raise InvalidRequest(f"request metadata is {size} bytes; this server accepts at most {limit}")


def http_auth_middleware(keys: KeyStore | None, metrics_public: bool, on_error):
    """aiohttp middleware: authorize by path, keep the principal in ``request[PRINCIPAL_KEY]`` (and
    the context variable), answer failures through ``on_error(exc, request)`` (the OpenAI-shaped
    body)."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        try:
            principal = authorize(keys, http_access(request.path, metrics_public), request.headers.get("Authorization"))
        except WattserveError as exc:  # Unauthenticated, PermissionDenied
            return on_error(exc, request)
        request[PRINCIPAL_KEY] = principal
        set_principal(principal)
        return await handler(request)

    return middleware
