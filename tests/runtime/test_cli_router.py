"""`wattserve gate fit` and `wattserve route eval` as a user runs them (real MiniLM, small data)."""

from __future__ import annotations

import json

from router.eval_data import prompt_sha1, read_eval_data
from runtime.cli import main
from tests.router.helpers import synthetic_csv

PROFILES = (
    "output_tokens: 10\n"
    "experts:\n"
    "  - {name: small, column: prose, j_per_token: 0.5, tpot_ms: 10}\n"
    "  - {name: big, column: math, j_per_token: 5.0, tpot_ms: 30}\n"
)


def test_gate_fit_then_route_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WATTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = synthetic_csv(tmp_path / "d.csv", n=60)
    assert main(["gate", "fit", "--data", str(data), "--out", str(tmp_path / "gate"), "--epochs", "20"]) == 0
    out = capsys.readouterr()
    assert "held-out report (12 prompts)" in out.out and "calibration: Brier" in out.out
    assert "training gate" in out.err and "embedding prompts" in out.err  # progress bars
    meta = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert meta["experts"] == ["math", "prose"] and meta["epochs"] == 20  # a knob given is fixed
    # the others are chosen by 5 folds inside the 48 training rows, and recorded
    assert meta["inner_cv"]["folds"] == 5 and meta["inner_cv"]["rows"] == 48 == meta["train_rows"]
    assert meta["inner_cv"]["grid"]["epochs"] == [20] and meta["knn_weight"] == meta["inner_cv"]["knn_weight"]
    assert (tmp_path / "gate" / "neighbours.safetensors").exists() == (meta["knn_weight"] > 0)
    assert "inner 5-fold cross-validation on 48 training prompts chose" in out.out

    profiles = tmp_path / "experts.yaml"
    profiles.write_text(PROFILES)
    js = tmp_path / "out" / "eval.json"
    argv = ["route", "eval", "--data", str(data), "--experts", str(profiles), "--json", str(js), "--steps", "5"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    text = cap.out
    assert "30 evaluated prompts (30 training)" in text and "moe2" in text and "threshold" in text and "oracle" in text
    assert "gate (fitted on the training rows): Brier" in text and "within-task AUC" in text and "AIQ" in text
    assert not list(tmp_path.glob("*.png"))  # no plot unless asked
    rep = json.loads(js.read_text())
    assert set(rep["curves"]) == {"moe2", "threshold", "knn", "mlp", "cheapest", "strongest", "round_robin",
                                  "least_loaded", "random", "oracle", "ceiling_insample"}
    assert {"brier", "ece", "auc", "within_task_auc"} <= set(rep["gate"])
    assert rep["cheapest"] == "small" and rep["experts"][0]["energy_source"] == "modeled:profile-file"
    for p in rep["policies"].values():
        assert {"aiq", "e95_j", "oracle_saving_share", "attainable_saving_share", "shares_at_e95"} <= set(p)
    assert "attainable" in text and "the label-only estimate needs 3 or more experts" in cap.err
    assert all("shares" in pt for pt in rep["curves"]["moe2"])

    png = tmp_path / "plots" / "eval.png"
    assert main([*argv, "--png", str(png)]) == 0 and png.read_bytes()[:4] == b"\x89PNG"

    # a saved gate that trained on 48 of these rows: the evaluated rows it saw are left out, and said
    capsys.readouterr()
    assert main([*argv, "--gate", str(tmp_path / "gate")]) == 0
    err = capsys.readouterr().err
    assert "were in the gate's training set (gate.json lists the prompts it trained on)" in err
    assert "they are left out" in err
    # a gate from before the prompt record: the split is re-derived from its seed, holdout and data
    meta_path = tmp_path / "gate" / "gate.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("train_prompt_sha1"), meta.pop("heldout_prompt_sha1", None)
    meta_path.write_text(json.dumps(meta))
    assert main([*argv, "--gate", str(tmp_path / "gate")]) == 0
    err = capsys.readouterr().err
    assert "were in the gate's training set (re-derived from its recorded split" in err and "they are left out" in err
    # --holdout 1.0 with a gate used to crash with an IndexError; now the rows it saw are left out
    assert main([*argv, "--gate", str(tmp_path / "gate"), "--holdout", "1.0"]) == 0
    assert "no training rows" in capsys.readouterr().err
    # with a given gate there is no in-sample ceiling (nothing is fitted)
    assert main([*argv, "--gate", str(tmp_path / "gate")]) == 0
    rep = json.loads(js.read_text())
    assert not [c for c in rep["curves"] if c.startswith("ceiling_")]
    assert main([*argv, "--gate-knn-weight", "1.5"]) == 2
    assert "--gate-knn-weight must be in [0, 1]" in capsys.readouterr().err


def test_route_eval_refuses_a_gate_that_saw_every_row_and_reads_a_test_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WATTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    data = synthetic_csv(tmp_path / "d.csv", n=60)
    assert main(["gate", "fit", "--data", str(data), "--out", str(tmp_path / "gate"), "--epochs", "5"]) == 0
    meta = json.loads((tmp_path / "gate" / "gate.json").read_text())
    meta["train_prompt_sha1"] = [prompt_sha1(p) for p in read_eval_data(data).prompts]  # as gate fit records it
    (tmp_path / "gate" / "gate.json").write_text(json.dumps(meta))
    profiles = tmp_path / "experts.yaml"
    profiles.write_text(PROFILES)
    argv = ["route", "eval", "--data", str(data), "--experts", str(profiles), "--steps", "3"]
    capsys.readouterr()
    assert main([*argv, "--gate", str(tmp_path / "gate")]) == 2
    assert "all 30 evaluated prompts were in the training set of gate" in capsys.readouterr().err

    # a separate test file: every row of --data trains, every row of --test is evaluated
    rows = data.read_text().splitlines()
    test = tmp_path / "t.csv"
    test.write_text("\n".join([rows[0], *[r.replace("item", "other") for r in rows[1:21]]]) + "\n")
    assert main([*argv, "--test", str(test), "--gate", str(tmp_path / "gate")]) == 0
    out = capsys.readouterr()
    assert "t.csv: 20 evaluated prompts (60 training)" in out.out and "none of the 20 evaluated prompts" in out.err


def test_route_eval_blank_cells(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WATTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    data = synthetic_csv(tmp_path / "d.csv", n=40)
    lines = data.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ","  # blank 'prose' cell on file row 6
    data.write_text("\n".join(lines) + "\n")
    profiles = tmp_path / "experts.yaml"
    profiles.write_text(PROFILES)
    argv = ["route", "eval", "--data", str(data), "--experts", str(profiles), "--steps", "3"]
    assert main(argv) == 2
    assert "row 6, column 'prose' is blank; pass --skip-blank" in capsys.readouterr().err
    assert main([*argv, "--skip-blank"]) == 0
    out = capsys.readouterr()
    assert "skipped 1 rows with a blank quality cell" in out.err and "20 evaluated prompts (19 training)" in out.out


def test_route_eval_with_three_experts_adds_the_label_only_ceiling(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WATTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    data = synthetic_csv(tmp_path / "d.csv", n=40)
    lines = data.read_text().splitlines()
    rows = [lines[0] + ",mid"] + [f"{line},{0.5 if i % 3 else 1.0}" for i, line in enumerate(lines[1:])]
    data.write_text("\n".join(rows) + "\n")
    profiles = tmp_path / "experts.yaml"
    profiles.write_text(PROFILES + "  - {name: mid, column: mid, j_per_token: 2.0, tpot_ms: 20}\n")
    js = tmp_path / "eval.json"
    assert main(["route", "eval", "--data", str(data), "--experts", str(profiles), "--json", str(js), "--steps", "5"]) == 0
    assert "noise ceiling: labels denoised at rank" in capsys.readouterr().err
    rep = json.loads(js.read_text())
    assert {"ceiling_denoised", "ceiling_insample"} <= set(rep["curves"])
    assert rep["attainable_e95_j"] is None or rep["attainable_e95_j"] > 0
