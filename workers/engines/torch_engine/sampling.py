"""Next-token selection and incremental detokenization for the torch engine."""

from __future__ import annotations

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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one token from float32 ``logits (vocab,)``: greedy at temperature 0, else
    temperature, top-k and top-p (nucleus) filtering, then a draw."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
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
