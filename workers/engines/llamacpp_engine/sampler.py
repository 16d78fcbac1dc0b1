"""Next-token choice for one sequence, over the float32 logits llama.cpp leaves for its row.

A sampler is a chain of logit processors followed by a pick (argmax at temperature 0, else a
seeded draw). The chain is built once per request from its :class:`SamplingParams`; a processor
is a function ``(scores, state) -> scores`` plus the rule that says when it applies, so a new
sampling option is one function and one line in :data:`PROCESSORS`.

The options follow the torch sampler's (vLLM's) semantics: the repetition penalty covers every
token of the prompt and the output, the frequency and presence penalties the output only; options
are read with ``getattr`` and their neutral defaults, so a SamplingParams without them samples
as before.

Each request draws from its own ``numpy.random.Generator`` seeded with its ``seed``, so a seeded
request samples the same tokens whatever else shares its batch. The answer's log-probability
is taken from the model's own distribution (the raw logits), like the torch engine's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from wattserve.types import SamplingParams

_NEG_INF = np.float32(-np.inf)
#: candidates sorted before top-p falls back to sorting the whole vocabulary
_TOP_P_WINDOW = 1024


@dataclass(slots=True)
class SamplerState:
    """What processors may read about the sequence so far."""

    generated: list[int] = field(default_factory=list)  # completion token ids so far
    prompt: tuple[int, ...] = ()  # prompt token ids (the repetition penalty sees them too)
    eog_ids: frozenset[int] = frozenset()  # end-of-generation ids (EOS, EOT, <|im_end|>, ...)


def option(params: SamplingParams, name: str, default):
    """A sampling option, or its neutral default where this build's SamplingParams lacks it."""
    return getattr(params, name, default)


# -- processors: (scores, state, params) -> scores; scores is a float32 copy they may modify ----
def penalties(scores: np.ndarray, state: SamplerState, params: SamplingParams) -> np.ndarray:
    """vLLM's penalties: the repetition penalty (CTRL's, as in HF) divides positive and multiplies
    negative logits of every token seen in the prompt or the output; the frequency penalty is
    subtracted once per occurrence in the output, the presence penalty once for any occurrence."""
    rep = float(option(params, "repetition_penalty", 1.0))
    if rep != 1.0:
        seen = np.fromiter(set(state.prompt).union(state.generated), dtype=np.int64)
        seen = seen[seen < scores.shape[0]]
        vals = scores[seen]
        scores[seen] = np.where(vals > 0, vals / rep, vals * rep)
    freq = float(option(params, "frequency_penalty", 0.0))
    pres = float(option(params, "presence_penalty", 0.0))
    if (freq or pres) and state.generated:
        ids, counts = np.unique(np.asarray(state.generated, dtype=np.int64), return_counts=True)
        keep = ids < scores.shape[0]
        ids, counts = ids[keep], counts[keep]
        scores[ids] -= np.float32(freq) * counts.astype(np.float32) + np.float32(pres)
    return scores


def _penalised(params: SamplingParams) -> bool:
    return (float(option(params, "repetition_penalty", 1.0)) != 1.0
            or float(option(params, "frequency_penalty", 0.0)) != 0.0
            or float(option(params, "presence_penalty", 0.0)) != 0.0)


def min_tokens(scores: np.ndarray, state: SamplerState, params: SamplingParams) -> np.ndarray:
    """No end-of-generation token before ``min_tokens`` completion tokens."""
    scores[list(state.eog_ids)] = _NEG_INF
    return scores


def temperature(scores: np.ndarray, state: SamplerState, params: SamplingParams) -> np.ndarray:
    scores /= np.float32(params.temperature)
    return scores


def top_k(scores: np.ndarray, state: SamplerState, params: SamplingParams) -> np.ndarray:
    if params.top_k >= scores.shape[0]:
        return scores
    kth = np.partition(scores, -params.top_k)[-params.top_k]
    scores[scores < kth] = _NEG_INF
    return scores


def top_p(scores: np.ndarray, state: SamplerState, params: SamplingParams) -> np.ndarray:
    """Keep the smallest set of best tokens whose probability mass reaches ``top_p`` (always at
    least the best). Sorting 262k logits per token is slow, so the best ``_TOP_P_WINDOW`` are
    sorted first; only if their mass falls short is the whole vocabulary sorted. Exact either way."""
    probs = _softmax(scores)
    n = probs.shape[0]
    window = min(n, _TOP_P_WINDOW)
    cand = np.argpartition(probs, n - window)[n - window :] if window < n else np.arange(n)
    order = cand[np.argsort(-probs[cand], kind="stable")]
    mass_before = np.cumsum(probs[order]) - probs[order]
    if window < n and mass_before[-1] + probs[order[-1]] < params.top_p:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
    keep = order[mass_before < params.top_p]
    out = np.full_like(scores, _NEG_INF)
    out[keep] = scores[keep]
    return out


def min_p(scores: np.ndarray, state: SamplerState, params: SamplingParams) -> np.ndarray:
    """Drop tokens less likely than ``min_p`` times the best token's probability."""
    probs = _softmax(scores)
    scores[probs < float(option(params, "min_p", 0.0)) * probs.max()] = _NEG_INF
    return scores


Rule = Callable[[SamplingParams], bool]
Processor = Callable[[np.ndarray, SamplerState, SamplingParams], np.ndarray]

#: processors in the order they apply (the torch sampler's), each with the rule that switches it
#: on. Penalties and the EOS mask act at any temperature; the filters only where a token is drawn.
PROCESSORS: tuple[tuple[Rule, Processor], ...] = (
    (_penalised, penalties),
    (lambda p: int(option(p, "min_tokens", 0)) > 0, min_tokens),
    (lambda p: p.temperature > 0, temperature),
    (lambda p: p.temperature > 0 and float(option(p, "min_p", 0.0)) > 0, min_p),
    (lambda p: p.temperature > 0 and 0 < p.top_k, top_k),
    (lambda p: p.temperature > 0 and p.top_p < 1.0, top_p),
)


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max())
    return e / e.sum()


def log_prob(logits: np.ndarray, token: int) -> float:
    """log p(token) under the model's distribution (natural log)."""
    m = float(logits.max())
    return float(logits[token]) - m - math.log(float(np.exp(logits - m).sum()))


class Sampler:
    """The chain for one request; :meth:`pick` returns the next token id."""

    def __init__(self, params: SamplingParams, eog_ids: frozenset[int], vocab_size: int,
                 prompt_ids: tuple[int, ...] | list[int] = ()) -> None:
        self.params = params
        self.state = SamplerState(eog_ids=eog_ids, prompt=tuple(prompt_ids))
        self.vocab_size = vocab_size
        self._chain = [proc for applies, proc in PROCESSORS if applies(params)]
        self._min_tokens = int(option(params, "min_tokens", 0))
        self._rng = np.random.default_rng(params.seed) if params.temperature > 0 else None

    def pick(self, logits: np.ndarray) -> int:
        """Choose from ``logits`` (the model's row, left untouched) and record the choice."""
        chain = self._chain
        if self._min_tokens and len(self.state.generated) >= self._min_tokens:
            chain = [p for p in chain if p is not min_tokens]
        if not chain:
            token = int(np.argmax(logits))
        else:
            scores = np.array(logits[: self.vocab_size], dtype=np.float32)  # a copy the chain may change
            for proc in chain:
                scores = proc(scores, self.state, self.params)
            token = int(np.argmax(scores)) if self._rng is None else self._draw(scores)
        self.state.generated.append(token)
        return token

    def _draw(self, scores: np.ndarray) -> int:
        probs = _softmax(scores).astype(np.float64)
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"), len(cdf) - 1))
