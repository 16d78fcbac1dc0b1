"""One answer streamed from the replica a plan picks (Generate runs it once, a cascade per stage).

A replica that fails before the caller saw any token (its process died, its engine failed) is
replaced once by another healthy replica of the plan (``gateway.retry_unstarted``); after a token
the error stands (UNAVAILABLE), since a partly streamed answer cannot be replayed transparently.
A replica the request woke (a cold expert's fresh replica) that fails so is replaced as well, by a
healthy replica of the plan if one is left, else by waking another: at most
``capacity.wakes_per_request`` wakes per request, then UNAVAILABLE saying how many died.
Whichever way the caller leaves, the replica stops working on the request and the tenant is
charged for the part that ran.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import chain

from router.base import Candidate, Plan
from wattserve.errors import ExpertUnavailable, QueueFull
from wattserve.types import GenerateCall

from .lifecycle import Call, Lifecycle
from .replicas import COLD_REPLICA, Key, Lease, ReplicaDied, ReplicaStream
from .request import Chunk, Final, engine_deadline, new_call_id

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Attempt:
    """How far one dispatch got: the replica it went to, and whether a token reached the caller
    (then it must not be retried)."""

    key: Key | None = None
    streamed: bool = False


async def answer(call: Call, plan: Plan) -> AsyncIterator[Chunk | Final]:
    """One answer to ``call`` from the plan's first replica that admits it, retried once on another
    replica of the plan if the first fails before its first token (and again, waking another, while
    the replicas it woke fail so and ``wakes_per_request`` allows)."""
    failed: set[Key] = set()
    lc = call.lifecycle
    retries = 1 if lc.retry_unstarted else 0
    wakes = 0  # replicas this request reached through a cold candidate
    ranked = list(plan.ranked)
    while True:
        attempt = _Attempt()
        try:
            async for item in _attempt(call, plan, ranked, failed, attempt):
                yield item
            return
        except ExpertUnavailable as exc:
            if attempt.streamed or attempt.key is None:
                raise
            failed.add(attempt.key)
            # a replica the ranking did not list was reached through a cold candidate: one it woke
            woken = attempt.key not in {c.key for c in ranked}
            wakes += woken
            if not lc.retry_unstarted:
                raise
            can_wake = wakes < lc.replicas.wakes_per_request
            # a fresh replica that failed at once: replacing it does not use the one retry
            free = woken and can_wake
            ranked = lc.replicas.retry_ranking(plan.ranked, failed, wake=can_wake) if free or retries > 0 else []
            if not ranked:
                if woken:
                    raise ExpertUnavailable(
                        f"{exc} ({wakes} replica(s) woken for this request failed before its first token; "
                        f"at most {lc.replicas.wakes_per_request} per request: capacity.wakes_per_request)"
                    ) from None
                raise
            if not free:
                retries -= 1
            lc.counters.retried += 1
            first = ranked[0]
            where = f"waking another {first.expert}" if first.replica == COLD_REPLICA else f"{first.expert}/{first.replica}"
            log.warning("request %s: %s; retrying on %s", call.request.request_id or "-", exc, where)


async def _attempt(call: Call, plan: Plan, ranked: list[Candidate], failed: set[Key],
                   attempt: _Attempt) -> AsyncIterator[Chunk | Final]:
    """One dispatch (a fresh call id, so a restarted replica cannot mix it up)."""
    lc, req = call.lifecycle, call.request
    engine_call = GenerateCall(
        request_id=new_call_id(), prompt=req.prompt, max_tokens=req.max_tokens, sampling=req.sampling,
        priority=req.priority, tenant=req.tenant, deadline_unix_s=engine_deadline(call.deadline_s, call.clock),
        messages=req.messages, compute_budget=req.compute_budget, energy_budget_j=req.energy_budget_j,
    )

    async def start(client) -> tuple[ReplicaStream, list]:
        attempt.key = client.key
        stream = client.generate(engine_call)
        try:
            return stream, await stream.next()
        except BaseException as exc:
            stream.cancel()
            if not isinstance(exc, QueueFull):  # a full replica refused it: nothing to abort
                client.abort(engine_call.request_id)
            raise

    lease, (stream, events) = await lc.replicas.dispatch(ranked, start, skip=failed, deadline_s=call.deadline_s)
    client = lease.client
    call.recorder.routed(client.expert)
    ttft_ms: float | None = None
    tokens = 0
    finished = False
    try:
        while True:
            # Events that arrived together (the replica coalesces under load) leave as one chunk:
            # fewer, larger messages when the server is busy.
            if len(events) == 1:  # the usual case: the replica merges a request's events per batch
                text, ids = events[0].text, events[0].token_ids
            else:
                text = "".join([ev.text for ev in events])
                ids = tuple(chain.from_iterable([ev.token_ids for ev in events]))
            if text or ids:
                if ttft_ms is None:
                    ttft_ms = call.elapsed_ms()
                tokens += len(ids)
                attempt.streamed = True
                yield Chunk(text, ids, client.expert)
            usage = events[-1].usage
            if usage is not None:
                finished = True
                yield await _final(call, plan, lease, engine_call.request_id, usage, ttft_ms)
                return
            events = await _next(lc, lease, stream, tokens)
    finally:
        lease.release()
        if not finished:
            stream.cancel()
            client.abort(engine_call.request_id)
            lc.routing.charge_unfinished(req.tenant, plan, tokens / max(1, req.max_tokens),
                                         request_id=engine_call.request_id)


async def _next(lc: Lifecycle, lease: Lease, stream: ReplicaStream, tokens: int) -> list:
    try:
        return await lc.replicas.watch(lease.state, stream.next())
    except ReplicaDied as exc:
        raise ReplicaDied(f"{exc} (after {tokens} tokens)") from None


async def _final(call: Call, plan: Plan, lease: Lease, call_id: str, usage, ttft_ms: float | None) -> Final:
    """Charge the measured energy (durably, before the caller learns the request finished), teach
    the cost model, remember who answered (for feedback), and build the final message."""
    lc, req, client = call.lifecycle, call.request, lease.client
    lc.replicas.sets[client.expert].finished(usage.prompt_tokens, usage.completion_tokens)
    lc.routing.finish(plan, req.tenant, client.expert, client.index, prompt_tokens=usage.prompt_tokens,
                      output_tokens=usage.completion_tokens, energy_j=usage.energy_j, latency_ms=usage.latency_ms,
                      request_id=call_id)
    request_id = req.request_id or call_id
    lc.routing.remember(request_id, req.tenant, client.expert, plan)
    await lc.routing.flush()  # charges and who answered are on disk before the caller learns it finished
    total_ms = call.elapsed_ms()
    return Final(request_id=request_id, expert=client.expert, replica=client.index, usage=usage,
                 ttft_ms=ttft_ms if ttft_ms is not None else total_ms, total_latency_ms=total_ms, plan=plan)

