"""Choosing the gate's blend inside the training rows (router/gate_cv.py): folds, the choice, the
calibration, and that neither ``gate fit`` nor ``route eval`` lets an evaluated row steer it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from router.gate import GATE_FILE, FittedGate, blend
from router.gate_cv import (
    BlendChoice,
    apply_calibration,
    choose_blend,
    fit_blend,
    fit_platt,
    inner_folds,
    knn_sorted,
    logloss,
)
from router.gate_fit import embed_cached, fit_gate, read_labelled, split, train_mlp, train_mlp_epochs
from tests.fakes import FakeEncoder
from tests.router.helpers import clustered, synthetic_csv

SMALL = {"epochs": (5, 20), "weight_decay": (1e-3,), "knn_k": (5, 20)}


def test_inner_folds_partition_the_rows_and_are_seeded():
    folds = inner_folds(23, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(23))
    assert [len(f) for f in folds] == [5, 5, 5, 4, 4]
    assert all(np.array_equal(a, b) for a, b in zip(folds, inner_folds(23, 5, seed=3), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(folds, inner_folds(23, 5, seed=4), strict=True))
    with pytest.raises(ValueError, match="at least one row per fold"):
        inner_folds(3, 5, seed=0)


def test_one_run_read_epoch_by_epoch_is_the_run_of_that_length():
    """The folds read every training length from one run: it must be the same net as a shorter run."""
    import torch

    x, _, y = clustered(120, seed=0)
    short = train_mlp(x, y, epochs=7, hidden=16, seed=2)
    for epoch, net in train_mlp_epochs(x, y, epochs=12, hidden=16, seed=2):
        if epoch == 7:
            net.eval()
            with torch.inference_mode():
                assert np.allclose(net(torch.as_tensor(x)).numpy(), short(torch.as_tensor(x)).numpy(), atol=1e-6)
            break
    else:
        pytest.fail("no epoch 7")


def test_nearest_are_sorted_by_cosine_similarity():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 8)), rng.normal(size=(4, 8))
    idx = knn_sorted(a, b, 6)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    sims = (b / np.linalg.norm(b, axis=1, keepdims=True)) @ an.T
    assert np.array_equal(idx, np.argsort(-sims, axis=1)[:, :6])
    assert knn_sorted(a[:3], b, 6).shape == (4, 3)  # k capped at the rows there are


def test_the_choice_is_the_lowest_out_of_fold_log_loss_and_prefers_neighbours_on_noisy_clusters():
    """Clusters with noisy single-draw labels: averaging neighbours helps, so the folds keep some;
    the chosen blend's log-loss is no worse than either estimator alone."""
    x, _, y = clustered(300, seed=0)
    choice = choose_blend(x, y, folds=4, seed=0, **SMALL)
    assert choice.knn_weight > 0 and choice.rows == 300 and choice.folds == 4
    assert choice.cv_logloss <= min(choice.cv_logloss_mlp_alone, choice.cv_logloss_knn_alone)
    assert choice.epochs in SMALL["epochs"] and choice.knn_k in SMALL["knn_k"]
    assert choice.calibration is None  # off unless asked
    pinned = choose_blend(x, y, folds=4, seed=0, knn_weight=(0.0,), **SMALL)
    assert pinned.knn_weight == 0.0 and pinned.cv_logloss >= choice.cv_logloss
    # on held-out draws of the same clusters the choice predicts the expected quality better than the MLP alone
    xt, expected, _ = clustered(300, seed=1)
    mlp_only = fit_blend(x, y, pinned, seed=0).predict(xt)
    chosen = fit_blend(x, y, choice, seed=0).predict(xt)
    assert ((chosen - expected) ** 2).mean() < ((mlp_only - expected) ** 2).mean()


def test_platt_scaling_recovers_a_known_miscalibration():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.98, 20000)
    z = np.log(p / (1 - p))
    y = (rng.random(p.size) < 1 / (1 + np.exp(-(2.0 * z + 0.5)))).astype(float)
    a, b = fit_platt(p, y)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(0.5, abs=0.1)
    q = apply_calibration(np.stack([p, p], axis=1), [[a, b], [1.0, 0.0]])
    assert logloss(q[:, 0], y) < logloss(p, y) and np.allclose(q[:, 1], p)
    assert apply_calibration(p, None) is p


def _fit_twice(tmp_path, corrupt):
    """gate fit with inner folds on the synthetic data, then again with the held-out rows changed
    by ``corrupt``; returns both gate.json records."""
    data = read_labelled(synthetic_csv(tmp_path / "d.csv", n=120))
    emb = embed_cached(data.prompts, None, encoder_factory=FakeEncoder)
    kw = dict(holdout=0.25, seed=1, hidden=16, inner_folds=3, grid=SMALL)
    fit_gate(data, emb, tmp_path / "a", **kw)
    _, ho = split(len(data.prompts), 0.25, 1)
    emb2, q2 = emb.copy(), data.quality.copy()
    corrupt(emb2, q2, ho)
    data.quality = q2
    fit_gate(data, emb2, tmp_path / "b", **kw)
    return [json.loads((tmp_path / d / GATE_FILE).read_text()) for d in ("a", "b")]


def test_gate_fit_chooses_inside_the_training_rows_only(tmp_path):
    """Flip every held-out label and replace the held-out embeddings with noise: the choice, its
    fold scores and the trained gate must not move (they would if any held-out row were read)."""
    def corrupt(emb, q, ho):
        q[ho] = 1.0 - q[ho]
        emb[ho] = np.random.default_rng(5).normal(size=emb[ho].shape).astype(np.float32)

    a, b = _fit_twice(tmp_path, corrupt)
    assert a["inner_cv"] is not None and a["inner_cv"]["rows"] == a["train_rows"]
    assert a["inner_cv"] == b["inner_cv"]
    for knob in ("epochs", "weight_decay", "knn_k", "knn_weight", "calibration"):
        assert a[knob] == b[knob] == (a["inner_cv"][knob] if knob != "calibration" else None)
    from safetensors.numpy import load_file

    wa, wb = load_file(str(tmp_path / "a" / "gate.safetensors")), load_file(str(tmp_path / "b" / "gate.safetensors"))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert a["heldout_report"]["top_choice_quality"] != b["heldout_report"]["top_choice_quality"]  # the report does read them


def test_the_leak_check_would_catch_a_choice_that_read_held_out_rows(tmp_path, monkeypatch):
    """The check above is not vacuous: a choice handed every row sees the corruption."""
    import router.gate_cv as gate_cv

    real = gate_cv.choose_blend
    seen = {}

    def spy(x, y, **kw):
        seen["rows"] = len(x)
        return real(x, y, **kw)

    monkeypatch.setattr(gate_cv, "choose_blend", spy)
    data = read_labelled(synthetic_csv(tmp_path / "d.csv", n=60))
    emb = embed_cached(data.prompts, None, encoder_factory=FakeEncoder)
    fit_gate(data, emb, tmp_path / "g", holdout=0.25, seed=1, hidden=16, inner_folds=3, grid=SMALL)
    assert seen["rows"] == 45  # the training rows, not the 60
    x, _, y = clustered(120, seed=0)
    y2 = y.copy()
    y2[:30] = 1 - y2[:30]
    kw = dict(folds=3, seed=0, **SMALL)
    assert real(x, y, **kw).cv_logloss != real(x, y2, **kw).cv_logloss


def test_route_eval_chooses_on_its_training_half_only(tmp_path, monkeypatch, capsys):
    """route eval's on-the-fly gate: flipping the labels of the evaluated half changes the figures,
    never the choice recorded in the JSON."""
    from runtime.cli import main
    from tests.runtime.test_cli_router import PROFILES

    monkeypatch.setenv("WATTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("runtime.cli.router._embed", lambda prompts, cache: FakeEncoder().encode(prompts))
    data = synthetic_csv(tmp_path / "d.csv", n=80)
    profiles = tmp_path / "experts.yaml"
    profiles.write_text(PROFILES)
    _, te = split(80, 0.5, 0)
    lines = data.read_text().splitlines()
    assert lines[0] == "subject,prompt,math,prose"
    flipped, evaluated = [lines[0]], set(te.tolist())
    for i, line in enumerate(lines[1:]):
        if i in evaluated:
            subject, prompt, math, prose = line.split(",")
            line = ",".join([subject, prompt, prose, math])  # swap who is right
        flipped.append(line)
    data2 = tmp_path / "d2.csv"
    data2.write_text("\n".join(flipped) + "\n")
    records = []
    for d in (data, data2):
        js = tmp_path / f"{d.stem}.json"
        assert main(["route", "eval", "--data", str(d), "--experts", str(profiles), "--json", str(js), "--steps", "5",
                     "--inner-folds", "3"]) == 0
        records.append(json.loads(js.read_text()))
    assert "chosen by 3-fold cross-validation inside the training rows" in capsys.readouterr().err
    a, b = records
    assert a["gate_choice"] == b["gate_choice"] and a["gate_choice"]["rows"] == 40
    assert a["gate"]["brier"] != b["gate"]["brier"]  # the evaluated rows did change
    fixed = tmp_path / "fixed.json"
    assert main(["route", "eval", "--data", str(data), "--experts", str(profiles), "--json", str(fixed), "--steps", "5",
                 "--inner-folds", "0"]) == 0
    rec = json.loads(fixed.read_text())["gate_choice"]
    assert rec["folds"] == 0 and rec["knn_weight"] == 0.5
    assert main(["route", "eval", "--data", str(data), "--experts", str(profiles), "--inner-folds", "1"]) == 2


def test_a_calibrated_gate_is_saved_and_served_calibrated(tmp_path):
    data = read_labelled(synthetic_csv(tmp_path / "d.csv", n=80))
    emb = FakeEncoder().encode(data.prompts)
    fit_gate(data, emb, tmp_path / "gate", hidden=8, inner_folds=3, grid=SMALL, calibrate=True)
    meta = json.loads((tmp_path / "gate" / GATE_FILE).read_text())
    assert len(meta["calibration"]) == 2 and meta["inner_cv"]["calibration"] == meta["calibration"]
    gate = FittedGate(tmp_path / "gate", encoder=FakeEncoder())
    p = 1 / (1 + np.exp(-gate.logits(emb[:5]).astype(np.float64)))
    if gate.neighbours is not None:
        p = blend(p, gate.neighbours.predict(emb[:5]), gate.knn_weight)
    assert np.allclose(gate.quality(emb[:5]), apply_calibration(p, meta["calibration"]))


def test_choice_record_round_trips_through_json():
    c = BlendChoice(40, 1e-3, 20, 0.6, 0.0, None, 0.5, 0.5, 0.6, 0.55, 5, 100, {"epochs": [40]})
    assert json.loads(json.dumps(c.record()))["knn_weight"] == 0.6


def test_distance_weighted_neighbours_weigh_the_nearest_more_and_survive_a_reload(tmp_path):
    from router.eval_baselines import kernel_mean, knn_predict
    from router.gate import Neighbours

    labels = np.array([[[1.0], [0.0], [0.0]]])
    sims = np.array([[0.9, 0.5, 0.4]])
    assert kernel_mean(labels, sims, 0.05)[0, 0] > 0.99  # the nearest dominates
    assert kernel_mean(labels, sims, 100.0)[0, 0] == pytest.approx(1 / 3, abs=1e-2)  # wide: the plain mean
    x, _, y = clustered(200, seed=0)
    xt = clustered(20, seed=1)[0]
    assert np.allclose(knn_predict(x, y, xt, k=15, tau=1e3), knn_predict(x, y, xt, k=15), atol=1e-3)
    nb = Neighbours(x, y, k=15, tau=0.05)
    nb.save(tmp_path / "n.safetensors")
    again = Neighbours.load(tmp_path / "n.safetensors", 15, 0.05)
    assert np.allclose(again.predict(xt), knn_predict(x, y, xt, k=15, tau=0.05), atol=1e-6)
    choice = choose_blend(x, y, folds=3, seed=0, knn_tau=(0.0, 0.05), **SMALL)
    assert choice.knn_tau in (0.0, 0.05) and choice.grid["knn_tau"] == [0.0, 0.05]


def test_a_request_s_logits_in_numpy_match_the_torch_forward(tmp_path):
    """The serving gate computes one request's logits without torch (router/gate.py SMALL_BATCH)."""
    import torch

    data = read_labelled(synthetic_csv(tmp_path / "d.csv", n=60))
    emb = FakeEncoder().encode(data.prompts)
    fit_gate(data, emb, tmp_path / "gate", epochs=5, hidden=8)
    gate = FittedGate(tmp_path / "gate", encoder=FakeEncoder())
    with torch.inference_mode():
        ref = gate.mlp(torch.as_tensor(emb)).numpy()
    assert np.allclose(gate.logits(emb[:3]), ref[:3], atol=1e-5)  # numpy path
    assert np.allclose(gate.logits(emb), ref, atol=1e-6)  # torch path
