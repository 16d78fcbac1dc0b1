"""What operators see and change, as domain views: the Admin API, ``/v1/models``, ``/health`` and
the Prometheus collector read the gateway through this façade, never through its parts.

Views are plain frozen dataclasses taken from the last telemetry poll (``refresh`` polls now);
changes (energy budgets and prices) go to the routing service and come back as views.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.budget import BudgetChange, BudgetLimit, ScopeStatus
from router.cost import PredictionError
from wattserve.specs import ExpertSpec
from wattserve.types import ExpertProfile

from ..capacity.state import CapacityEvent, CapacityState, ExpertCapacityState
from ..config import WattserveConfig
from ..power.state import PowerState
from ..routing import RoutingService
from .lifecycle import Counters, Lifecycle
from .replicas import ReplicaClient, Replicas


@dataclass(slots=True, frozen=True)
class ReplicaView:
    expert: str
    index: int
    healthy: bool
    error: str
    inflight: int  # calls the gateway has in flight to it
    profile: ExpertProfile | None  # its last telemetry (None before the first answer)
    device: str  # the expert's device label (cpu, nvml:0, simulated:h100)
    gpu: bool  # whether its power is a GPU's (measured or a simulated GPU profile)


@dataclass(slots=True, frozen=True)
class ExpertView:
    spec: ExpertSpec
    replicas: tuple[ReplicaView, ...]
    prediction: PredictionError | None  # the cost model's error on its Generate requests so far
    score_prediction: PredictionError | None = None  # ... and on its Score requests (learnt apart)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def profile(self) -> ExpertProfile | None:
        """The first replica's telemetry: what the expert says about its model and device."""
        return next((r.profile for r in self.replicas if r.profile is not None), None)

    @property
    def healthy_replicas(self) -> int:
        return sum(r.healthy for r in self.replicas)


@dataclass(slots=True, frozen=True)
class StatusView:
    uptime_s: float
    routing_policy: str
    gate: str
    inflight: int
    max_inflight: int
    healthy_replicas: int
    total_replicas: int
    requests_total: int
    requests_failed: int
    requests_retried: int
    requests_energy_j: float  # device energy attributed to requests, summed over replicas
    idle_energy_j: float
    energy_sources: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class BudgetView:
    status: ScopeStatus
    quality_per_j: float  # the scope's price of energy now
    price: str  # how that price is set


@dataclass(slots=True, frozen=True)
class CapacityView:
    enabled: bool  # whether the capacity controller runs
    experts: tuple[ExpertCapacityState, ...]  # copies, taken now
    events: tuple[CapacityEvent, ...]  # the last decisions, oldest first


class Admin:
    def __init__(self, config: WattserveConfig, replicas: Replicas, routing: RoutingService, lifecycle: Lifecycle,
                 counters: Counters, power: PowerState, clock: Callable[[], float]) -> None:
        self.config = config
        self._replicas = replicas
        self._routing = routing
        self._lifecycle = lifecycle
        self._counters = counters
        self.power = power  # filled by the power governor
        self.capacity = CapacityState()  # filled by the capacity controller
        self._clock = clock
        self._started_s = clock()

    async def refresh(self) -> None:
        """Poll every replica now (operators see the state now, not the last poll)."""
        await self._replicas.poll_once()

    # -- replicas and experts -------------------------------------------------------------------
    def replicas(self) -> list[ReplicaView]:
        out = []
        for s in self._replicas.states():
            spec = self.config.expert(s.client.expert)
            out.append(ReplicaView(
                expert=s.client.expert, index=s.client.index, healthy=s.healthy and not s.removing, error=s.error,
                inflight=s.inflight, profile=s.profile, device=spec.device.label if spec else "unknown",
                gpu=spec is not None and spec.device.is_gpu,
            ))
        return out

    def experts(self, modality: str | None = None) -> list[ExpertView]:
        views = self.replicas()
        errors, score_errors = self.prediction_errors(), self.prediction_errors(prefill_only=True)
        return [
            ExpertView(spec, tuple(v for v in views if v.expert == spec.name), errors.get(spec.name),
                       score_errors.get(spec.name))
            for spec in self.config.experts if modality is None or spec.modality == modality
        ]

    def clients(self, engine: Sequence[str]) -> list[ReplicaClient]:
        """The replicas of experts whose engine is one of ``engine`` (e.g. to fetch vLLM's own metrics)."""
        kinds = {e.name for e in self.config.experts if e.engine.kind in engine}
        return [s.client for s in self._replicas.states() if s.client.expert in kinds]

    def healthy(self) -> bool:
        """Whether any replica can serve, or a scaled-to-zero expert can be woken to (the health
        endpoints' answer)."""
        return self._replicas.any_serving()

    def capacity_view(self, last_events: int = 50) -> CapacityView:
        """What the capacity controller wants and runs per expert, and its last decisions."""
        cap = self.capacity
        events = tuple(cap.events)[-last_events:] if last_events > 0 else ()
        return CapacityView(cap.enabled, tuple(dataclasses.replace(e) for e in cap.experts.values()), events)

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> StatusView:
        states = self._replicas.states()
        energies = [s.profile.energy for s in states if s.profile and s.profile.energy]
        c = self._counters
        return StatusView(
            uptime_s=self._clock() - self._started_s, routing_policy=self._routing.policy.name,
            gate=self._routing.gate.source, inflight=self._lifecycle.admission.inflight,
            max_inflight=self.config.gateway.max_inflight, healthy_replicas=sum(s.healthy for s in states),
            total_replicas=len(states), requests_total=c.total, requests_failed=c.failed,
            requests_retried=c.retried, requests_energy_j=sum(e.requests_j for e in energies),
            idle_energy_j=sum(e.idle_j for e in energies),
            energy_sources=tuple(sorted({e.energy_source for e in energies})),
        )

    def tenant_label(self, tenant: str) -> str:
        return self._lifecycle.tenant_label(tenant)

    def prediction_errors(self, prefill_only: bool = False) -> dict[str, PredictionError]:
        """The cost model's accuracy per expert: Generate's, or Score's prefill-only work's."""
        return dict(self._routing.cost.errors_for(prefill_only))

    # -- energy budgets and prices --------------------------------------------------------------
    def budgets(self, scopes: Sequence[str] = ()) -> list[BudgetView]:
        return [self._view(st) for st in self._routing.budget_status(list(scopes))]

    def budget_changes(self, last: int) -> list[BudgetChange]:
        return list(self._routing.ledger.changes)[-last:] if last > 0 else []

    def set_budget(self, scope: str, energy_j: float | None, *, window_s: float = 3600.0,
                   throttle_fraction: float | None = None, actor: str = "", peer: str = "",
                   reason: str = "") -> tuple[BudgetView, BudgetChange]:
        """Limit ``scope`` ("cluster" or a tenant) to ``energy_j`` per ``window_s`` (None: unlimited);
        the throttle fraction defaults to ``router.throttle_fraction``."""
        limit = None if energy_j is None else BudgetLimit(
            energy_j, window_s, throttle_fraction or self.config.router.throttle_fraction)
        change = self._routing.set_budget(scope, limit, actor=actor, peer=peer, reason=reason)
        (status,) = self._routing.budget_status([change.scope])
        return self._view(status), change

    def set_price(self, scope: str, quality_per_j: float | str | None, *, actor: str = "", peer: str = "",
                  reason: str = "") -> tuple[BudgetView, str]:
        """Set ``scope``'s price of energy: a number, ``"auto"``, or None (a tenant inherits the
        cluster's). Returns the scope's budget view and how the price was set before."""
        old = self._routing.set_price(scope, quality_per_j, actor=actor, peer=peer, reason=reason)
        (status,) = self._routing.budget_status([self._routing.scope_of(scope)])
        return self._view(status), old

    def _view(self, status: ScopeStatus) -> BudgetView:
        lam, how = self._routing.price_of_scope(status.scope)
        return BudgetView(status, lam, how)
