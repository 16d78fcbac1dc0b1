"""Next-token selection and incremental detokenization for the torch engine."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from wattserve.types import SamplingParams

from ..stops import StopChecker  # noqa: F401 - re-exported: the torch engine's callers import it here


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request RNG so a seeded request samples the same tokens whatever its batch."""
    if params.temperature == 0 or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    *,
    prompt_ids: Sequence[int] = (),
    output_ids: Sequence[int] = (),
    banned_ids: Collection[int] = (),
) -> int:
    """Pick one token from float32 ``logits (vocab,)``, in vLLM's order: ``banned_ids`` (EOS
    while ``min_tokens`` is not reached) masked, repetition / frequency / presence penalties over
    the prompt and ``output_ids`` so far, then greedy at temperature 0, else temperature, min-p,
    top-k and top-p (nucleus) filtering, then a draw."""
    scores = apply_penalties(logits, params, prompt_ids, output_ids)
    if banned_ids:
        scores = scores.clone() if scores is logits else scores
        scores[list(banned_ids)] = float("-inf")
    if params.temperature == 0:
        return int(torch.argmax(scores))
    scores = scores / params.temperature
    if params.min_p > 0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop = torch.cumsum(probs, dim=-1) - probs >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> torch.Tensor:
    """vLLM's penalties (``vllm/model_executor/layers/utils.py``'s semantics): the repetition
    penalty divides positive and multiplies negative logits of every token seen in the prompt or
    the output; the frequency penalty is subtracted once per occurrence in the output, the
    presence penalty once for any occurrence. Returns ``logits`` itself when all are neutral."""
    rep, freq, pres = params.repetition_penalty, params.frequency_penalty, params.presence_penalty
    if rep == 1.0 and freq == 0.0 and pres == 0.0:
        return logits
    vocab = logits.shape[-1]
    out = torch.tensor([t for t in output_ids if 0 <= t < vocab], dtype=torch.long, device=logits.device)
    counts = torch.bincount(out, minlength=vocab).to(logits.dtype)
    scores = logits.clone()
    if rep != 1.0:
        seen = counts > 0
        prompt = torch.tensor([t for t in prompt_ids if 0 <= t < vocab], dtype=torch.long, device=logits.device)
        seen[prompt] = True
        scores = torch.where(seen, torch.where(scores > 0, scores / rep, scores * rep), scores)
    return scores - freq * counts - pres * (counts > 0).to(logits.dtype)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Byte-level and sentencepiece tokenizers can split one character over several tokens, and
    some insert a space depending on the previous token, so we decode a short window of recent
    tokens twice (with and without the new ones) and emit the difference, holding back output
    that ends in an incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, tokenizer, prompt_ids: list[int], window: int = 6) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-window:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""
