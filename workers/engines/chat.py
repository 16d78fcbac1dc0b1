"""Turning a chat conversation into prompt tokens, on the expert side.

Only the expert knows its model's chat format, so the gateway forwards ``messages`` untouched and
every engine calls :func:`encode_prompt`. A tokenizer that carries a chat template (SmolLM2's
``<|im_start|>`` turns) renders the conversation with it and a generation prompt for the
assistant; the rendered text already holds the special tokens the template wants, so it is
tokenized without adding more. A tokenizer without one (Gemma 3's GGUF ships none) gets
:func:`render_plain`, a simple documented format that any base model can continue::

    System: Be brief.

    User: What is the capital of France?

    Assistant:

That text is tokenized like a plain prompt (the tokenizer's own BOS rule applies). The plain
format has no end-of-turn token, so a model would go on to write the user's next turn: such a
chat also stops where the model starts a new ``Role:`` line (:func:`encode_checked`), unless the
request sets ``ignore_eos``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from wattserve.errors import InvalidRequest
from wattserve.types import ChatMessage, GenerateCall

ROLES = ("system", "user", "assistant")
_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_STOPS = tuple(f"\n{label}:" for label in _LABELS.values())  # a plain-format chat's turn boundaries


def render_plain(messages: Sequence[ChatMessage]) -> str:
    """The fallback chat format: ``Role: content`` turns separated by blank lines, ending with
    ``Assistant:`` so the model answers as the assistant."""
    turns = [f"{_LABELS[m.role]}: {m.content}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """Raise InvalidRequest unless ``messages`` is a non-empty conversation of known roles."""
    if not messages:
        raise InvalidRequest("messages is empty: send at least one message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role {m.role!r} is not one of {', '.join(ROLES)}")


def encode_prompt(tokenizer, call: GenerateCall) -> list[int]:
    """Prompt token ids for ``call``: its ``prompt`` as is, or its ``messages`` rendered with the
    tokenizer's chat template (or :func:`render_plain` where it has none)."""
    if not call.messages:
        return list(tokenizer(call.prompt).input_ids)
    check_messages(call.messages)
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": m.role, "content": m.content} for m in call.messages]
        try:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - templates raise on conversations they reject
            raise InvalidRequest(f"the model's chat template rejected these messages: {exc}") from None
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(render_plain(call.messages)).input_ids)


SEED_LIMIT = 2**64  # seeds are uint64, as gRPC's SamplingParams.seed


def check_seed(seed: int | None) -> None:
    """A seed outside [0, 2^64) is refused here, before queueing: numpy's generator raises on a
    negative one mid-batch, which took the engine (and every request in its batch) down."""
    if seed is not None and not 0 <= seed < SEED_LIMIT:  # HTTP's JSON integer is unbounded
        raise InvalidRequest(f"sampling.seed must be in [0, 2^64) (got {seed}); leave it out for a random seed",
                             param="seed")


def encode_checked(
    tokenizer, call: GenerateCall, *, expert: str, max_model_len: int
) -> tuple[list[int], GenerateCall]:
    """:func:`encode_prompt` plus the checks every text engine makes before queueing: a prompt
    that is not empty, and prompt plus ``max_tokens`` within ``max_model_len``. Returns the ids
    and the call as the engine must run it (a plain-format chat gains :data:`TURN_STOPS`). The
    caller holds its tokenizer lock (fast tokenizers are not safe for concurrent use)."""
    if not call.prompt and not call.messages:
        raise InvalidRequest("prompt is empty: send at least one character of text")
    check_seed(call.sampling.seed)
    ids = encode_prompt(tokenizer, call)
    if not ids:
        raise InvalidRequest("prompt tokenizes to nothing")
    if len(ids) >= max_model_len:  # no max_tokens would fit: the prompt itself must shrink
        raise InvalidRequest(
            f"prompt has {len(ids)} tokens, but expert {expert!r} allows at most {max_model_len} tokens in total "
            f"(prompt + max_tokens): shorten the prompt to at most {max_model_len - 1} tokens"
        )
    if len(ids) + call.max_tokens > max_model_len:
        raise InvalidRequest(
            f"prompt has {len(ids)} tokens and max_tokens is {call.max_tokens}, but expert "
            f"{expert!r} allows at most {max_model_len} tokens in total: shorten the "
            f"prompt or lower max_tokens to {max_model_len - len(ids)}"
        )
    s = call.sampling
    if call.messages and not getattr(tokenizer, "chat_template", None) and not s.ignore_eos:
        call = replace(call, sampling=replace(s, stop=s.stop + tuple(t for t in TURN_STOPS if t not in s.stop)))
    return ids, call


def prompt_text(call: GenerateCall) -> str:
    """The text an engine without a tokenizer (the synthetic one) reads: the prompt, or the
    conversation in the plain format."""
    if not call.messages:
        return call.prompt
    check_messages(call.messages)
    return render_plain(call.messages)
