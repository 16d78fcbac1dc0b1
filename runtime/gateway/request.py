"""One request type from the API edge to dispatch, and what the gateway hands back.

Every API (gRPC Generate, Score, StreamImages, GenerateImage; HTTP completions) turns its message
into a :class:`Request`; validation returns the same type with defaults filled in; the lifecycle
routes and dispatches it. Only the replica call is another shape (``GenerateCall``, ``ScoreCall``,
``ImageJobCall``, ``ImageStreamCall`` in ``wattserve/``): what an engine in another process needs.

Time: the gateway runs on one injected clock (monotonic seconds). A request carries the time its
client gives it (``timeout_s``, relative, from the gRPC deadline or HTTP ``deadline_ms``); the
lifecycle turns it into a deadline on that clock when the request arrives. Only the engine call
carries wall-clock seconds (``deadline_unix_s``), because the engine runs in another process,
possibly on another host: :func:`engine_deadline` is the one place that conversion happens.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from router.base import Plan
from wattserve.images import ImageParams, SimilarityFilterParams
from wattserve.types import ChatMessage, Priority, RequestUsage, SamplingParams

Kind = Literal["generate", "score", "image", "image_stream"]
IMAGE_KINDS = ("image", "image_stream")


@dataclass(slots=True, frozen=True)
class Request:
    """A request as an API received it (validation fills in defaults and bounds every field).

    ``kind`` says which fields matter: a Generate request has exactly one of ``prompt`` (a
    completion) and ``messages`` (a chat, rendered by the expert's chat template); a Score request
    has ``prompt`` and ``choices``; image requests have ``image`` (and, for a stream,
    ``similarity`` and ``frame_buffer_size``). ``api`` names the transport, for metrics.
    """

    kind: Kind = "generate"
    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    max_tokens: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    choices: tuple[str, ...] = ()
    choice_norm: str = "sum"  # Score: how choices are ranked (router/quality.py choice_scores)
    image: ImageParams | None = None
    similarity: SimilarityFilterParams | None = None
    frame_buffer_size: int = 0
    expert: str = ""
    energy_budget_j: float | None = None
    latency_budget_ms: float | None = None
    compute_budget: float | None = None  # early exit: share of full depth per token, in (0, 1]
    priority: Priority = Priority.NORMAL
    tenant: str = ""
    request_id: str = ""
    timeout_s: float | None = None  # time the client gives the request from its arrival
    api: str = "grpc"

    @property
    def modality(self) -> str:
        """``text`` or ``image``: which experts may serve it."""
        return "image" if self.kind in IMAGE_KINDS else "text"

    @property
    def text(self) -> str:
        """What the router's gate reads."""
        if self.image is not None:
            return self.image.prompt
        return self.prompt or "\n".join(m.content for m in self.messages)


@dataclass(slots=True, frozen=True)
class Chunk:
    """Tokens of a Generate stream that arrived together."""

    text: str
    token_ids: tuple[int, ...]
    expert: str = ""  # who produced it: with the router choosing, every chunk can name the expert


@dataclass(slots=True, frozen=True)
class Final:
    """The last message of a Generate stream."""

    request_id: str
    expert: str
    replica: int
    usage: RequestUsage
    ttft_ms: float  # gateway: received -> first token yielded
    total_latency_ms: float
    plan: Plan


def engine_deadline(deadline_s: float | None, clock: Callable[[], float],
                    wall_clock: Callable[[], float] = time.time) -> float | None:
    """A deadline on the gateway's clock as the wall-clock second an engine process compares with."""
    return None if deadline_s is None else wall_clock() + (deadline_s - clock())


_CALL_ID_PREFIX = os.urandom(8).hex()
_call_numbers = itertools.count()


def new_call_id() -> str:
    """A fresh id for one call to a replica: 32 hex digits, a random half drawn once per gateway
    process and a counter, so no two calls share one (within this process or across gateways and
    restarts) without ``uuid4``'s read of the system's random source per call."""
    return f"{_CALL_ID_PREFIX}{next(_call_numbers) & 0xFFFF_FFFF_FFFF_FFFF:016x}"
