"""The gateway's side of routing: budgets, the gate and the cost model around a router policy.

``RoutingService`` owns the state the pure ``router/`` functions need across requests: the budget
ledger (tenants and cluster), the cost model's online corrections and the loaded gate. For each
request it checks the tenant's and the cluster's budgets (RESOURCE_EXHAUSTED when used up,
throttling near them), runs the gate off the event loop, and asks the policy for a plan; when a
request finishes it charges the measured energy and teaches the cost model. With ``ledger.path``
set, charges and operator limit changes also go to a SQLite file (``runtime/ledger_store.py``),
restored at start: budget use survives a gateway restart.

It also keeps what the router learns from use (docs/routing.md, sections 4 and 5): the **price of
energy** per tenant (``router/price.py``: fixed, or derived online from the cluster's and a
tenant's budget burn rate, which every charge feeds), and **feedback**: a bounded memory of which
expert answered each finished request (with the quality the gate predicted), so a client's score
for a request id corrects that expert's quality estimate (``router/feedback.py``), persisted in
the same SQLite file.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from router.base import Candidate, Plan, RequestFeatures, RouterSettings, estimate_tokens
from router.budget import CLUSTER, BudgetLedger, BudgetLimit, ScopeStatus, tenant_scope
from router.cost import CostModel
from router.ensemble import ENSEMBLE_FILE, EnsembleGains
from router.feedback import FeedbackSettings, QualityFeedback
from router.gate import GateOutput, load_gate
from router.policies import Policy, make_policy
from router.price import EnergyPrice, PriceSettings
from wattserve.errors import AlreadyRecorded, BudgetInfeasible, InvalidRequest, NotFound
from wattserve.types import evolve

from .config import WattserveConfig
from .ledger_store import LedgerStore
from .served import ServedRequest, ServedRequests

if TYPE_CHECKING:
    from .gateway.request import Request

log = logging.getLogger(__name__)

#: a policy class, or anything called like one: ``(rng=..., cost=..., settings=...) -> Policy``
PolicyFactory = Callable[..., Policy]


class RoutingService:
    def __init__(self, config: WattserveConfig, *, clock: Callable[[], float] = time.monotonic,
                 policy: PolicyFactory | None = None) -> None:
        """``policy`` (tests): builds the policy instead of ``gateway.routing_policy``; it is called
        with this service's ``rng``, ``cost`` and ``settings``, so a policy class itself will do."""
        r = config.router
        self.config = config
        self.clock = clock
        prior = {e.name: e.quality_prior for e in config.experts}
        self._configure_prices()
        self.settings = RouterSettings(
            infeasible=r.infeasible, aggregation_ms=r.aggregation_ms, quality_per_j=self.cluster_price.lam,
            strong=r.strong, weak=r.weak, threshold=r.threshold, quality_prior=prior,
            cascade_below_logprob=r.cascade_below_logprob, ensemble=self._ensemble(),
            replica_order=config.gateway.replica_order,
        )
        self.cost = CostModel(
            priors={name: p.prior() for name, p in r.cost_priors.items()},
            alpha=r.cost_ewma_alpha,
        )
        rng = random.Random(r.seed) if r.seed is not None else None
        build = policy or functools.partial(make_policy, config.gateway.routing_policy)
        self.policy = build(rng=rng, cost=self.cost, settings=self.settings)
        self.prior_gate = load_gate(None, prior)
        self.gate = load_gate(r.gate_path, prior, r.gate_outputs or None) if r.gate_path else self.prior_gate
        self.ledger = BudgetLedger()
        self._configure_budgets()
        self.store: LedgerStore | None = None
        if config.ledger.path:
            self.store = LedgerStore(config.ledger.path, retention_s=config.ledger.retention_s)
        f = r.feedback
        if self.store is not None:
            self.store.served_capacity, self.store.served_ttl_s = f.remember_requests, f.remember_s
        self.feedback = QualityFeedback(FeedbackSettings(f.prior_weight, f.max_weight, f.max_correction))
        self.served = ServedRequests(f.remember_requests, f.remember_s, clock=clock)

    def _ensemble(self) -> EnsembleGains | None:
        """What mixing experts adds in Score, measured on the gate's labels (``ensemble.json`` in
        the gate's directory, written by ``wattserve quality ensemble``); None: not measured."""
        r = self.config.router
        if not r.gate_path:
            return None
        path = Path(r.gate_path) / ENSEMBLE_FILE
        if not path.exists():
            return None
        names = {e.name: r.gate_outputs.get(e.name, e.name) for e in self.config.experts}
        gains = EnsembleGains.load(path).renamed(names)
        for m in gains.measures.values():
            log.info("Score: mixing %s adds %+.3f (+- %.3f) over %s alone, measured on %d items (%s)",
                     "+".join(m.experts), m.lift, m.lift_se, m.best, m.n, path)
        return gains

    def _configure_prices(self) -> None:
        """The cluster's price (fixed or auto) and the tenants' own (a fixed number, or an auto
        dual of the tenant's budget added to the cluster's)."""
        r = self.config.router
        p = r.price
        settings = PriceSettings(p.default_quality_per_j, p.step, p.max_quality_per_j, p.interval_s)
        fixed = None if r.quality_per_j == "auto" else float(r.quality_per_j)
        self.cluster_price = EnergyPrice(fixed, settings, clock=self.clock)
        # A tenant's dual starts at 0 and, without a tenant budget, stays there: the cluster's
        # default already prices energy for everyone.
        tenant_settings = PriceSettings(0.0, p.step, p.max_quality_per_j, p.interval_s)
        self.tenant_prices: dict[str, EnergyPrice | float] = {}
        for t in self.config.tenants:
            if t.quality_per_j == "auto":
                self.tenant_prices[t.name] = EnergyPrice(None, tenant_settings, clock=self.clock)
            elif t.quality_per_j is not None:
                self.tenant_prices[t.name] = float(t.quality_per_j)

    def price_for(self, tenant: str) -> float:
        """The price of energy (quality units per J) for a request of ``tenant`` now."""
        own = self.tenant_prices.get(tenant)
        if isinstance(own, float):
            return own
        lam = self.cluster_price.value(self._budget_w(CLUSTER))
        if own is not None:  # the tenant's budget dual adds to the cluster's (both constraints bind it)
            lam = min(lam + own.value(self._budget_w(tenant_scope(tenant))),
                      max(lam, self.config.router.price.max_quality_per_j))
        return lam

    def price_of_scope(self, scope: str) -> tuple[float, str]:
        """(price now, how it is set) for a ledger scope ("cluster" or "tenant:<name>"), for operators."""
        if scope == CLUSTER:
            return self.cluster_price.value(self._budget_w(CLUSTER)), self.cluster_price.describe()
        tenant = scope.removeprefix("tenant:")
        own = self.tenant_prices.get(tenant)
        how = ("fixed for the tenant" if isinstance(own, float) else
               f"cluster + tenant dual ({own.describe()})" if own is not None else "the cluster's")
        return self.price_for(tenant), how

    def set_price(self, name: str, value: float | str | None, *, actor: str, peer: str, reason: str) -> str:
        """An operator sets a scope's price live: a number, ``"auto"``, or None (a tenant inherits
        the cluster's). Returns how it was set before. Logged, not persisted (the config is)."""
        scope = self.scope_of(name)
        if isinstance(value, float) and not (value >= 0 and value != float("inf")):
            raise InvalidRequest(f"quality_per_j must be a finite number >= 0 (got {value})", param="quality_per_j")
        old = self.price_of_scope(scope)[1]
        p = self.config.router.price
        if scope == CLUSTER:
            if value is None:
                raise InvalidRequest("the cluster has no price to inherit: give a number or auto")
            settings = PriceSettings(p.default_quality_per_j, p.step, p.max_quality_per_j, p.interval_s)
            self.cluster_price = EnergyPrice(None if value == "auto" else value, settings, clock=self.clock)
        else:
            tenant = scope.removeprefix("tenant:")
            if value is None:
                self.tenant_prices.pop(tenant, None)
            elif value == "auto":
                settings = PriceSettings(0.0, p.step, p.max_quality_per_j, p.interval_s)
                self.tenant_prices[tenant] = EnergyPrice(None, settings, clock=self.clock)
            else:
                self.tenant_prices[tenant] = value
        log.info("price of energy of %s: %s -> %s (by %s from %s%s)", scope, old, self.price_of_scope(scope)[1],
                 actor or "anonymous", peer or "?", f": {reason}" if reason else "")
        return old

    def _budget_w(self, scope: str) -> float | None:
        limit = self.ledger.limit(scope)
        return None if limit is None else limit.energy_j / limit.window_s

    def _charge_prices(self, tenant: str, energy_j: float) -> None:
        self.cluster_price.charge(energy_j)
        own = self.tenant_prices.get(tenant)
        if isinstance(own, EnergyPrice):
            own.charge(energy_j)

    def _configure_budgets(self) -> None:
        r = self.config.router
        if r.cluster_budget is not None:
            cb = r.cluster_budget
            self.ledger.set_limit(CLUSTER, BudgetLimit(cb.joules, cb.window_s, r.throttle_fraction),
                                  actor="config", reason="router.cluster_budget")
        for t in self.config.tenants:
            if t.energy_budget_j is not None:
                self.ledger.set_limit(tenant_scope(t.name), BudgetLimit(t.energy_budget_j, t.budget_window_s, r.throttle_fraction),
                                      actor="config", reason=f"tenants.{t.name}.energy_budget_j")

    async def start(self) -> None:
        """Restore the durable ledger; load the sentence encoder now (seconds) rather than on the
        first request."""
        if self.store is not None and not self.store.is_open:
            self.store.open()
            self.ledger = BudgetLedger.restore(self.store.load(self.ledger.snapshot(), self.clock()))
            self.feedback.restore(self.store.load_feedback())
            self.served.restore(self.store.load_served(), self.store.wall_clock())
        elif self.config.tenants and any(t.energy_budget_j is not None for t in self.config.tenants):
            log.warning("tenant energy budgets are configured but ledger.path is not: their use resets "
                        "when the gateway restarts")
        if getattr(self.gate, "fitted", False) and self.policy.uses_gate:
            await asyncio.to_thread(self.gate, "warm-up")

    # -- per request ---------------------------------------------------------------------------
    async def plan(self, req: Request, candidates: Sequence[Candidate], *, time_left_ms: float | None = None) -> Plan:
        """Admit ``req`` (validated) against the tenant and cluster budgets, run the gate, ask the
        policy. ``time_left_ms``: what is left of the client's deadline, a latency budget too."""
        admission = self.ledger.admit(req.tenant, self.clock())
        prompt = req.text
        raw_gate = await self.gate_for(prompt)
        gate = self.feedback.apply(raw_gate, req.tenant)
        learning = bool(self.feedback.stats)  # explore only once clients send feedback
        features = RequestFeatures(
            prompt_chars=len(prompt),
            max_tokens=req.max_tokens,
            priority=req.priority,
            tenant=req.tenant,
            expert=req.expert or None,
            energy_budget_j=req.energy_budget_j,
            latency_budget_ms=req.latency_budget_ms,
            prompt_tokens=estimate_tokens(prompt),
            mode="score" if req.kind == "score" else "generate",
            choice_tokens=tuple(estimate_tokens(c) for c in req.choices),
            gate=gate,
            throttled=admission.throttled,
            throttle_reason=admission.reason,
            quality_per_j=self.price_for(req.tenant),
            explore_share=self.config.router.feedback.explore_share if learning else 0.0,
        )
        plan = self._plan(features, time_left_ms, candidates)
        return evolve(plan, predicted_quality=dict(raw_gate.quality))

    def _plan(self, features: RequestFeatures, deadline: float | None, candidates: Sequence[Candidate]) -> Plan:
        req = features
        if deadline is not None and (req.latency_budget_ms is None or deadline < req.latency_budget_ms):
            # A deadline is a latency budget too; when it alone cannot be met the request is still
            # served (the engine ends it at the deadline) rather than refused up front.
            try:
                return self.policy.plan(evolve(features, latency_budget_ms=max(deadline, 0.0)), candidates)
            except BudgetInfeasible:
                pass
        return self.policy.plan(features, candidates)

    async def gate_for(self, prompt: str) -> GateOutput:
        if not self.policy.uses_gate or self.gate is self.prior_gate:
            return self.prior_gate(prompt)
        # ~20 ms of CPU on a fitted gate: never on the event loop.
        return await asyncio.to_thread(self.gate, prompt)

    async def stop(self) -> None:
        """Write what is still pending and close the durable ledger."""
        if self.store is not None:
            await self.store.flush()
            self.store.close()

    async def flush(self) -> None:
        """Return once every charge made so far is durable (immediately without a store)."""
        if self.store is not None:
            await self.store.flush()

    def finish(self, plan: Plan, tenant: str, expert: str, replica: int, *, prompt_tokens: int,
               output_tokens: int, energy_j: float, latency_ms: float, score: bool = False,
               request_id: str = "", scored_tokens: int = 0) -> None:
        """A request (or one expert's part of a score) finished: charge its measured energy and
        compare the cost model's prediction with what happened."""
        self.ledger.charge(tenant, energy_j, self.clock())
        self._charge_prices(tenant, energy_j)
        if self.store is not None:
            self.store.append(tenant, energy_j, request_id=request_id, kind="score" if score else "finished")
        cand = next((c for c in plan.ranked if c.expert == expert and c.replica == replica), None)
        if cand is not None:
            self.cost.learn(cand.profile, expert, prompt_tokens, output_tokens, energy_j, latency_ms,
                            inflight=cand.inflight, queue=not score, scored_tokens=scored_tokens)

    def charge_unfinished(self, tenant: str, plan: Plan, fraction: float, request_id: str = "") -> None:
        """A request ended without a final usage (cancelled, failed): charge the predicted energy
        of the part that ran, so abandoning requests does not escape the budget."""
        if plan.predicted_energy_j:
            energy_j = plan.predicted_energy_j * min(1.0, max(0.0, fraction))
            self.ledger.charge(tenant, energy_j, self.clock())
            self._charge_prices(tenant, energy_j)
            if self.store is not None:
                self.store.append(tenant, energy_j, request_id=request_id, kind="unfinished")

    # -- feedback -------------------------------------------------------------------------------
    def remember(self, request_id: str, tenant: str, expert: str, plan: Plan) -> None:
        """A Generate request finished: remember who answered it, for the client's feedback."""
        if request_id:
            predicted = plan.predicted_quality.get(expert)
            q = predicted if predicted is not None else 0.5
            self.served.add(request_id, ServedRequest(tenant, expert, q))
            if self.store is not None:
                self.store.remember_served(request_id, tenant, expert, q)  # durable with the next flush

    async def record_feedback(self, request_id: str, score: float, tenant: str = "") -> tuple[ServedRequest, float]:
        """A client's score in [0, 1] for a finished request; returns (what was served, the
        answering expert's quality correction for its tenant afterwards).

        InvalidRequest for a bad score, NotFound for an id this gateway does not remember (never
        served, served for another tenant, or forgotten), AlreadyRecorded for a second score."""
        if not isinstance(score, int | float) or isinstance(score, bool) or not 0.0 <= score <= 1.0:
            raise InvalidRequest(f"score must be a number in [0, 1] (1: a good answer, 0: a wrong one); got {score!r}",
                                 param="score")
        if not request_id:
            raise InvalidRequest("request_id is required: the id a Generate response (Usage.request_id) returned",
                                 param="request_id")
        served = self.served.get(request_id)
        if served is None or (tenant and served.tenant != tenant):
            raise NotFound(
                f"no finished request {request_id!r} to score: feedback is accepted for "
                f"{self.served.ttl_s:.0f} s after a Generate request finished, for its own tenant "
                f"(the last {self.served.capacity} requests are remembered)", param="request_id")
        if served.scored:
            raise AlreadyRecorded(f"request {request_id!r} already has feedback; a request is scored once")
        served.scored = True
        correction = self.feedback.update(served.expert, served.tenant, float(score), served.predicted_quality)
        await self._save_feedback(scored=request_id)
        return served, correction

    async def cascade_outcome(self, tenant: str, expert: str, plan: Plan, kept: bool) -> None:
        """A cascade kept (1) or discarded (0) ``expert``'s answer: weaker evidence than a client's
        score (the model judged itself), so it counts ``feedback.cascade_weight``."""
        weight = self.config.router.feedback.cascade_weight
        if weight <= 0:
            return
        predicted = plan.predicted_quality.get(expert, 0.5)
        self.feedback.update(expert, tenant, 1.0 if kept else 0.0, predicted, weight=weight)
        await self._save_feedback()

    async def _save_feedback(self, scored: str = "") -> None:
        if self.store is not None and self.store.is_open:
            await self.store.save_feedback(self.feedback.rows(), scored)

    # -- operators -----------------------------------------------------------------------------
    def scope_of(self, name: str) -> str:
        if name in ("", CLUSTER):
            return CLUSTER
        tenant = name.removeprefix("tenant:")
        if self.config.tenants and self.config.tenant(tenant) is None:
            raise InvalidRequest(f"unknown tenant {tenant!r}; budgets apply to 'cluster' or a configured tenant")
        return tenant_scope(tenant)

    def set_budget(self, name: str, limit: BudgetLimit | None, *, actor: str, peer: str, reason: str):
        change = self.ledger.set_limit(self.scope_of(name), limit, actor=actor, peer=peer, reason=reason)
        if self.store is not None:
            self.store.record_change(change)
            if limit is not None:
                self.store.longest_window_s = max(self.store.longest_window_s, limit.window_s)
        return change

    def budget_status(self, names: Sequence[str] = ()) -> list[ScopeStatus]:
        now = self.clock()
        scopes = [self.scope_of(n) for n in names] if names else sorted(
            set(self.ledger.scopes()) | {CLUSTER} | {tenant_scope(t.name) for t in self.config.tenants}
        )
        return [self.ledger.status(s, now) for s in scopes]
