"""Thresholds from budgets (DeeR), operating points on disk, exit adapters, and the CLI."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.workers.engine_helpers import make_engine
from wattserve.errors import ExitCalibrationError
from workers.engines.torch_engine.early_exit.calibrate import deer_thresholds, read_documents, simulate, solve_lambda
from workers.engines.torch_engine.early_exit.points import (
    FULL,
    EnergyRates,
    ExitProfile,
    OperatingPoint,
    PointChooser,
)

EXITS = (2, 4, 6, 8)


@pytest.mark.parametrize("target", [2.0, 3.3, 5.0, 7.9, 8.0])
def test_lambda_puts_the_mean_exit_depth_on_the_budget(target):
    lam, shares = solve_lambda(EXITS, target)
    assert math.isclose(sum(shares), 1.0)
    assert sum(q * d for q, d in zip(shares, EXITS, strict=True)) == pytest.approx(target, abs=1e-6)
    assert all(a <= b for a, b in zip(shares, shares[1:], strict=False)) == (lam >= 1)
    with pytest.raises(ValueError, match="outside"):
        solve_lambda(EXITS, 1.0)


def test_each_exit_takes_floor_n_q_of_the_running_tokens():
    gen = torch.Generator().manual_seed(0)
    deltas = torch.rand(4, 1000, generator=gen)
    _, shares = solve_lambda(EXITS, 5.0)
    thresholds = deer_thresholds(deltas, shares)
    assert thresholds[-1] == math.inf
    exit_at = simulate(deltas, thresholds)
    counts = torch.bincount(exit_at, minlength=4).tolist()
    assert counts[:3] == [math.floor(1000 * q) for q in shares[:3]]
    assert sum(counts) == 1000
    # zero share: the exit never fires
    assert deer_thresholds(deltas, [0.0, 0.0, 0.0, 1.0])[:3] == [-math.inf] * 3


def _point(name, layers, compute, agreement=0.9):
    return OperatingPoint(name, (0.1, 0.1, 0.1, math.inf), layers, layers, compute, agreement, (0.25,) * 4, 1.0)


def test_budgets_pick_the_most_accurate_affordable_point():
    chooser = PointChooser(8, [_point("a", 4.0, 0.55), _point("b", 6.0, 0.78), _point("c", 7.0, 0.9)])
    assert chooser.by_depth(1.0) == (FULL, None)
    assert chooser.by_depth(0.8)[0] == "b"  # 6/8 <= 0.8 < 7/8
    assert chooser.by_depth(0.1)[0] == "a"  # below every point: the cheapest
    rates = EnergyRates(prefill_j=0.001, decode_j=0.01)
    # 10 prompt tokens at full depth cost 8 * 10 * 0.001 = 0.08 J; 20 decode tokens at compute c cost 1.6 c J
    assert chooser.choose(None, 0.08 + 1.6 * 0.8, 10, 20, rates)[0] == "b"
    assert chooser.choose(None, 100.0, 10, 20, rates) == (FULL, None)
    assert chooser.choose(0.8, 0.01, 10, 20, rates)[0] == "b"  # an explicit compute budget wins
    assert chooser.choose(None, 1.0, 10, 20, EnergyRates())[0] == FULL  # nothing measured yet: default
    assert PointChooser(8, [], 1.0, (0.2, 0.2, 0.2, math.inf)).choose(None, None, 1, 1, rates)[0] == "inline"


def test_documents_are_blocks_separated_by_blank_lines(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one\nstill one\n\n\ntwo\n  \nthree")
    assert read_documents(f) == ["one\nstill one", "two", "three"]


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    from tests.tiny_models import build_model

    return build_model(tmp_path_factory.mktemp("cal") / "llama", "llama", layers=8, seed=1, layer_gain=10.0)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from tests.tiny_models import CORPUS

    rng = random.Random(0)
    words = " ".join(CORPUS[:5]).split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(48)]
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n\n".join(docs))
    return path


def _exit_engine(model_dir, **early_exit):
    return make_engine(model_dir, max_batch=8, engine={"early_exit": {"exit_every": 2, **early_exit}})


@pytest.fixture(scope="module")
def calibrated(deep_llama, text_file, tmp_path_factory):
    from workers.engines.torch_engine.early_exit.jobs import calibrate_engine, record

    engine = _exit_engine(deep_llama)
    docs = read_documents(text_file)
    states = record(engine, docs, new_tokens=12)
    profile = calibrate_engine(engine, states, [3.0, 5.0, 6.5], shortlist_size=64)
    path = profile.save(tmp_path_factory.mktemp("thr") / "edge.json")
    return profile, path, docs, states


def test_calibration_meets_the_requested_depth_on_the_calibration_text(calibrated, deep_llama):
    profile, path, docs, states = calibrated
    assert states.size > 400 and len(profile.shortlist) <= 64 + 1
    for point in profile.points:
        # on the recorded positions the thresholds give the budget up to floor() rounding
        assert point.avg_layers == pytest.approx(point.target_layers, abs=0.05)
        assert 0 < point.compute_fraction < 1 and 0 <= point.agreement <= 1
    # serving the same text with them lands near the budget too (exited tokens change later states)
    engine = _exit_engine(deep_llama, thresholds_path=str(path))
    for point in profile.points:
        depth, points = _decode_depth(engine, docs[:24], compute_budget=point.avg_layers / 8)
        assert points == {point.name}
        assert depth == pytest.approx(point.avg_layers, abs=0.75), point


def _decode_depth(engine, docs, **call):
    """Average layers per decode token serving ``docs``, and the operating points used."""
    from wattserve.types import GenerateCall

    for i, doc in enumerate(docs):
        engine.add(engine.validate(GenerateCall(f"r{i}", doc, max_tokens=13, **call), 0.0))
    layers, tokens, points = 0.0, 0, set()
    while engine.has_work():
        for out in engine.step(0.0).outputs:
            if out.finish_reason is not None:
                n = out.completion_tokens  # the first came from prefill, at full depth (8)
                layers += out.exits.avg_exit_layer * n - 8
                tokens += n - 1
                points.add(out.exits.operating_point)
    return layers / tokens, points


def test_thresholds_file_round_trips_and_refuses_what_does_not_fit(calibrated, deep_llama, tmp_path):
    profile, path, _, _ = calibrated
    again = ExitProfile.load(path)
    assert again.points == sorted(profile.points, key=lambda p: p.avg_layers)
    assert again.points[0].thresholds[-1] == math.inf
    with pytest.raises(ExitCalibrationError, match="exits are after layers"):
        _exit_engine(deep_llama, thresholds_path=str(path), exit_every=4)
    with pytest.raises(ExitCalibrationError, match="criterion"):
        _exit_engine(deep_llama, thresholds_path=str(path), criterion="margin")
    with pytest.raises(ExitCalibrationError, match="another model"):
        _exit_engine(deep_llama, thresholds_path=str(path), max_exit_layer=6)
    with pytest.raises(ExitCalibrationError, match="cannot read"):
        _exit_engine(deep_llama, thresholds_path=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ExitCalibrationError, match="not a wattserve-exits"):
        _exit_engine(deep_llama, thresholds_path=str(tmp_path / "bad.json"))
    with pytest.raises(ExitCalibrationError, match="one threshold per exit"):
        _exit_engine(deep_llama, thresholds=[0.1, 0.2])


def test_fitted_adapters_raise_held_out_agreement_and_pin_the_calibration(calibrated, deep_llama, tmp_path):
    from workers.engines.torch_engine.early_exit.adapters import FitSettings, load_adapters, save_adapters
    from workers.engines.torch_engine.early_exit.jobs import calibrate_engine, fit_adapters

    _, path, _, states = calibrated
    engine = _exit_engine(deep_llama)
    result = fit_adapters(engine, states, FitSettings(epochs=2, batch_tokens=64), heldout_fraction=0.25)
    assert set(result.adapters) == {0, 2, 4, 6}
    before = sum(result.before[d] for d in result.adapters)
    after = sum(result.after[d] for d in result.adapters)
    assert after > before, (result.before, result.after)
    file = tmp_path / "ad.safetensors"
    sha = save_adapters(file, result.adapters, engine.exits.fingerprint)
    loaded, sha2 = load_adapters(file, engine.exits.fingerprint, torch.float32, torch.device("cpu"))
    assert sha == sha2
    h = torch.randn(3, 64)
    torch.testing.assert_close(loaded[4](h), result.adapters[4](h))
    # thresholds calibrated without adapters do not fit an expert that loads them, and back
    with pytest.raises(ExitCalibrationError, match="calibrated with no adapters"):
        _exit_engine(deep_llama, thresholds_path=str(path), adapters_path=str(file))
    with_adapters = _exit_engine(deep_llama, adapters_path=str(file))
    profile = calibrate_engine(with_adapters, states, [4.0], shortlist_size=0)
    assert profile.adapters_sha256 == sha and profile.shortlist == ()
    thr = profile.save(tmp_path / "thr.json")
    _exit_engine(deep_llama, thresholds_path=str(thr), adapters_path=str(file))  # loads
    with pytest.raises(ExitCalibrationError, match="other adapters"):
        _exit_engine(deep_llama, thresholds_path=str(thr))
