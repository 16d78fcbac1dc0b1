"""`wattserve gate fit` and `wattserve route eval` as a user runs them (real MiniLM, small data)."""

from __future__ import annotations

import json

from runtime.cli import main
from tests.router.test_gate import _synthetic_csv


def test_gate_fit_then_route_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WATTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    data = _synthetic_csv(tmp_path / "d.csv", n=60)
    assert main(["gate", "fit", "--data", str(data), "--out", str(tmp_path / "gate"), "--epochs", "20"]) == 0
    out = capsys.readouterr()
    assert "held-out report (12 prompts)" in out.out and "calibration: Brier" in out.out
    assert "training gate" in out.err and "embedding prompts" in out.err  # progress bars
    assert json.loads((tmp_path / "gate" / "gate.json").read_text())["experts"] == ["math", "prose"]

    profiles = tmp_path / "experts.yaml"
    profiles.write_text(
        "output_tokens: 10\n"
        "experts:\n"
        "  - {name: small, column: prose, j_per_token: 0.5, tpot_ms: 10}\n"
        "  - {name: big, column: math, j_per_token: 5.0, tpot_ms: 30}\n"
    )
    png, js = tmp_path / "eval.png", tmp_path / "eval.json"
    argv = ["route", "eval", "--data", str(data), "--experts", str(profiles), "--png", str(png), "--json", str(js),
            "--steps", "5"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "30 held-out prompts" in text and "moe2" in text and "threshold" in text and "oracle" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    curves = json.loads(js.read_text())["curves"]
    assert set(curves) == {"moe2", "threshold", "cheapest", "strongest", "round_robin", "least_loaded", "random", "oracle"}
    assert main(argv[:6] + ["--gate", str(tmp_path / "gate"), "--png", str(png)]) == 0  # a saved gate works too
