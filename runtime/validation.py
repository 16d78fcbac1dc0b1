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
from wattserve.types import Priority, evolve
from workers.engines.chat import check_messages, check_seed

if TYPE_CHECKING:
    from .config import WattserveConfig
    from .gateway.request import Request

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

    def check(self, req: Request) -> Request:
        """Check every field of ``req`` for its kind; return it with defaults filled in."""
        if req.kind == "generate":
            return self.request(req)
        if req.kind == "score":
            return self.score(req)
        return self.image(req)

    def score(self, req: Request) -> Request:
        """A Score request: a prompt (as Generate's) and its candidate answers."""
        checked = self.request(replace(req, max_tokens=1))  # its limits, not its token count
        self.choices(req.choices)
        return replace(req, tenant=checked.tenant, priority=checked.priority)

    def image(self, req: Request) -> Request:
        """An image request or stream: the same limits as text where they apply."""
        params = req.image
        if params is None or not params.prompt.strip():
            raise InvalidRequest("prompt is empty: describe the image to generate")
        self.prompt_size(params.prompt, "prompt")
        self.prompt_size(params.negative_prompt, "negative_prompt")
        self.expert(req.expert, "image")
        self.request_id(req.request_id)
        tenant, priority = self.tenant(req.tenant, req.priority)
        return replace(req, tenant=tenant, priority=priority)

    def request(self, req: Request) -> Request:
        """Check every field of a generation request; return it with defaults filled in."""
        gw = self.gw
        if req.messages and req.prompt:
            raise InvalidRequest("send either a prompt or chat messages, not both", param="messages")
        if not req.prompt and not req.messages:
            raise InvalidRequest("prompt is empty: send the text to continue", param="prompt")
        if len(req.messages) > gw.max_chat_messages:
            raise InvalidRequest(f"{len(req.messages)} chat messages; this server accepts at most {gw.max_chat_messages}",
                                 param="messages")
        if req.messages:
            for i, m in enumerate(req.messages):
                check_unicode(m.role, f"messages[{i}].role")
                check_unicode(m.content, f"messages[{i}].content")
            check_messages(req.messages)  # the expert checks again; refusing here costs no replica a call
        text = req.prompt or "".join(m.content for m in req.messages)
        self.prompt_size(text, "prompt" if req.prompt else "messages")
        max_tokens = req.max_tokens or gw.default_max_tokens
        if max_tokens < 0:
            raise InvalidRequest(f"max_tokens must be positive (got {req.max_tokens})", param="max_tokens")
        if max_tokens > gw.max_tokens_limit:
            raise InvalidRequest(f"max_tokens {max_tokens} is above this server's limit of {gw.max_tokens_limit}",
                                 param="max_tokens")
        sampling = self.sampling(req.sampling)
        if sampling.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens {sampling.min_tokens} is above max_tokens {max_tokens}", param="min_tokens")
        self.expert(req.expert, "text")
        for name, value in (("energy_budget_j", req.energy_budget_j), ("latency_budget_ms", req.latency_budget_ms)):
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise InvalidRequest(f"{name} must be a positive number when set (got {value})", param=name)
        if req.compute_budget is not None and not (math.isfinite(req.compute_budget) and 0 < req.compute_budget <= 1):
            raise InvalidRequest(
                f"compute_budget is a share of full depth in (0, 1] (got {req.compute_budget}); 1 is full depth",
                param="compute_budget",
            )
        self.request_id(req.request_id)
        tenant, priority = self.tenant(req.tenant, req.priority)
        return evolve(req, max_tokens=max_tokens, sampling=sampling, tenant=tenant, priority=priority)

    def prompt_size(self, text: str, what: str) -> None:
        """``text`` is valid Unicode and at most ``gateway.max_prompt_bytes`` in UTF-8."""
        check_unicode(text, what)
        size = len(text.encode("utf-8"))
        if size > self.gw.max_prompt_bytes:
            raise InvalidRequest(f"{what} is {size} bytes; this server accepts at most {self.gw.max_prompt_bytes} "
                                 "(gateway.max_prompt_bytes)", param=what)

    def sampling(self, s):
        """Sampling values in range (vLLM's ranges, and this server's temperature limit)."""
        if not math.isfinite(s.temperature) or s.temperature < 0:
            raise InvalidRequest(f"sampling.temperature must be >= 0 (got {s.temperature}); 0 is greedy",
                                 param="temperature")
        if s.temperature > self.gw.max_temperature:
            raise InvalidRequest(f"sampling.temperature {s.temperature} is above this server's limit of "
                                 f"{self.gw.max_temperature:g}", param="temperature")
        temperature = 0.0 if s.temperature < GREEDY_BELOW_TEMPERATURE else s.temperature
        top_p = s.top_p or 1.0
        if not 0 < top_p <= 1:  # NaN fails this too
            raise InvalidRequest(f"sampling.top_p must be in (0, 1] (got {s.top_p})", param="top_p")
        if s.top_k < 0:
            raise InvalidRequest(f"sampling.top_k must be >= 0 (got {s.top_k}); 0 disables it", param="top_k")
        if not (math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0):
            raise InvalidRequest(f"sampling.repetition_penalty must be > 0 (got {s.repetition_penalty}); 1 is none",
                                 param="repetition_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(s, name) <= 2:
                raise InvalidRequest(f"sampling.{name} must be in [-2, 2] (got {getattr(s, name)}); 0 is none",
                                     param=name)
        if not 0 <= s.min_p <= 1:
            raise InvalidRequest(f"sampling.min_p must be in [0, 1] (got {s.min_p}); 0 disables it", param="min_p")
        check_seed(s.seed)
        if s.min_tokens < 0:
            raise InvalidRequest(f"sampling.min_tokens must be >= 0 (got {s.min_tokens})", param="min_tokens")
        if len(s.stop) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in s.stop):
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters",
                                 param="stop")
        for stop in s.stop:
            check_unicode(stop, "stop")
        if temperature == s.temperature and top_p == s.top_p:
            return s
        return evolve(s, temperature=temperature, top_p=top_p)

    def expert(self, name: str, modality: str) -> None:
        if not name:
            return
        spec = self.config.expert(name)
        if spec is None:
            known = ", ".join(e.name for e in self.config.experts if e.modality == modality) or "none"
            kind = "known experts" if modality == "text" else "image experts"
            raise UnknownExpert(f"unknown expert {name[:64]!r}; {kind}: {known}", param="model")
        if spec.modality != modality:
            serves, use = ("images", "StreamImages or GenerateImage") if spec.modality == "image" else ("text", "Generate")
            raise InvalidRequest(f"expert {name!r} serves {serves}; use {use}", param="model")

    @staticmethod
    def request_id(request_id: str) -> None:
        if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
            raise InvalidRequest(f"request_id must be printable and at most {MAX_REQUEST_ID_CHARS} characters",
                                 param="request_id")

    def tenant(self, name: str, priority: Priority) -> tuple[str, Priority]:
        """The tenant to serve as ("default" when empty) and the priority it may use."""
        tenant = name or "default"
        if len(tenant) > MAX_TENANT_CHARS or not _TENANT.match(tenant):
            raise InvalidRequest(f"tenant must be 1-{MAX_TENANT_CHARS} letters, digits, '_', '.', '@' or '-'",
                                 param="tenant")
        if self.config.tenants:
            t = self.config.tenant(tenant)
            if t is None:
                raise InvalidRequest(f"unknown tenant {tenant!r}", param="tenant")
            return tenant, Priority(min(priority, t.max_priority_value))
        if tenant not in self._seen_tenants:
            if len(self._seen_tenants) >= MAX_UNLISTED_TENANTS:
                raise InvalidRequest(f"this server has seen {MAX_UNLISTED_TENANTS} tenant names; configure `tenants` "
                                     "to serve more", param="tenant")
            self._seen_tenants.add(tenant)
        return tenant, Priority(priority)

    def choices(self, choices: tuple[str, ...]) -> None:
        """Score: 1..max_score_choices non-empty candidate answers, each bounded in bytes."""
        gw = self.gw
        if not choices:
            raise InvalidRequest("choices is empty: send the candidate answers to score", param="choices")
        for i, c in enumerate(choices):
            check_unicode(c, f"choices[{i}]")
        big = max(len(c.encode("utf-8")) for c in choices)
        if len(choices) > gw.max_score_choices or big > gw.max_score_choice_bytes or not all(choices):
            raise InvalidRequest(f"send 1 to {gw.max_score_choices} non-empty choices of at most "
                                 f"{gw.max_score_choice_bytes} bytes each (got {len(choices)}, the largest {big} bytes)",
                                 param="choices")


def check_unicode(text: str, param: str) -> None:
    """Refuse text that is not valid Unicode: JSON can carry a lone UTF-16 surrogate
    (``"\\ud800"``), which no tokenizer can encode. It is the client's error, so it is refused
    here, before any expert is called (an expert failing on it would look like its own fault and
    be retried on another)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(text[exc.start])
        raise InvalidRequest(
            f"{param} is not valid Unicode text: a lone UTF-16 surrogate U+{bad:04X} at character {exc.start} "
            "(\\uD800-\\uDFFF escapes are only valid as a high-low pair that forms one character)",
            param=param,
        ) from None
