"""``Inference.Score``: the MoE² ensemble over candidate answers.

The router picks a subset S of experts within the request's budgets (for a baseline policy, S is
its one chosen expert). Every expert of S scores every choice in parallel (log p(choice | prompt),
computed by its engine loop between steps and metered like any step); the answers are mixed with
the gate weights renormalised over the experts that answered (``router.moe2.combine``). Each
expert's measured energy is charged to the tenant and teaches the cost model.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass, replace

from ray.exceptions import RayActorError, RayError

from router.base import Plan
from router.moe2 import combine
from wattserve.errors import ExpertUnavailable, WattserveError
from wattserve.types import Priority, ScoreCall, ScoreResult

from .routing import RouteRequest


@dataclass(slots=True, frozen=True)
class ScoreRequest:
    prompt: str
    choices: tuple[str, ...]
    energy_budget_j: float | None = None
    latency_budget_ms: float | None = None
    priority: Priority = Priority.NORMAL
    tenant: str = ""
    expert: str = ""  # pin one expert (no ensemble)
    request_id: str = ""


@dataclass(slots=True, frozen=True)
class ExpertContribution:
    expert: str
    replica: int
    weight: float  # renormalised over the experts that answered
    choice_logprobs: tuple[float, ...]
    choice_probs: tuple[float, ...]  # softmax of its log-probs over the choices
    energy_j: float
    energy_source: str
    latency_ms: float


@dataclass(slots=True, frozen=True)
class ScoreOutcome:
    request_id: str
    choice_probs: tuple[float, ...]  # the ensemble
    best: int
    contributions: tuple[ExpertContribution, ...]
    energy_j: float
    total_latency_ms: float
    plan: Plan


def _softmax(row) -> tuple[float, ...]:
    top = max(row)
    exp = [math.exp(v - top) for v in row]
    z = sum(exp)
    return tuple(v / z for v in exp)


async def score(gw, request: ScoreRequest) -> ScoreOutcome:
    """Serve one Score request through gateway ``gw``; raises domain errors like Generate."""
    from .gateway import ClientRequest

    received = gw.clock()
    gw.requests_total += 1
    try:
        base = gw.validate(ClientRequest(
            prompt=request.prompt, max_tokens=1, expert=request.expert, energy_budget_j=request.energy_budget_j,
            latency_budget_ms=request.latency_budget_ms, priority=request.priority, tenant=request.tenant,
            request_id=request.request_id,
        ))
        gw.validator.choices(request.choices)
        ticket = gw.admission.acquire(base.tenant)
    except WattserveError as exc:  # refused: a failed request for GetStatus, and a refusal for the metrics
        gw.requests_failed += 1
        gw.metrics.refused("grpc", exc)
        raise
    try:
        return await _score(gw, replace(request, tenant=base.tenant, priority=base.priority), received)
    except BaseException:
        gw.requests_failed += 1
        raise
    finally:
        gw.admission.release(ticket)


async def _score(gw, req: ScoreRequest, received: float) -> ScoreOutcome:
    plan = await gw.routing.plan(RouteRequest(
        prompt=req.prompt, tenant=req.tenant, priority=req.priority, expert=req.expert,
        energy_budget_j=req.energy_budget_j, latency_budget_ms=req.latency_budget_ms, choices=req.choices,
    ), gw.candidates())
    picks = [next(c for c in plan.ranked if c.expert == e) for e in plan.experts]
    call = ScoreCall(request_id=uuid.uuid4().hex, prompt=req.prompt, choices=req.choices,
                     priority=req.priority, tenant=req.tenant)
    results = await asyncio.gather(*(_one(gw, c.key, call) for c in picks), return_exceptions=True)
    answered = {}
    for cand, res in zip(picks, results, strict=True):
        if isinstance(res, BaseException):
            if not isinstance(res, WattserveError):
                raise res
            continue
        answered[cand.expert] = (cand, res)
        tokens = res.prompt_tokens * len(req.choices) + sum(res.choice_tokens)  # all of it is prefill work
        gw.routing.finish(plan, req.tenant, cand.expert, cand.replica, prompt_tokens=tokens, output_tokens=0,
                          energy_j=res.energy_j, latency_ms=res.latency_ms, score=True,
                          request_id=f"{call.request_id}:{cand.expert}")
    await gw.routing.flush()  # the charges are durable before the caller gets the answer
    if not answered:
        raise next(r for r in results if isinstance(r, BaseException))
    weights = {e: plan.weights.get(e, 0.0) for e in answered}
    if sum(weights.values()) <= 0:
        weights = {e: 1.0 for e in answered}
    total = sum(weights.values())
    probs = combine(weights, {e: r.choice_logprobs for e, (_, r) in answered.items()})
    contributions = tuple(
        ExpertContribution(
            expert=e, replica=c.replica, weight=weights[e] / total, choice_logprobs=r.choice_logprobs,
            choice_probs=_softmax(r.choice_logprobs), energy_j=r.energy_j, energy_source=r.energy_source,
            latency_ms=r.latency_ms,
        )
        for e, (c, r) in answered.items()
    )
    return ScoreOutcome(
        request_id=req.request_id or call.request_id,
        choice_probs=tuple(probs),
        best=max(range(len(probs)), key=lambda k: (probs[k], -k)),
        contributions=contributions,
        energy_j=math.fsum(c.energy_j for c in contributions),
        total_latency_ms=1000.0 * (gw.clock() - received),
        plan=plan,
    )


async def _one(gw, key, call: ScoreCall) -> ScoreResult:
    state = gw.states[key]
    state.inflight += 1
    try:
        return await state.replica.actor.score.remote(call)
    except WattserveError:
        raise
    except RayActorError as exc:
        state.healthy = False
        raise ExpertUnavailable(f"expert {key[0]}/{key[1]} died while scoring ({type(exc).__name__}); retry") from None
    except RayError as exc:
        raise ExpertUnavailable(f"expert {key[0]}/{key[1]} failed: {str(exc).strip().splitlines()[-1][:300]}") from None
    finally:
        state.inflight -= 1
