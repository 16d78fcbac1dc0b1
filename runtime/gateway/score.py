"""``Inference.Score``: the MoE² ensemble over candidate answers.

The router picks a subset S of experts within the request's budgets (for a baseline policy, S is
its one chosen expert). Every expert of S scores every choice in parallel (log p(choice | prompt),
computed by its engine loop between steps and metered like any step); the answers are mixed with
the gate weights renormalised over the experts that answered (``router.quality.combine``). Each
expert's measured energy is charged to the tenant and teaches the cost model.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from router.base import Candidate, Plan
from router.quality import choice_scores, combine, softmax
from wattserve.errors import WattserveError
from wattserve.types import ScoreCall, ScoreResult

from .lifecycle import Call, Lifecycle
from .request import Request, new_call_id


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


async def score(lc: Lifecycle, request: Request) -> ScoreOutcome:
    """Serve one Score request (``request.kind == "score"``); raises domain errors like Generate."""
    async with lc.call(request) as call:
        outcome = await _score(call)
        call.recorder.succeeded(outcome.contributions[0].expert)
        call.done = True
        return outcome


async def _score(call: Call) -> ScoreOutcome:
    lc, req = call.lifecycle, call.request
    plan = await call.route()
    call_id = new_call_id()
    engine_call = ScoreCall(request_id=call_id, prompt=req.prompt, choices=req.choices, priority=req.priority,
                            tenant=req.tenant)
    groups = [[c for c in plan.ranked if c.expert == e] for e in plan.experts]
    results = await asyncio.gather(*(_one(lc, group, engine_call) for group in groups), return_exceptions=True)
    answered: dict[str, tuple[Candidate, ScoreResult]] = {}
    for res in results:
        if isinstance(res, BaseException):
            if not isinstance(res, WattserveError):
                raise res
            continue
        cand, result = res
        answered[cand.expert] = res
        # The prompt runs once; each choice's tokens are scored after it (router/cost.py prices them apart).
        lc.routing.finish(plan, req.tenant, cand.expert, cand.replica, prompt_tokens=result.prompt_tokens,
                          output_tokens=0, scored_tokens=sum(result.choice_tokens),
                          energy_j=result.energy_j, latency_ms=result.latency_ms, score=True,
                          request_id=f"{call_id}:{cand.expert}")
    await lc.routing.flush()  # the charges are durable before the caller gets the answer
    if not answered:
        raise next(r for r in results if isinstance(r, BaseException))
    weights = {e: plan.weights.get(e, 0.0) for e in answered}
    if sum(weights.values()) <= 0:
        weights = {e: 1.0 for e in answered}
    total = sum(weights.values())
    ranked = {e: choice_scores(r.choice_logprobs, req.choices, req.choice_norm) for e, (_, r) in answered.items()}
    probs = combine(weights, ranked)
    contributions = tuple(
        ExpertContribution(
            expert=e, replica=c.replica, weight=weights[e] / total, choice_logprobs=r.choice_logprobs,
            choice_probs=tuple(softmax(ranked[e])), energy_j=r.energy_j, energy_source=r.energy_source,
            latency_ms=r.latency_ms,
        )
        for e, (c, r) in answered.items()
    )
    return ScoreOutcome(
        request_id=req.request_id or call_id,
        choice_probs=tuple(probs),
        best=max(range(len(probs)), key=lambda k: (probs[k], -k)),
        contributions=contributions,
        energy_j=math.fsum(c.energy_j for c in contributions),
        total_latency_ms=call.elapsed_ms(),
        plan=plan,
    )


async def _one(lc: Lifecycle, group: list[Candidate], call: ScoreCall) -> tuple[Candidate, ScoreResult]:
    """One expert's scores, from the first of its replicas that accepts."""
    lease, result = await lc.replicas.dispatch(group, lambda client: client.score(call), what=f"{group[0].expert} replica")
    lease.release()
    cand = next(c for c in group if c.key == lease.client.key)
    return cand, result
