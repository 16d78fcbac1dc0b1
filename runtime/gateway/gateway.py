"""The gateway: one object that wires the request lifecycle to its collaborators.

Transport-free: the APIs (``runtime/api/``) turn their messages into a
:class:`~runtime.gateway.request.Request` and call :meth:`Gateway.generate`, :meth:`Gateway.score`,
``gateway.images.stream`` / ``gateway.images.generate`` or :meth:`Gateway.feedback`; operators'
calls go through ``gateway.admin``. Nothing here knows Ray: the replicas come in as
:class:`~runtime.gateway.replicas.ReplicaClient`s (``runtime/cluster.py`` makes them over Ray
actors, tests make fakes).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from wattserve.errors import WattserveError

from ..admission import Admission
from ..config import WattserveConfig
from ..image_metrics import ImageMetrics
from ..metrics import ServingMetrics
from ..power.state import PowerState
from ..routing import PolicyFactory, RoutingService
from ..shutdown import StreamDrain
from ..validation import Validator
from .admin import Admin
from .generate import generate
from .images import Images
from .lifecycle import Counters, Lifecycle
from .replicas import ReplicaClient, Replicas
from .request import Chunk, Final, Request
from .score import ScoreOutcome, score


class Gateway:
    def __init__(self, config: WattserveConfig, clients: list[ReplicaClient], *, policy: PolicyFactory | None = None,
                 clock: Callable[[], float] = time.monotonic, on_health_change: Callable[[bool], None] | None = None,
                 metrics: ServingMetrics | None = None, image_metrics: ImageMetrics | None = None) -> None:
        gw = config.gateway
        self.config = config
        self.clock = clock
        modality = {e.name: e.modality for e in config.experts}
        self.replicas = Replicas.of(clients, lambda e: modality.get(e, "text"), clock=clock,
                                    health_interval_s=gw.health_interval_s, health_timeout_s=gw.health_timeout_s,
                                    on_health_change=on_health_change)
        self.routing = RoutingService(config, clock=clock, policy=policy)
        self.metrics = metrics or ServingMetrics()
        self.counters = Counters()
        self.drain = StreamDrain(clock)  # shutdown: calls finish within the grace period or are cut
        self.lifecycle = Lifecycle(
            validator=Validator(config), admission=Admission.from_config(gw, config.tenants, clock), drain=self.drain,
            routing=self.routing, replicas=self.replicas, metrics=self.metrics, counters=self.counters, clock=clock,
            tenants_listed=bool(config.tenants), retry_unstarted=gw.retry_unstarted,
        )
        self.images = Images(self.lifecycle, image_metrics, max_stream_fps=gw.max_stream_fps,
                             stream_frame_burst=gw.stream_frame_burst)
        self.admin = Admin(config, self.replicas, self.routing, self.lifecycle, self.counters, PowerState(), clock)

    async def start(self) -> None:
        await self.routing.start()
        await self.replicas.start()

    async def stop(self) -> None:
        await self.replicas.stop()
        await self.routing.stop()

    def generate(self, request: Request) -> AsyncIterator[Chunk | Final]:
        """Serve one Generate request: text chunks, then one Final (``generate.py``)."""
        return generate(self.lifecycle, request)

    async def score(self, request: Request) -> ScoreOutcome:
        """Serve one Score request (``score.py``)."""
        return await score(self.lifecycle, request)

    async def feedback(self, request_id: str, score: float, tenant: str = ""):
        """A client's score in [0, 1] for a finished Generate request (``RoutingService.record_feedback``)."""
        return await self.routing.record_feedback(request_id, score, tenant)

    def refused(self, api: str, exc: WattserveError) -> None:
        """Count a request an API refused before it reached the lifecycle."""
        self.lifecycle.refused(api, exc)

    @property
    def inflight(self) -> int:
        """Calls (text, score and image) the gateway is serving now."""
        return self.lifecycle.admission.inflight
