"""Cascading Generate: a cheap answer first, the strong expert only when the cheap one is unsure.

The router's plan names two experts of its subset S (``Plan.cascade``: the cheapest, then the
top-weight one); both fit the request's energy budget together. The first answer is held back
(a streamed answer cannot be taken back); if its mean token log-probability is at least
``cascade_below_logprob`` it is released, otherwise it is discarded and the strong expert answers,
streamed as usual. Both answers are charged to the tenant and reported: the final ``Usage`` has
the energy of both, and ``cascade`` lists the experts that answered. The outcome teaches the
router (``RoutingService.cascade_outcome``): a kept answer counts as a good score for the cheap
expert, an escalated one as a bad score, at ``router.feedback.cascade_weight``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from router.base import Plan

from .answer import answer
from .lifecycle import Call
from .request import Chunk, Final


def _stage(plan: Plan, expert: str, reason: str) -> Plan:
    """The plan restricted to one expert's replicas."""
    return dataclasses.replace(plan, ranked=tuple(c for c in plan.ranked if c.expert == expert), reason=reason,
                               subset=(expert,), weights={expert: 1.0}, cascade=())


async def cascade(call: Call, plan: Plan) -> AsyncIterator[Chunk | Final]:
    """Yields what :func:`~runtime.gateway.answer.answer` yields, with the cascade's outcome in
    the final message."""
    first, strong = plan.cascade
    threshold = plan.cascade_below_logprob
    held: list = []
    async for item in answer(call, _stage(plan, first, plan.reason)):
        held.append(item)
    final: Final = held[-1]
    confidence = final.usage.mean_logprob
    kept = confidence is None or confidence >= threshold
    if confidence is not None:  # the outcome is (weak) feedback on the cheap expert
        await call.lifecycle.routing.cascade_outcome(call.request.tenant, first, plan, kept)
    if kept:
        note = f"; cascade: kept {first}'s answer (mean log p {_fmt(confidence)} >= {threshold:g})"
        for item in held[:-1]:
            yield item
        yield dataclasses.replace(final, plan=dataclasses.replace(plan, reason=plan.reason + note, cascaded=(first,)))
        return
    note = f"; cascade: {first}'s answer unsure (mean log p {_fmt(confidence)} < {threshold:g}), answered by {strong}"
    async for item in answer(call, _stage(plan, strong, plan.reason + note)):
        if isinstance(item, Final):
            usage = dataclasses.replace(item.usage, energy_j=item.usage.energy_j + final.usage.energy_j)
            item = dataclasses.replace(item, usage=usage, plan=dataclasses.replace(
                plan, reason=plan.reason + note, cascaded=(first, strong)))
        yield item


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
