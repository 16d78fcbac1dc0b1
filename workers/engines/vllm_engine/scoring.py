"""``Inference.Score`` on vLLM: the log-probability of each choice given the prompt, from vLLM's
prompt log-probabilities.

Each choice is one vLLM request over ``prompt + choice`` with ``prompt_logprobs=0`` (vLLM then
returns, for every prompt position, the log p of the token actually there) and ``max_tokens=1``
(vLLM always generates at least one token; it is discarded). The choices run in parallel in
vLLM's batch, next to whatever else is running; each is metered like any request (its tokens in
the step that answered it) under the id ``<score id>.<k>``, and the job's energy is their sum.
"""

from __future__ import annotations

import asyncio

from .prepare import PreparedScoreJob
from .settings import engine_input, score_params


async def run_score(llm, job: PreparedScoreJob) -> tuple[list[float], list[str]]:
    """Summed log p (nats) of every choice's tokens, and the vLLM request ids used."""
    params = score_params()
    ids = [f"{job.call.request_id}.{k}" for k in range(len(job.choice_ids))]

    async def one(k: int) -> float:
        tokens = job.prompt_ids + job.choice_ids[k]
        final = None
        async for out in llm.generate(engine_input(llm, tokens), params, ids[k]):
            final = out
        if final is None or final.prompt_logprobs is None:
            raise RuntimeError(f"vLLM returned no prompt log-probabilities for choice {k}")
        start = len(job.prompt_ids)
        # position t holds log p(token t | tokens < t); position 0 has no context (None)
        return float(sum(final.prompt_logprobs[t][tokens[t]].logprob for t in range(start, len(tokens))))

    tasks = [asyncio.ensure_future(one(k)) for k in range(len(ids))]
    try:
        return list(await asyncio.gather(*tasks)), ids
    except BaseException:
        for task in tasks:
            task.cancel()  # vLLM's generate() aborts a cancelled request at once
        raise
