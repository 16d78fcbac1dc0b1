"""Helpers the routing-service tests share: two candidate experts and a request."""

from __future__ import annotations

from router.base import Candidate
from runtime.gateway.request import Request
from tests.router.helpers import prof
from wattserve.types import Priority

CANDS = [Candidate("edge", 0, True, 0, prof("edge", power_w=10.0, step_ms=5.0)),
         Candidate("cloud", 0, True, 0, prof("cloud", power_w=400.0, step_ms=20.0))]


def req(**kw):
    return Request(**{"prompt": "add these numbers", "tenant": "acme", "priority": Priority.NORMAL, "max_tokens": 8, **kw})
