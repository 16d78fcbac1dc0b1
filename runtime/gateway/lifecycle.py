"""One lifecycle for every call: admit -> record -> route -> dispatch -> release.

Generate, Score, cascades and image requests all enter through :meth:`Lifecycle.call`, which
refuses a request once the server drains, validates it, takes an admission slot, starts its
metrics record and its deadline, tracks it for the shutdown drain, and on every way out (finish,
error, client cancel, deadline, shutdown cut) counts it once and frees its slot once. What is left
to each call is what differs: how it is routed (:meth:`Call.route`) and what it does with the
replicas it is dispatched to (``generate.py``, ``cascade.py``, ``score.py``, ``images.py``).
Collaborators are passed in explicitly; nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from router.base import Plan
from wattserve.errors import WattserveError

from ..admission import Admission
from ..metrics import UNLISTED_TENANT_LABEL, ServingMetrics
from ..routing import RoutingService
from ..shutdown import StreamDrain
from ..validation import Validator
from .replicas import Replicas
from .request import Request


class Recorder(Protocol):
    """A call's metrics record: which expert served it, and how it ended (exactly once)."""

    def routed(self, expert: str) -> None: ...

    def failed(self, exc: BaseException) -> None: ...


@dataclass(slots=True)
class Counters:
    """What GetStatus reports of the requests this gateway has seen (every API, every kind)."""

    total: int = 0
    failed: int = 0  # refused or failed
    retried: int = 0  # re-dispatched after their first replica failed before any token


@dataclass(slots=True)
class Call:
    """One admitted request on its way through the gateway."""

    request: Request  # validated
    received_s: float
    deadline_s: float | None  # on the lifecycle's clock
    recorder: Recorder
    lifecycle: Lifecycle
    done: bool = False  # the caller got its answer: leaving afterwards is not a failure

    @property
    def clock(self) -> Callable[[], float]:
        return self.lifecycle.clock

    def elapsed_ms(self) -> float:
        return 1000.0 * (self.clock() - self.received_s)

    def time_left_ms(self) -> float | None:
        return None if self.deadline_s is None else 1000.0 * (self.deadline_s - self.clock())

    async def route(self) -> Plan:
        """The routing policy's plan over the replicas that serve this request's modality."""
        lc = self.lifecycle
        return await lc.routing.plan(self.request, lc.replicas.candidates(self.request.modality),
                                     time_left_ms=self.time_left_ms())


class Lifecycle:
    def __init__(self, *, validator: Validator, admission: Admission, drain: StreamDrain, routing: RoutingService,
                 replicas: Replicas, metrics: ServingMetrics, counters: Counters, clock: Callable[[], float],
                 tenants_listed: bool, retry_unstarted: bool = True) -> None:
        self.validator = validator
        self.admission = admission
        self.drain = drain
        self.routing = routing
        self.replicas = replicas
        self.metrics = metrics
        self.counters = counters
        self.clock = clock
        self.tenants_listed = tenants_listed
        self.retry_unstarted = retry_unstarted

    @contextlib.asynccontextmanager
    async def call(self, request: Request, recorder: Recorder | None = None) -> AsyncIterator[Call]:
        """Admit ``request`` and hold it for the body of the ``async with``; refusals raise here."""
        received = self.clock()
        rec = recorder or self.metrics.begin(request.api, self.clock)
        self.counters.total += 1
        try:
            self.drain.check_open()
            req = self.validator.check(request)
            ticket = self.admission.acquire(req.tenant)
        except WattserveError as exc:
            self.counters.failed += 1  # refused: failed, for GetStatus as for the metrics
            rec.failed(exc)
            raise
        deadline = None if req.timeout_s is None else received + req.timeout_s
        call = Call(req, received, deadline, rec, self)
        try:
            with self.drain.track(req.api):  # shutdown drains (or cuts, saying so) this call
                yield call
        except BaseException as exc:
            if not call.done:
                self.counters.failed += 1
                rec.failed(exc)
            raise
        finally:
            self.admission.release(ticket)

    def refused(self, api: str, exc: WattserveError) -> None:
        """Count a request an API refused before it reached the lifecycle (a body that is not JSON,
        an unknown field, a message too large): operators see it like any other failure."""
        self.counters.total += 1
        self.counters.failed += 1
        self.metrics.begin(api, self.clock).failed(exc)

    def tenant_label(self, tenant: str) -> str:
        """The metric label of ``tenant``: itself when tenants are configured (others are refused),
        else "default" or ``UNLISTED_TENANT_LABEL`` (any string is a tenant then: a label value per
        string would grow the series without bound)."""
        if self.tenants_listed or tenant == "default":
            return tenant
        return UNLISTED_TENANT_LABEL
