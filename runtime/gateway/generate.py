"""Generate: the lifecycle around one answer (``answer.py``) or a cascade of two (``cascade.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from .answer import answer
from .cascade import cascade
from .lifecycle import Lifecycle
from .request import Chunk, Final, Request


async def generate(lc: Lifecycle, request: Request) -> AsyncIterator[Chunk | Final]:
    """Serve one Generate request: text chunks, then one :class:`Final`.

    Raises domain errors (InvalidRequest, QueueFull, NoHealthyExpert, ExpertUnavailable, ...).
    """
    async with lc.call(request) as call:
        plan = await call.route()
        items = cascade(call, plan) if plan.cascade else answer(call, plan)
        async for item in items:
            if isinstance(item, Chunk):
                call.recorder.chunk(item)
            else:
                req = call.request
                call.recorder.finished(item, lc.tenant_label(req.tenant), req.energy_budget_j, req.latency_budget_ms)
                call.done = True
            yield item
