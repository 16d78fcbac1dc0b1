"""Protobuf <-> domain conversions for routing: Score, energy budgets, the router's plan in Usage.

Kept apart from ``servicer.py`` so the routing surface reads in one place; the servicers call
these and nothing here decides anything.
"""

from __future__ import annotations

from router.base import Plan
from router.budget import BudgetChange, BudgetLimit
from router.quality import MC_NORMS
from wattserve.errors import InvalidRequest
from wattserve.types import Priority

from ..gateway.admin import BudgetView
from ..gateway.request import Request
from ..gateway.score import ScoreOutcome
from .gen import wattserve_pb2 as pb


def add_plan_to_usage(usage: pb.Usage, plan: Plan, mean_logprob: float | None = None) -> pb.Usage:
    if mean_logprob is not None:
        usage.mean_logprob = mean_logprob
    usage.cascade.extend(plan.cascaded)
    usage.gate = plan.gate
    usage.subset.extend(plan.subset)
    usage.gate_weights.update(dict(plan.weights))
    usage.predicted_energy_j = plan.predicted_energy_j or 0.0
    usage.predicted_latency_ms = plan.predicted_latency_ms or 0.0
    usage.budget_exceeded = plan.budget_exceeded
    return usage


def score_request_from_proto(msg: pb.ScoreRequest) -> Request:
    if msg.priority not in Priority._value2member_map_ and msg.priority != pb.PRIORITY_UNSPECIFIED:
        raise InvalidRequest(f"priority {msg.priority} is not one of LOW, NORMAL, HIGH")
    return Request(
        kind="score",
        prompt=msg.prompt,
        choices=tuple(msg.choices),
        choice_norm=_choice_norm(msg.choice_norm),
        energy_budget_j=msg.energy_budget_j if msg.HasField("energy_budget_j") else None,
        latency_budget_ms=msg.latency_budget_ms if msg.HasField("latency_budget_ms") else None,
        priority=Priority(msg.priority) if msg.priority else Priority.NORMAL,
        tenant=msg.tenant,
        expert=msg.expert,
        request_id=msg.request_id,
    )


def _choice_norm(value: str) -> str:
    if not value:
        return "sum"
    if value not in MC_NORMS:
        raise InvalidRequest(f"choice_norm must be one of {', '.join(MC_NORMS)} (or empty for sum); got {value!r}",
                             param="choice_norm")
    return value


def score_response_to_proto(out: ScoreOutcome, choices) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        request_id=out.request_id,
        best_choice=out.best,
        best_text=choices[out.best],
        choice_probs=list(out.choice_probs),
        experts=[
            pb.ExpertScore(
                expert=c.expert, replica=c.replica, weight=c.weight, choice_logprobs=list(c.choice_logprobs),
                choice_probs=list(c.choice_probs), energy_j=c.energy_j, energy_source=c.energy_source,
                latency_ms=c.latency_ms,
            )
            for c in out.contributions
        ],
        energy_j=out.energy_j,
        total_latency_ms=out.total_latency_ms,
        routing_policy=out.plan.policy,
        routing_reason=out.plan.reason,
        gate=out.plan.gate,
        budget_exceeded=out.plan.budget_exceeded,
        predicted_energy_j=out.plan.predicted_energy_j or 0.0,
    )


def budget_from_proto(msg: pb.SetEnergyBudgetRequest) -> tuple[float | None, float, float | None]:
    """What a SetEnergyBudget request asks for: (joules per window or None for unlimited, the
    window in seconds, the throttle fraction or None for the server's default)."""
    has_j, has_w = msg.HasField("energy_budget_j"), msg.HasField("average_power_w")
    window_s = msg.window_s or 3600.0
    if msg.unlimited:
        if has_j or has_w:
            raise InvalidRequest("send either unlimited or a budget, not both")
        return None, window_s, None
    if has_j == has_w:
        raise InvalidRequest("send exactly one of energy_budget_j (J per window) or average_power_w, or unlimited")
    joules = msg.energy_budget_j if has_j else msg.average_power_w * window_s
    return joules, window_s, msg.throttle_fraction or None


def budget_to_proto(view: BudgetView) -> pb.EnergyBudget:
    st = view.status
    msg = pb.EnergyBudget(scope=st.scope, unlimited=st.limit is None, used_j=st.used_j, state=st.state.value,
                          retry_after_s=st.retry_after_s, quality_per_j=view.quality_per_j, price=view.price)
    if st.limit is not None:
        msg.energy_budget_j = st.limit.energy_j
        msg.window_s = st.limit.window_s
        msg.average_power_w = st.limit.average_power_w
        msg.throttle_fraction = st.limit.throttle_fraction
        msg.remaining_j = st.remaining_j or 0.0
    return msg


def _fmt(limit: BudgetLimit | None) -> str:
    return "unlimited" if limit is None else f"{limit.energy_j:g} J per {limit.window_s:g} s (throttle at {limit.throttle_fraction:.0%})"


def change_to_proto(c: BudgetChange) -> pb.BudgetChange:
    return pb.BudgetChange(unix_s=c.unix_s, scope=c.scope, old_budget=_fmt(c.old), new_budget=_fmt(c.new),
                           actor=c.actor, peer=c.peer, reason=c.reason)
