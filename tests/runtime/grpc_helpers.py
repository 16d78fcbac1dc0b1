"""Small helpers the end-to-end tests share: reading a Generate stream, waiting for a condition."""

from __future__ import annotations

import asyncio
import time


async def collect(stub, req, timeout=60):
    """Text, token ids and usage of one ``Inference.Generate`` call (checks nothing follows usage)."""
    text, ids, usage = "", [], None
    async for msg in stub.Generate(req, timeout=timeout):
        if msg.HasField("chunk"):
            assert usage is None, "no chunk may follow the usage message"
            text += msg.chunk.text
            ids.extend(msg.chunk.token_ids)
        else:
            usage = msg.usage
    return text, ids, usage


async def wait_for(predicate, timeout_s=30.0) -> bool:
    """Poll the async ``predicate`` every 0.1 s until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return False
