"""Offline routers that only exist in the evaluator: RouterBench's kNN and MLP baselines, and the
oracle's curve.

RouterBench (Hu et al. 2024, our reading) routes with a per-model quality predictor and a
willingness to pay: expert ``argmax_i q̂_i(x) - λ·c_i``, λ swept into a curve. Its two
predictors: the mean quality of the k nearest training prompts (cosine distance on the prompt
embedding) and an MLP regressing every model's quality from the embedding. Here the cost is the
expert's energy per request in joules. The oracle uses the true qualities with the same rule,
which traces the least energy that reaches each quality with perfect knowledge.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np


def knn_predict(train_x: np.ndarray, train_q: np.ndarray, test_x: np.ndarray, k: int = 40, batch: int = 512,
                tau: float = 0.0, train_normalised: bool = False) -> np.ndarray:
    """Mean quality (N_test, experts) of the ``k`` training rows nearest in cosine distance;
    ``tau`` > 0 weights each of them by ``exp((s - s_max) / tau)``, ``s`` its cosine similarity
    (nearer counts more; 0: the plain mean, RouterBench's kNN). ``train_normalised``: the
    training rows are already L2-normalised (the serving gate's neighbours: no copy per call)."""
    if len(train_x) == 0:
        raise ValueError("kNN needs training rows")
    k = max(1, min(k, len(train_x)))
    a = train_x if train_normalised else train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    b = test_x / np.maximum(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12)
    out = np.empty((len(test_x), train_q.shape[1]), dtype=np.float64)
    for i in range(0, len(b), batch):
        chunk = b[i:i + batch]
        # One request: numpy's own loop, not BLAS (whose threads, woken for a 1 x N product, cost
        # milliseconds on a busy host: benchmarks/bench_selector.py); batches: BLAS.
        sim = np.einsum("ij,kj->ik", chunk, a) if len(chunk) <= 8 else chunk @ a.T
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < sim.shape[1] else np.broadcast_to(
            np.arange(k), sim.shape)
        if tau > 0:
            s = np.take_along_axis(sim, nearest, axis=1).astype(np.float64)
            out[i:i + batch] = kernel_mean(train_q[nearest], s, tau)
        else:
            out[i:i + batch] = train_q[nearest].mean(axis=1)
    return out


def kernel_mean(labels: np.ndarray, sims: np.ndarray, tau: float) -> np.ndarray:
    """Weighted mean over axis 1 of ``labels`` (N, k, E) with weights ``exp((sims - max) / tau)``."""
    w = np.exp((sims - sims.max(axis=1, keepdims=True)) / tau)
    return np.einsum("nk,nke->ne", w, labels) / w.sum(axis=1, keepdims=True)


def mlp_predict(train_x: np.ndarray, train_q: np.ndarray, test_x: np.ndarray, *, hidden: int = 100, epochs: int = 60,
                lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0) -> np.ndarray:
    """An MLP regressor (one hidden ReLU layer, squared error, Adam) of every expert's quality."""
    import torch

    if len(train_x) == 0:
        raise ValueError("the MLP needs training rows")
    with one_thread():
        return _fit_mlp(torch, train_x, train_q, test_x, hidden, epochs, lr, weight_decay, seed)


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread: nets this small train fastest so (two threads on a busy 2-core host
    were ~15x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_mlp(torch, train_x, train_q, test_x, hidden, epochs, lr, weight_decay, seed) -> np.ndarray:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(train_x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, train_q.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    xt = torch.as_tensor(train_x, dtype=torch.float32)
    yt = torch.as_tensor(train_q, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(128):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    with torch.inference_mode():
        return net(torch.as_tensor(test_x, dtype=torch.float32)).numpy().astype(np.float64)


def price_grid(pred: np.ndarray, energy_j: np.ndarray, steps: int) -> list[float]:
    """Prices λ (quality per joule) at which ``argmax q - λE`` flips between two experts on some
    row, (q_i - q_j) / (E_i - E_j) for E_i > E_j and q_i > q_j; their quantiles span every mix."""
    de = energy_j[:, None] - energy_j[None, :]
    flips = []
    for row in pred:
        dq = row[:, None] - row[None, :]
        m = (de > 0) & (dq > 0)
        flips.extend((dq[m] / de[m]).tolist())
    if not flips:
        return [0.0]
    grid = np.quantile(np.asarray(flips), np.linspace(0, 1, max(2, steps))).tolist()
    return sorted({0.0, *grid, max(flips) * 1.01})


def choose_by_price(pred: np.ndarray, energy_j: np.ndarray, price: float) -> np.ndarray:
    """Per row the expert maximising ``pred - price * energy`` (ties go to the cheaper expert)."""
    order = np.argsort(energy_j, kind="stable")
    score = pred[:, order] - price * energy_j[order][None, :]
    return order[np.argmax(score, axis=1)]


def price_curve(pred: np.ndarray, quality: np.ndarray, energy_j: np.ndarray, names: Sequence[str],
                steps: int) -> list[tuple[float, float, str, dict[str, float]]]:
    """Points (mean energy J, mean quality, knob, routing shares) of ``argmax pred - λE`` over λ."""
    rows = np.arange(len(quality))
    points = []
    for lam in price_grid(pred, energy_j, steps):
        pick = choose_by_price(pred, energy_j, lam)
        shares = np.bincount(pick, minlength=len(names)) / max(1, len(pick))
        points.append((float(energy_j[pick].mean()), float(quality[rows, pick].mean()), f"price {lam:.3g}",
                       {n: float(s) for n, s in zip(names, shares, strict=True)}))
    return points
