"""Choosing the gate's blend by cross-validation inside the training rows.

The fitted gate predicts ``q_i(x) = (1 - w) sigmoid(z_i(x)) + w knn_i(x)`` (``router/gate.py``):
an MLP and the mean quality of the ``k`` nearest training prompts. Its knobs — the MLP's training
length and weight decay, ``k`` and the weight ``w`` — and whether a per-expert Platt calibration
of the blend helps are chosen here from the *training* rows alone:

1. the training rows are cut into ``folds`` seeded folds; for each fold the MLP is trained on the
   others (once per weight decay, its predictions read after each candidate number of epochs)
   and the nearest neighbours are looked up among the others (every candidate ``k`` from one
   sort), which gives an out-of-fold prediction of every training row for every candidate;
2. every combination (epochs, weight decay, k, w) is scored by the out-of-fold log-loss
   (binary cross-entropy against the labels; a proper scoring rule: lowest where the predicted
   qualities are the expected ones, which is what ``argmax q - price E`` compares); the lowest
   wins (ties: the earlier in the grids, i.e. shorter training, fewer neighbours, less weight);
3. per-expert Platt scaling ``sigmoid(a logit(q) + b)`` of the chosen blend is cross-fitted over
   the same folds (fitted on the other folds' out-of-fold predictions, scored on the fold) and
   kept only if it lowers that log-loss.

Nothing here sees a row it is not given; ``gate fit`` and ``route eval`` give it their training
split only (tests/router/test_gate_cv.py checks that changing the evaluated rows changes nothing).
Pure numpy apart from the MLP's training (torch, through ``router/gate_fit.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

EPOCHS = (10, 20, 40, 80)
WEIGHT_DECAYS = (1e-3, 1e-1)
KNN_KS = (10, 20, 40, 80)
KNN_TAUS = (0.0,)  # kernel widths tried (0: the plain mean of the k nearest)
KNN_WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 11))
DEFAULT_FOLDS = 5
_EPS = 1e-4


@dataclass(slots=True)
class BlendChoice:
    """The chosen knobs, their out-of-fold log-loss, and the per-expert calibration (or None)."""

    epochs: int
    weight_decay: float
    knn_k: int
    knn_weight: float
    knn_tau: float  # 0: plain mean of the k nearest; > 0: weights exp((s - s_max) / tau)
    calibration: list[list[float]] | None  # per expert [a, b] of sigmoid(a logit(q) + b)
    cv_logloss: float  # of the chosen blend, calibrated when calibration is kept
    cv_logloss_uncalibrated: float
    cv_logloss_mlp_alone: float  # best MLP-only (w = 0) combination, for the record
    cv_logloss_knn_alone: float  # best kNN-only (w = 1) combination
    folds: int
    rows: int
    grid: dict[str, list] = field(default_factory=dict)

    def record(self) -> dict:
        """What ``gate.json`` keeps under ``inner_cv``."""
        return asdict(self)


def inner_folds(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """Seeded partition of ``range(n)`` into ``folds`` index arrays of near-equal size."""
    if folds < 2 or n < folds:
        raise ValueError(f"inner cross-validation needs >= 2 folds and at least one row per fold, got {folds} folds, {n} rows")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(f) for f in np.array_split(order, folds)]


def logloss(p: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of predictions ``p`` against labels ``y`` in [0, 1] (soft allowed)."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(y, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def knn_sorted(train_x: np.ndarray, test_x: np.ndarray, k_max: int) -> np.ndarray:
    """Indices of each test row's ``k_max`` nearest training rows (cosine), nearest first."""
    return knn_sorted_sims(train_x, test_x, k_max)[0]


def knn_sorted_sims(train_x: np.ndarray, test_x: np.ndarray, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """(:func:`knn_sorted`'s indices, their cosine similarities)."""
    a = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    b = test_x / np.maximum(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12)
    sim = b @ a.T
    k_max = min(k_max, len(train_x))
    part = np.argpartition(-sim, k_max - 1, axis=1)[:, :k_max]
    order = np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(sim, idx, axis=1).astype(np.float64)


def _oof(x, y, folds, epochs_grid, wd_grid, k_grid, tau_grid, seed, hidden, dropout, on_fold):
    """Out-of-fold predictions: {(wd, epochs): (N, E)} for the MLP and {(k, tau): (N, E)} for kNN."""
    import torch

    from .eval_baselines import one_thread
    from .gate_fit import train_mlp_epochs

    n, e = y.shape
    mlp = {(wd, ep): np.zeros((n, e)) for wd in wd_grid for ep in epochs_grid}
    knn = {(k, t): np.zeros((n, e)) for k in k_grid for t in tau_grid}
    last = max(epochs_grid)
    for f, val in enumerate(folds):
        fit = np.setdiff1d(np.arange(n), val, assume_unique=True)
        xv = torch.as_tensor(x[val])
        for wd in wd_grid:
            with one_thread():
                for epoch, net in train_mlp_epochs(x[fit], y[fit], epochs=last, hidden=hidden, weight_decay=wd,
                                                   dropout=dropout, seed=seed + f):
                    if epoch in epochs_grid:
                        net.eval()
                        with torch.inference_mode():
                            z = net(xv).numpy().astype(np.float64)
                        mlp[(wd, epoch)][val] = 1.0 / (1.0 + np.exp(-z))
        from .eval_baselines import kernel_mean

        nearest, sims = knn_sorted_sims(x[fit], x[val], max(k_grid))
        labels = y[fit][nearest]  # (val, k_max, E)
        csum = np.cumsum(labels, axis=1)
        for k in k_grid:
            kk = min(k, nearest.shape[1])
            for t in tau_grid:
                knn[(k, t)][val] = csum[:, kk - 1] / kk if t <= 0 else kernel_mean(labels[:, :kk], sims[:, :kk], t)
        if on_fold:
            on_fold(f)
    return mlp, knn


def fit_platt(p: np.ndarray, y: np.ndarray, iters: int = 50, ridge: float = 1e-3) -> tuple[float, float]:
    """(a, b) minimising the log-loss of ``sigmoid(a logit(p) + b)`` against ``y`` (Newton steps,
    a small ridge toward the identity a = 1, b = 0)."""
    z = _logit(np.asarray(p, dtype=np.float64).ravel())
    y = np.asarray(y, dtype=np.float64).ravel()
    theta = np.array([1.0, 0.0])
    feats = np.stack([z, np.ones_like(z)], axis=1)
    for _ in range(iters):
        s = 1.0 / (1.0 + np.exp(-(feats @ theta)))
        grad = feats.T @ (s - y) / len(y) + ridge * (theta - [1.0, 0.0])
        hess = (feats * (s * (1 - s))[:, None]).T @ feats / len(y) + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if np.abs(step).max() < 1e-9:
            break
    return float(theta[0]), float(theta[1])


def apply_calibration(p: np.ndarray, calibration: Sequence[Sequence[float]] | None) -> np.ndarray:
    """Per-expert Platt scaling of qualities ``p`` (N, E); ``None`` returns ``p`` unchanged."""
    if calibration is None:
        return p
    ab = np.asarray(calibration, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-(ab[:, 0] * _logit(np.asarray(p, dtype=np.float64)) + ab[:, 1])))


def _cross_fitted_platt(p: np.ndarray, y: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    out = np.empty_like(p)
    n = len(p)
    for val in folds:
        fit = np.setdiff1d(np.arange(n), val, assume_unique=True)
        cal = [fit_platt(p[fit, i], y[fit, i]) for i in range(p.shape[1])]
        out[val] = apply_calibration(p[val], cal)
    return out


def choose_blend(x: np.ndarray, y: np.ndarray, *, folds: int = DEFAULT_FOLDS, seed: int = 0,
                 epochs: Iterable[int] = EPOCHS, weight_decay: Iterable[float] = WEIGHT_DECAYS,
                 knn_k: Iterable[int] = KNN_KS, knn_weight: Iterable[float] = KNN_WEIGHTS,
                 knn_tau: Iterable[float] = KNN_TAUS,
                 calibrate: bool | None = False, hidden: int = 64, dropout: float = 0.1,
                 on_fold: Callable[[int], None] | None = None) -> BlendChoice:
    """Choose the blend on (``x``, ``y``) — the training rows, nothing else — by ``folds``-fold
    out-of-fold log-loss (module docstring). A knob given as one value is fixed; ``calibrate``
    None lets the folds decide, True/False forces it (default off: on the evaluated halves of
    docs/benchmarks.md it lowered the saving on both many-expert sets)."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float64)
    grids = {"epochs": sorted({int(v) for v in epochs}), "weight_decay": sorted({float(v) for v in weight_decay}),
             "knn_k": sorted({int(v) for v in knn_k}), "knn_tau": sorted({float(v) for v in knn_tau}),
             "knn_weight": sorted({float(v) for v in knn_weight})}
    if not all(grids.values()):
        raise ValueError(f"every grid needs a value: {grids}")
    if (min(grids["epochs"]) < 1 or min(grids["knn_k"]) < 1 or min(grids["knn_tau"]) < 0
            or not 0 <= min(grids["knn_weight"]) <= max(grids["knn_weight"]) <= 1):
        raise ValueError(f"bad grid: {grids}")
    parts = inner_folds(len(x), folds, seed)
    mlp, knn = _oof(x, y, parts, grids["epochs"], grids["weight_decay"], grids["knn_k"], grids["knn_tau"], seed,
                    hidden, dropout, on_fold)
    best, best_key = np.inf, None
    by_weight: dict[float, float] = {}
    for wd in grids["weight_decay"]:
        for ep in grids["epochs"]:
            for kt in knn:
                for w in grids["knn_weight"]:
                    loss = round(logloss((1 - w) * mlp[(wd, ep)] + w * knn[kt], y), 6)
                    by_weight[w] = min(by_weight.get(w, np.inf), loss)
                    if loss < best:  # strict: ties keep the earlier (simpler) combination
                        best, best_key = loss, (wd, ep, kt, w)
    wd, ep, (k, tau), w = best_key
    p = (1 - w) * mlp[(wd, ep)] + w * knn[(k, tau)]
    calibration, chosen = None, best
    if calibrate is not False:
        cal_loss = round(logloss(_cross_fitted_platt(p, y, parts), y), 6)
        if calibrate or cal_loss < best:
            calibration = [list(fit_platt(p[:, i], y[:, i])) for i in range(y.shape[1])]
            chosen = cal_loss
    return BlendChoice(epochs=ep, weight_decay=wd, knn_k=k, knn_weight=w, knn_tau=tau, calibration=calibration,
                       cv_logloss=chosen, cv_logloss_uncalibrated=best,
                       cv_logloss_mlp_alone=by_weight.get(0.0, float("nan")),
                       cv_logloss_knn_alone=by_weight.get(1.0, float("nan")),
                       folds=folds, rows=len(x), grid=grids)


class BlendPredictor:
    """The MLP, the neighbours and the calibration of a :class:`BlendChoice`, fitted on given rows."""

    def __init__(self, mlp, neighbours, knn_weight: float, calibration) -> None:
        self.mlp, self.neighbours, self.knn_weight, self.calibration = mlp, neighbours, knn_weight, calibration

    def predict(self, emb: np.ndarray) -> np.ndarray:
        """Embeddings (N, dim) -> predicted quality (N, experts)."""
        import torch

        from .eval_baselines import one_thread
        from .gate import blend

        with one_thread(), torch.inference_mode():
            z = self.mlp(torch.as_tensor(np.asarray(emb, dtype=np.float32))).numpy().astype(np.float64)
        p = 1.0 / (1.0 + np.exp(-z))
        if self.neighbours is not None and self.knn_weight > 0:
            p = blend(p, self.neighbours.predict(emb), self.knn_weight)
        return apply_calibration(p, self.calibration)


def fit_blend(x: np.ndarray, y: np.ndarray, choice: BlendChoice, *, seed: int = 0, hidden: int = 64,
              dropout: float = 0.1) -> BlendPredictor:
    """Train the chosen blend on all of (``x``, ``y``)."""
    from .eval_baselines import one_thread
    from .gate import Neighbours
    from .gate_fit import train_mlp

    with one_thread():
        mlp = train_mlp(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32), hidden=hidden,
                        epochs=choice.epochs, weight_decay=choice.weight_decay, dropout=dropout, seed=seed)
    neighbours = Neighbours(x, y, choice.knn_k, choice.knn_tau) if choice.knn_weight > 0 else None
    return BlendPredictor(mlp, neighbours, choice.knn_weight, choice.calibration)
