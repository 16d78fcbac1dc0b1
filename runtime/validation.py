"""Input limits: every field a client sends is checked here, once, before anything is queued.

Each limit is a config key (``gateway.*``, docs/config.md) or a constant below, and each
violation is an InvalidRequest (INVALID_ARGUMENT / HTTP 400) that says what to fix. The point is
that no input can make an expert crash or the server allocate without bound: prompts, stop
strings, chat turns, Score choices, ids, tenants and sampling values are all bounded here;
prompt *tokens* are bounded by each expert's ``max_model_len`` (its engine's own check), image
frames by the image expert's ``max_pixels`` / ``max_frame_bytes`` and the gateway's frame rate.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import TYPE_CHECKING

from wattserve.errors import InvalidRequest, UnknownExpert
from wattserve.types import Priority
from workers.engines.chat import check_messages

if TYPE_CHECKING:
    from .config import WattserveConfig
    from .gateway import ClientRequest

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
MAX_TENANT_CHARS = 64
#: distinct tenant names one gateway tracks when no tenant list is configured (each costs metric
#: series and ledger entries, so a client inventing names must not grow them without bound)
MAX_UNLISTED_TENANTS = 1024
#: temperatures below this are greedy (as vLLM does): dividing logits by a denormal overflows
GREEDY_BELOW_TEMPERATURE = 1e-5
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")


class Validator:
    """Checks requests against one configuration; remembers the tenants it has let in."""

    def __init__(self, config: WattserveConfig) -> None:
        self.config = config
        self.gw = config.gateway
        self._seen_tenants: set[str] = set()

    def request(self, req: ClientRequest) -> ClientRequest:
        """Check every field of a generation request; return it with defaults filled in."""
        gw = self.gw
        if req.messages and req.prompt:
            raise InvalidRequest("send either a prompt or chat messages, not both")
        if not req.prompt and not req.messages:
            raise InvalidRequest("prompt is empty: send the text to continue")
        if len(req.messages) > gw.max_chat_messages:
            raise InvalidRequest(f"{len(req.messages)} chat messages; this server accepts at most {gw.max_chat_messages}")
        if req.messages:
            check_messages(req.messages)  # the expert checks again; refusing here costs no replica a call
        text = req.prompt or "".join(m.content for m in req.messages)
        self.prompt_size(text, "prompt")
        max_tokens = req.max_tokens or gw.default_max_tokens
        if max_tokens < 0:
            raise InvalidRequest(f"max_tokens must be positive (got {req.max_tokens})")
        if max_tokens > gw.max_tokens_limit:
            raise InvalidRequest(f"max_tokens {max_tokens} is above this server's limit of {gw.max_tokens_limit}")
        sampling = self.sampling(req.sampling)
        self.expert(req.expert, "text")
        for name, value in (("energy_budget_j", req.energy_budget_j), ("latency_budget_ms", req.latency_budget_ms)):
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise InvalidRequest(f"{name} must be a positive number when set (got {value})")
        if req.compute_budget is not None and not (math.isfinite(req.compute_budget) and 0 < req.compute_budget <= 1):
            raise InvalidRequest(
                f"compute_budget is a share of full depth in (0, 1] (got {req.compute_budget}); 1 is full depth"
            )
        self.request_id(req.request_id)
        tenant, priority = self.tenant(req.tenant, req.priority)
        return replace(req, max_tokens=max_tokens, sampling=sampling, tenant=tenant, priority=priority)

    def prompt_size(self, text: str, what: str) -> None:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.gw.max_prompt_bytes:
            raise InvalidRequest(f"{what} is {size} bytes; this server accepts at most {self.gw.max_prompt_bytes}")

    def sampling(self, s):
        if not math.isfinite(s.temperature) or s.temperature < 0:
            raise InvalidRequest(f"sampling.temperature must be >= 0 (got {s.temperature}); 0 is greedy")
        if s.temperature > self.gw.max_temperature:
            raise InvalidRequest(f"sampling.temperature {s.temperature} is above this server's limit of "
                                 f"{self.gw.max_temperature:g}")
        temperature = 0.0 if s.temperature < GREEDY_BELOW_TEMPERATURE else s.temperature
        top_p = s.top_p or 1.0
        if not 0 < top_p <= 1:  # NaN fails this too
            raise InvalidRequest(f"sampling.top_p must be in (0, 1] (got {s.top_p})")
        if s.top_k < 0:
            raise InvalidRequest(f"sampling.top_k must be >= 0 (got {s.top_k}); 0 disables it")
        if len(s.stop) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in s.stop):
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters")
        return replace(s, temperature=temperature, top_p=top_p)

    def expert(self, name: str, modality: str) -> None:
        if not name:
            return
        spec = self.config.expert(name)
        if spec is None:
            known = ", ".join(e.name for e in self.config.experts if e.modality == modality) or "none"
            kind = "known experts" if modality == "text" else "image experts"
            raise UnknownExpert(f"unknown expert {name[:64]!r}; {kind}: {known}")
        if spec.modality != modality:
            serves, use = ("images", "StreamImages or GenerateImage") if spec.modality == "image" else ("text", "Generate")
            raise InvalidRequest(f"expert {name!r} serves {serves}; use {use}")

    @staticmethod
    def request_id(request_id: str) -> None:
        if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
            raise InvalidRequest(f"request_id must be printable and at most {MAX_REQUEST_ID_CHARS} characters")

    def tenant(self, name: str, priority: Priority) -> tuple[str, Priority]:
        """The tenant to serve as ("default" when empty) and the priority it may use."""
        tenant = name or "default"
        if len(tenant) > MAX_TENANT_CHARS or not _TENANT.match(tenant):
            raise InvalidRequest(f"tenant must be 1-{MAX_TENANT_CHARS} letters, digits, '_', '.', '@' or '-'")
        if self.config.tenants:
            t = self.config.tenant(tenant)
            if t is None:
                raise InvalidRequest(f"unknown tenant {tenant!r}")
            return tenant, Priority(min(priority, t.max_priority_value))
        if tenant not in self._seen_tenants:
            if len(self._seen_tenants) >= MAX_UNLISTED_TENANTS:
                raise InvalidRequest(f"this server has seen {MAX_UNLISTED_TENANTS} tenant names; configure `tenants` "
                                     "to serve more")
            self._seen_tenants.add(tenant)
        return tenant, Priority(priority)

    def choices(self, choices: tuple[str, ...]) -> None:
        """Score: 1..max_score_choices non-empty candidate answers, each bounded in bytes."""
        gw = self.gw
        if not choices:
            raise InvalidRequest("choices is empty: send the candidate answers to score")
        big = max(len(c.encode("utf-8", "surrogatepass")) for c in choices)
        if len(choices) > gw.max_score_choices or big > gw.max_score_choice_bytes or not all(choices):
            raise InvalidRequest(f"send 1 to {gw.max_score_choices} non-empty choices of at most "
                                 f"{gw.max_score_choice_bytes} bytes each (got {len(choices)}, the largest {big} bytes)")
