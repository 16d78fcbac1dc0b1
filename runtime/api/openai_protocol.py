"""OpenAI wire format <-> domain objects, nothing else (the HTTP twin of ``servicer.py``).

Requests are parsed by pydantic models that reject unknown keys and say which field is wrong.
vLLM's sampling extensions (repetition, presence and frequency penalties, min_p, min_tokens,
top_k, ignore_eos) are honoured by the engines. Fields that OpenAI or vLLM's OpenAI server define
and wattserve does not implement (``NEUTRAL_ONLY``: ``n``, ``echo``, ``logprobs``, ``store``, ...,
and the null fields of a response message sent back in a conversation) are accepted only at
their neutral value and refused otherwise, so a client never silently gets less than it asked
for; docs/http_api.md compares every field with vLLM's and OpenAI's. Range checks
(temperature, top_p, penalties, max_tokens, budgets, experts, tenants) are the gateway's,
shared with gRPC.

wattserve extensions, as body fields (``extra_body`` in the openai client) or headers (the body
wins when both are given): ``energy_budget_j`` / ``x-energy-budget-j``, ``latency_budget_ms`` /
``x-latency-budget-ms``, ``compute_budget`` / ``x-compute-budget`` (early exit), ``priority`` /
``x-priority`` (low, normal, high), ``tenant`` / ``x-tenant``, ``request_id`` /
``x-request-id``, ``deadline_ms`` / ``x-deadline-ms`` (work on the request stops that long after
it arrived; the answer so far comes back with ``finish_reason: "deadline"``). Responses carry
``usage.energy_joules`` and ``usage.energy_source`` and a ``wattserve`` object (expert, replica,
gateway TTFT and latency, routing decision, and ``early_exit`` when the expert decodes with
early exit).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wattserve.errors import InvalidRequest
from wattserve.types import ChatMessage, ExitUsage, Priority, SamplingParams

from ..gateway import Final, Request

AUTO_MODEL = "auto"  # the router chooses the expert

HEADER_FIELDS = {
    "x-energy-budget-j": "energy_budget_j",
    "x-latency-budget-ms": "latency_budget_ms",
    "x-compute-budget": "compute_budget",
    "x-priority": "priority",
    "x-tenant": "tenant",
    "x-request-id": "request_id",
    "x-deadline-ms": "deadline_ms",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    """Fields shared by completions and chat completions (honoured; see ``NEUTRAL_ONLY`` for the
    fields accepted only at their neutral value)."""

    model: str = AUTO_MODEL
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # an end-user id for the caller's own tracking; accepted, unused
    # sampling extensions, with vLLM's names and semantics (vLLM's OpenAI server accepts them too)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    top_k: int | None = None  # 0 or -1 (vLLM's spelling): disabled
    ignore_eos: bool | None = False
    # wattserve extensions (priority also takes vLLM's integer priority, at its default 0 only)
    energy_budget_j: float | None = None
    latency_budget_ms: float | None = None
    compute_budget: float | None = None  # early exit: share of full decoder depth per token, (0, 1]
    priority: Literal["low", "normal", "high"] | int | None = None
    tenant: str | None = None
    request_id: str | None = None
    deadline_ms: float | None = None  # stop work on the request this long after it arrives


class CompletionRequest(_GenerationRequest):
    # token ids are parsed so that they can be refused in words (see _single_prompt)
    prompt: str | list[str] | list[int] | list[list[int]]


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None
    name: str | None = None


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = None
    # OpenAI's tags and hints about the caller, like ``user``: accepted, unused
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


_TOKEN_IDS = "token ids mean different tokens to different experts' tokenizers"

#: Fields that OpenAI or vLLM's OpenAI server define and wattserve does not implement: accepted
#: only at these (neutral) values, refused otherwise with why. docs/http_api.md has the table.
NEUTRAL_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((None, 1), "one choice per request"),
    "best_of": ((None, 1), "no best-of sampling"),
    "use_beam_search": ((None, False), "no beam search"),
    "length_penalty": ((None, 1.0), "no beam search (length_penalty applies only to it)"),
    "logit_bias": ((None, {}), f"no logit bias ({_TOKEN_IDS})"),
    "logprobs": ((None, 0, False), "no log-probabilities in responses"),
    "top_logprobs": ((None, 0), "no log-probabilities in responses"),
    "prompt_logprobs": ((None,), "no log-probabilities in responses"),
    "logprob_token_ids": ((None, []), "no log-probabilities in responses"),
    "echo": ((None, False), "no prompt echo"),
    "suffix": ((None, ""), "no suffix (insertion)"),
    "stop_token_ids": ((None, []), f"stop strings only ({_TOKEN_IDS})"),
    "allowed_token_ids": ((None, []), f"no token allow-lists ({_TOKEN_IDS})"),
    "bad_words": ((None, []), "no banned words"),
    "include_stop_str_in_output": ((None, False), "stop strings are left out of the output"),
    "skip_special_tokens": ((None, True), "special tokens are always left out of the text"),
    "spaces_between_special_tokens": ((None, True), "special tokens are always left out of the text"),
    "truncate_prompt_tokens": ((None,), "no prompt truncation (a prompt over the expert's context is refused)"),
    "truncation_side": ((None,), "no prompt truncation"),
    "response_format": ((None, {"type": "text"}), "text responses only"),
    "structured_outputs": ((None,), "no structured outputs"),
    "watermarking": ((None, False), "no watermarking"),
    "session_id": ((None,), "no sessions"),
    "return_tokens_as_token_ids": ((None, False), "text responses only"),
    "return_token_ids": ((None, False), "text responses only (gRPC streams token ids)"),
    "return_token_offsets": ((None, False), "text responses only"),
    "routed_experts_prompt_start": ((None, 0), "no MoE routing traces"),
    "prompt_embeds": ((None,), "text prompts only"),
    "mm_payload": ((None, "tensors"), "text only"),
    "return_mm_kwargs": ((None, False), "text only"),
    "cache_salt": ((None,), "no prefix-cache salting"),
    "kv_transfer_params": ((None,), "no KV transfer between servers"),
    "ec_transfer_params": ((None,), "no encoder-cache transfer"),
    "vllm_xargs": ((None, {}), "no custom sampling extensions"),
    "repetition_detection": ((None,), "no repetition detection"),
    "thinking_token_budget": ((None,), "no reasoning budget"),
    "stream_interval": ((None, 1), "tokens are streamed as they arrive"),
}
_COMPLETION_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "add_special_tokens": ((None, True), "the expert's tokenizer adds its special tokens to a prompt"),
}
_CHAT_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "no tool calls"),
    "tool_choice": ((None, "none", "auto"), "no tool calls"),
    "parallel_tool_calls": ((None, False, True), "no tool calls"),
    "reasoning_effort": ((None,), "no reasoning models"),
    "include_reasoning": ((None, True), "no reasoning models"),
    "add_generation_prompt": ((None, True), "the expert's chat template always ends with the assistant's turn"),
    "continue_final_message": ((None, False), "the expert's chat template always ends with the assistant's turn"),
    "add_special_tokens": ((None, False), "the chat template holds the special tokens"),
    "documents": ((None, []), "no retrieval documents"),
    "chat_template": ((None,), "each expert uses its own chat template"),
    "chat_template_kwargs": ((None, {}), "each expert uses its own chat template"),
    "media_io_kwargs": ((None, {}), "text only"),
    "mm_processor_kwargs": ((None, {}), "text only"),
    "return_prompt_text": ((None, False), "text responses only"),
    # defined by OpenAI's API (openai-python's chat CompletionCreateParams), not by vLLM
    "audio": ((None,), "text responses only"),
    "modalities": ((None, ["text"]), "text responses only"),
    "functions": ((None, []), "no tool calls"),
    "function_call": ((None, "none", "auto"), "no tool calls"),
    "prediction": ((None,), "no predicted outputs"),
    "store": ((None, False), "no stored completions"),
    "service_tier": ((None, "auto", "default"),
                     "one service tier (priority and latency_budget_ms say how urgent a request is)"),
    "verbosity": ((None, "medium"), "no verbosity control (no reasoning models)"),
    "web_search_options": ((None,), "no web search"),
    "moderation": ((None,), "no moderation"),
    "prompt_cache_retention": ((None, "in_memory"), "no prompt-cache retention control"),
    "prompt_cache_options": ((None, {}), "no prompt-cache retention control"),
}
#: Fields of an OpenAI message that a client echoes back from an earlier response (e.g. a
#: ``ChatCompletionMessage.model_dump()``): accepted at their empty values.
_MESSAGE_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "refusal": ((None, ""), "no refusals (text content only)"),
    "annotations": ((None, []), "no annotations"),
    "audio": ((None,), "text content only"),
    "function_call": ((None,), "no tool calls"),
    "tool_calls": ((None, []), "no tool calls"),
}
#: OpenAI pads streamed chunks with random text to hide their lengths unless this is false;
#: this server sends no padding, so only the values that ask for none are accepted.
_STREAM_OPTIONS_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "include_obfuscation": ((None, False), "no stream obfuscation (no padding in chunks)"),
}
_ROLES = ("system", "developer", "user", "assistant")


def neutral_only(model: type[_Strict]) -> dict[str, tuple[tuple[Any, ...], str]]:
    """The neutral-only fields of a request model (completions or chat)."""
    return {**NEUTRAL_ONLY, **(_CHAT_ONLY if model is ChatRequest else _COMPLETION_ONLY)}


def _is_neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    # bool is an int in Python: `"echo": 0` or `"n": true` must not pass for False or 1
    for a in allowed:
        if isinstance(value, bool) or isinstance(a, bool):
            if type(value) is type(a) and value == a:
                return True
        elif isinstance(value, (int, float)) and isinstance(a, (int, float)):
            if value == a:
                return True
        elif type(value) is type(a) and value == a:
            return True
    return False


def parse_body(model: type[_Strict], body: object) -> _Strict:
    """Validate a decoded JSON body; InvalidRequest names every bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {type(body).__name__}",
                             reason="not_an_object")
    fields = dict(body)
    _pop_neutral(fields, neutral_only(model), "")
    for name, value in fields.items():  # pydantic's lax mode reads true as 1: `"max_tokens": true` is a slip
        info = model.model_fields.get(name)
        if isinstance(value, bool) and info is not None and {int, float} & set(get_args(info.annotation)):
            raise InvalidRequest(f"{name}: expected a number, got {json.dumps(value)}", param=name,
                                 reason="invalid_value")
    if isinstance(fields.get("stream_options"), dict):
        fields["stream_options"] = dict(fields["stream_options"])
        _pop_neutral(fields["stream_options"], _STREAM_OPTIONS_NEUTRAL, "stream_options.")
    if model is ChatRequest and isinstance(fields.get("messages"), list):
        fields["messages"] = [_check_message(n, m) for n, m in enumerate(fields["messages"])]
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _loc(first["loc"])
        problems = "; ".join(dict.fromkeys(_describe(e) for e in exc.errors()[:5]))  # a union repeats itself
        unknown = first["type"] == "extra_forbidden"
        raise InvalidRequest(problems, param=where, reason="unknown_field" if unknown else "invalid_value") from None


def _pop_neutral(fields: dict, table: dict[str, tuple[tuple[Any, ...], str]], prefix: str) -> None:
    """Remove the neutral-only fields of ``table`` from ``fields``; refuse any other value."""
    for name, (allowed, what) in table.items():
        if name in fields and not _is_neutral(value := fields.pop(name), allowed):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise InvalidRequest(f"{prefix}{name}={shown} is not supported: this server offers {what}; leave it out "
                                 f"or send {_neutral_text(allowed)}", param=prefix + name, reason="unsupported_value")


def _check_message(n: int, message: object) -> object:
    """One chat message with its echoed neutral fields removed; tool messages and non-text
    content parts are refused in words (pydantic would list every branch of the union)."""
    if not isinstance(message, dict):
        return message  # pydantic says what is wrong with it
    message = dict(message)
    where = f"messages[{n}]."
    role = message.get("role")
    if role in ("tool", "function"):
        raise InvalidRequest(f"{where}role={role!r} is not supported: this server offers no tool calls, so there "
                             f"are no tool results to send; roles are {', '.join(_ROLES)}",
                             param=where + "role", reason="unsupported_value")
    _pop_neutral(message, _MESSAGE_NEUTRAL, where)
    content = message.get("content")
    if isinstance(content, list):
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise InvalidRequest(f"{where}content[{k}] is a {kind!r} part: this server's experts read text only; "
                                     'send the content as a string or as {"type": "text", "text": ...} parts',
                                     param=f"{where}content[{k}].type", reason="unsupported_value")
    return message


_UNION_BRANCH = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|literal\[.*\]|function-\w+\[.*\])$")


def _loc(loc: tuple) -> str:
    """A pydantic error location as the client wrote it: ``messages[0].content``, without the
    names pydantic gives the branches of a union (``str``, ``list[...]``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _UNION_BRANCH.match(str(part)):
            out += f".{part}" if out else str(part)
    return out or "body"


def _neutral_text(allowed: tuple[Any, ...]) -> str:
    shown = [("null" if a is None else json.dumps(a)) for a in allowed]
    return " or ".join(shown)


def _describe(err: dict) -> str:
    where = _loc(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown field"
    if err["type"] == "missing":
        return f"{where}: required field is missing"
    return f"{where}: {err['msg']}"


def _header_extensions(headers: Mapping[str, str]) -> dict[str, Any]:
    """wattserve extensions given as headers, converted and checked for type."""
    out: dict[str, Any] = {}
    for header, field in HEADER_FIELDS.items():
        raw = headers.get(header)
        if raw is None:
            continue
        raw = raw.strip()
        if field.endswith(("_j", "_ms", "_budget")):
            try:
                value = float(raw)
            except ValueError:
                raise InvalidRequest(f"header {header}: {raw!r} is not a number", param=header) from None
            if not math.isfinite(value):
                raise InvalidRequest(f"header {header}: must be a finite number", param=header)
            out[field] = value
        elif field == "priority":
            if raw.lower() not in ("low", "normal", "high"):
                raise InvalidRequest(f"header {header}: {raw!r} is not one of low, normal, high", param=header)
            out[field] = raw.lower()
        else:
            out[field] = raw
    return out


def _chat_messages(messages: list[ChatMessageIn]) -> tuple[ChatMessage, ...]:
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        out.append(ChatMessage(role="system" if m.role == "developer" else m.role, content=content))
    return tuple(out)


def to_request(parsed: CompletionRequest | ChatRequest, headers: Mapping[str, str]) -> Request:
    """The gateway's request for a parsed OpenAI body plus its headers."""
    ext = _header_extensions(headers)
    for field in HEADER_FIELDS.values():
        if getattr(parsed, field) is not None:
            ext[field] = getattr(parsed, field)
    if isinstance(ext.get("priority"), int):  # vLLM's integer priority: only its default means anything here
        if ext["priority"] != 0 or isinstance(ext["priority"], bool):
            raise InvalidRequest(f"priority={ext['priority']!r}: this server's priorities are \"low\", \"normal\" "
                                 "and \"high\" (vLLM's integer priority is accepted only as 0, the default)",
                                 param="priority", reason="unsupported_value")
        del ext["priority"]
    if isinstance(parsed, ChatRequest):
        prompt, messages = "", _chat_messages(parsed.messages)
        max_tokens = parsed.max_completion_tokens if parsed.max_completion_tokens is not None else parsed.max_tokens
    else:
        prompt, messages, max_tokens = _single_prompt(parsed.prompt), (), parsed.max_tokens
    stop = (parsed.stop,) if isinstance(parsed.stop, str) else tuple(parsed.stop or ())
    # OpenAI's defaults (temperature 1, top_p 1) apply when the client leaves them out.
    sampling = SamplingParams(
        temperature=1.0 if parsed.temperature is None else parsed.temperature,
        top_p=1.0 if parsed.top_p is None else parsed.top_p,
        top_k=0 if parsed.top_k in (None, -1) else parsed.top_k,  # -1: vLLM's "disabled"
        seed=parsed.seed,
        stop=stop,
        ignore_eos=bool(parsed.ignore_eos),
        repetition_penalty=1.0 if parsed.repetition_penalty is None else parsed.repetition_penalty,
        presence_penalty=parsed.presence_penalty or 0.0,
        frequency_penalty=parsed.frequency_penalty or 0.0,
        min_p=parsed.min_p or 0.0,
        min_tokens=parsed.min_tokens or 0,
    )
    if max_tokens is not None and max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be positive (got {max_tokens})", param="max_tokens")
    deadline_ms = ext.get("deadline_ms")
    if deadline_ms is not None and not (math.isfinite(deadline_ms) and deadline_ms > 0):
        raise InvalidRequest(f"deadline_ms must be a positive number of milliseconds (got {deadline_ms})",
                             param="deadline_ms")
    model = parsed.model.strip()
    return Request(
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens or 0,
        sampling=sampling,
        expert="" if model in ("", AUTO_MODEL) else model,
        energy_budget_j=ext.get("energy_budget_j"),
        latency_budget_ms=ext.get("latency_budget_ms"),
        compute_budget=ext.get("compute_budget"),
        priority=Priority[ext["priority"].upper()] if "priority" in ext else Priority.NORMAL,
        tenant=ext.get("tenant", ""),
        request_id=ext.get("request_id") or uuid.uuid4().hex,
        timeout_s=None if deadline_ms is None else deadline_ms / 1000.0,
        api="http",
    )


def _single_prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> str:
    if isinstance(prompt, str):
        return prompt
    if prompt and not isinstance(prompt[0], str):
        raise InvalidRequest(
            "prompt is a list of token ids, which this server does not serve: it routes each request to one of "
            f"several experts whose tokenizers differ, so {_TOKEN_IDS}; send the prompt as text",
            param="prompt", reason="token_ids")
    if len(prompt) != 1:
        raise InvalidRequest(f"prompt lists {len(prompt)} prompts; send one per request", param="prompt",
                             reason="unsupported_value")
    return prompt[0]


# -- responses --------------------------------------------------------------------------------
def usage_body(final: Final) -> dict[str, Any]:
    u = final.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "energy_joules": u.energy_j,
        "energy_source": u.energy_source,
    }


def wattserve_body(final: Final) -> dict[str, Any]:
    """What the gRPC Usage message says beyond OpenAI's usage: who answered, how fast, why."""
    return {
        "expert": final.expert,
        "replica": final.replica,
        "ttft_ms": final.ttft_ms,
        "total_latency_ms": final.total_latency_ms,
        "expert_ttft_ms": final.usage.ttft_ms,
        "routing_policy": final.plan.policy,
        "routing_reason": final.plan.reason,
        "request_id": final.request_id,
        "gate": final.plan.gate,
        "subset": list(final.plan.subset),
        "predicted_energy_j": final.plan.predicted_energy_j,
        "budget_exceeded": final.plan.budget_exceeded,
        "cascade": list(final.plan.cascaded),
        **({"early_exit": exit_body(final.usage.exits)} if final.usage.exits is not None else {}),
    }


def exit_body(e: ExitUsage) -> dict[str, Any]:
    """Early exit's per-request figures, named as in the gRPC Usage message."""
    return {
        "num_layers": e.num_layers,
        "avg_exit_layer": e.avg_exit_layer,
        "layers_skipped": e.layers_skipped,
        "compute_fraction": e.compute_fraction,
        "energy_saved_j": e.energy_saved_j,
        "energy_saved_net_j": e.energy_saved_net_j,
        "operating_point": e.operating_point,
    }


def response_id(chat: bool, request_id: str) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + request_id


def full_response(chat: bool, request_id: str, text: str, final: Final) -> dict[str, Any]:
    """A non-streaming ``text_completion`` or ``chat.completion`` body."""
    reason = final.usage.finish_reason.value
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    return {
        "id": response_id(chat, request_id),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": final.expert,
        "choices": [choice],
        "usage": usage_body(final),
        "wattserve": wattserve_body(final),
    }


class StreamFormatter:
    """Builds the SSE ``data:`` payloads of one streamed response."""

    def __init__(self, chat: bool, request_id: str, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.id = response_id(chat, request_id)
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())
        self._role_sent = False

    def _chunk(self, choices: list[dict], **extra: Any) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        return body

    def text(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text or finish_reason is None else {}
            if not self._role_sent:
                delta["role"] = "assistant"
                self._role_sent = True
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return self._chunk([choice])

    def final(self, final: Final) -> list[dict[str, Any]]:
        """The closing chunk (finish reason and the wattserve object) and, if asked, the usage chunk."""
        self.model = final.expert
        last = self.text("", final.usage.finish_reason.value)
        last["wattserve"] = wattserve_body(final)
        out = [last]
        if self.include_usage:
            out.append(self._chunk([], usage=usage_body(final)))
        return out
