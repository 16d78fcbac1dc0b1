"""Fit the simulated device profiles to the measurements in ``shared/data/energy``.

    python -m workers.devices.fit_profiles --data /work/shared/data/energy \\
        --out workers/devices/profiles/profiles.json

For each GPU the fit minimises squared log errors of the model in :mod:`workers.devices.simulated`
against measured inter-token latency (ITL), energy per output token and (where measured, not
derived) power, with numpy-only Levenberg-Marquardt. Every 4th model (by name) is held out and
only scored. The JSON records the datasheet figures with sources, the assumptions, the fitted
parameters, the rows used (``<dataset>:<line>``), and median / p90 absolute relative errors.
Tests reuse :func:`load_rows` and :func:`error_summary` to check held-out rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from workers.devices.simulated import DeviceProfile, power_from_utilisation, step_terms

HOLDOUT_EVERY = 4

# --- measured rows -----------------------------------------------------------------------------

MLENERGY_GPUS = {"H100": "h100", "NVIDIA H100 80GB HBM3": "h100", "B200": "b200",
                 "NVIDIA A100-SXM4-40GB": "a100"}
ARGONNE_GPUS = {"Nvidia A100 GPU": "a100", "Nvidia H100 GPU": "h100"}  # GH200 is another device
# Parameter counts (model cards) for datasets that name models without sizes.
PARAMS_BY_MODEL = {
    "meta-llama/Llama-2-7b-hf": 6.74e9, "meta-llama/Meta-Llama-3-8B": 8.03e9,
    "Llama-3.2-1B": 1.24e9, "Llama-3.2-3B": 3.21e9, "Nemotron-Mini-4B-Instruct": 4.19e9,
    "Llama2 7B": 6.74e9, "Llama2-7B": 6.74e9, "Llama2 13B": 13.0e9, "Llama2 70B": 69.0e9,
}
# Bytes per weight of 4-bit formats incl. group scales: MLC q4f16 and llama.cpp Q4_0 carry
# 4.5 bits per weight, Q4_K_M about 4.85.
BYTES_BY_QUANT = {"INT4 (MLC)": 0.5625, "4-bit": 0.5625, "Q4_K_M GGUF": 0.606}


@dataclass(frozen=True, slots=True)
class Row:
    """One measured configuration. Energies are totals over ``num_gpus``; power is per GPU."""

    row_id: str  # <dataset>:<line number in its CSV, header = 1>
    dataset: str
    gpu: str
    model: str
    role: str  # fit | holdout | validation
    kind: str  # steady (decode steady state) | batch_run (fixed batch, in+out) | decode_rate
    params_per_gpu: float
    num_gpus: int
    batch: float
    bytes_per_param: float = 2.0
    itl_s: float | None = None
    j_per_token: float | None = None
    power_w: float | None = None
    run_latency_s: float | None = None
    in_tokens: int = 0
    out_tokens: int = 0


def _csv(path: Path) -> list[tuple[int, dict[str, str]]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(enumerate(csv.DictReader(f), start=2))


def _mlenergy_rows(path: Path) -> list[Row]:
    rows = []
    for line, r in _csv(path):
        gpu = MLENERGY_GPUS.get(r["gpu"])
        dense = (not r["active_params_B"] or float(r["active_params_B"]) == float(r["total_params_B"])) \
            and "mixtral" not in r["model"].lower()
        tp, pp, n = int(r["tp"]), int(r["pp"] or 1), int(r["num_gpus"])
        if gpu is None or not dense or r["precision"] not in ("", "bfloat16") or pp != 1 or n != tp:
            continue  # MoE, FP8/FP4 weights, pipeline or expert parallelism: outside the model
        v3 = r["source"] == "leaderboard-v3"
        if v3 and r["task"] == "lm-arena-chat":
            role = "fit"
        elif v3 and r["task"] == "gpqa":
            role = "validation"  # 8k-token reasoning outputs: a different workload
        elif not v3 and r["task"].startswith("llm_text_generation/"):
            role = "fit" if gpu == "a100" else "validation"
        else:
            continue  # multimodal and FIM tasks carry prefill the decode model does not see
        derived = r["power_is_derived"] == "True"
        rows.append(Row(
            row_id=f"mlenergy:{line}", dataset=f"mlenergy-{r['source'][12:]}/{r['task']}",
            gpu=gpu,
            model=r["model"], role=role, kind="steady",
            params_per_gpu=float(r["total_params_B"]) * 1e9 / tp, num_gpus=n,
            batch=float(r["avg_batch_size"]), itl_s=float(r["avg_tpot_or_itl_ms"]) / 1e3,
            j_per_token=float(r["energy_per_output_token_J"]),
            power_w=None if derived else float(r["avg_power_W_all_gpus"]) / n,
        ))
    return rows


def _argonne_rows(path: Path) -> list[Row]:
    rows = []
    for line, r in _csv(path):
        gpu = ARGONNE_GPUS.get(r["Hardware"])
        if gpu is None or int(r["Num of Hardware"]) != 1:
            continue
        tokens = int(r["Input Output Length"])
        rows.append(Row(
            row_id=f"argonne:{line}", dataset="argonne", gpu=gpu, model=r["Model"], role="fit",
            kind="batch_run", params_per_gpu=PARAMS_BY_MODEL[r["Model"]], num_gpus=1,
            batch=float(r["Batch Size"]), power_w=float(r["avg_power_W"]),
            run_latency_s=float(r["Latency_s"]), in_tokens=tokens, out_tokens=tokens,
        ))
    return rows


def _edge_rows(path: Path) -> list[Row]:
    rows = []
    for line, r in _csv(path):
        agx = "AGX Orin" in r["device"] or "IGX Orin" in r["device"]
        if not agx or not r["metric"].startswith("decode_rate") or r["model"] not in PARAMS_BY_MODEL:
            continue
        rows.append(Row(
            row_id=f"edge:{line}", dataset="edge", gpu="orin", model=r["model"], role="fit",
            kind="decode_rate", params_per_gpu=PARAMS_BY_MODEL[r["model"]], num_gpus=1, batch=1.0,
            bytes_per_param=BYTES_BY_QUANT[r["quant"]], itl_s=1.0 / float(r["value"]),
        ))
    return rows


def load_rows(data_dir: Path) -> list[Row]:
    """Every usable row of ``shared/data/energy``, with its role (fit / holdout / validation)."""
    rows = (_mlenergy_rows(data_dir / "mlenergy" / "mlenergy_llm_energy_compact.csv")
            + _argonne_rows(data_dir / "argonne" / "power_results_with_W.csv")
            + _edge_rows(data_dir / "edge" / "edge_llm_published_points.csv"))
    out = []
    for gpu in sorted({r.gpu for r in rows}):
        mine = [r for r in rows if r.gpu == gpu]
        models = sorted({r.model for r in mine if r.role == "fit" and r.dataset.startswith("mlenergy")})
        held = {m for i, m in enumerate(models) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1}
        out += [replace(r, role="holdout") if r.role == "fit" and r.model in held
                and r.dataset.startswith("mlenergy") else r for r in mine]
    return out


def predict(profile: DeviceProfile, rows: Sequence[Row]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``metric -> (predicted, measured)`` arrays for the rows that measured that metric."""
    pairs: dict[str, tuple[list, list]] = {}

    def add(metric: str, pred: float, meas: float | None) -> None:
        if meas is not None:
            pair = pairs.setdefault(metric, ([], []))
            pair[0].append(float(pred))
            pair[1].append(meas)

    for r in rows:
        p, bpp = r.params_per_gpu, r.bytes_per_param
        if r.kind in ("steady", "decode_rate"):
            t, um, uc = step_terms(profile, 0, r.batch, r.batch, 1.0, p, bpp)
            watts = power_from_utilisation(profile, um, uc)
            add("itl_s", t, r.itl_s)
            add("j_per_output_token", watts * t * r.num_gpus / r.batch, r.j_per_token)
            add("power_w", watts, r.power_w)
        else:  # batch_run: one prefill of batch x in tokens, then out-1 decode steps
            tp, um, uc = step_terms(profile, r.batch * r.in_tokens, 0, r.batch, 1.0, p, bpp)
            td, dm, dc = step_terms(profile, 0, r.batch, r.batch, 1.0, p, bpp)
            steps = r.out_tokens - 1
            run_s = tp + steps * td
            run_j = (power_from_utilisation(profile, um, uc) * tp
                     + steps * power_from_utilisation(profile, dm, dc) * td)
            add("run_latency_s", run_s, r.run_latency_s)
            # Argonne averaged NVML samples over the run plus 1 s of sleep before and after it.
            add("power_w", (run_j + 2.0 * profile.idle_w) / (run_s + 2.0), r.power_w)
    return {k: (np.array(v[0]), np.array(v[1])) for k, v in pairs.items()}


def error_summary(profile: DeviceProfile, rows: Sequence[Row]) -> dict[str, dict[str, float]]:
    """Per metric: row count, median and p90 of ``|predicted / measured - 1|``."""
    return {metric: _summary(pred, meas) for metric, (pred, meas) in sorted(predict(profile, rows).items())}


def _summary(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    err = np.abs(pred / meas - 1.0)
    return {"n": int(err.size), "median": _round(float(np.median(err))),
            "p90": _round(float(np.percentile(err, 90)))}

# Datasheet figures. Dense (not 2:4-sparse) BF16 tensor throughput; SXM boards.
DATASHEETS: dict[str, dict] = {
    "h100": {
        "description": "NVIDIA H100 SXM5 80GB HBM3",
        "tdp_w": 700.0, "peak_bf16_tflops": 989.4, "mem_bandwidth_gbps": 3350.0,
        "max_sm_clock_mhz": 1980.0, "min_sm_clock_mhz": 345.0,
        "sources": {
            "tdp_w, peak_bf16_tflops, mem_bandwidth_gbps": "NVIDIA H100 Tensor Core GPU datasheet, "
            "SXM5 column: BF16 1,979 TFLOPS with sparsity (989.4 dense), 3.35 TB/s HBM3, up to 700 W",
            "max_sm_clock_mhz": "nvidia-smi Max Clocks of H100 SXM (1980 MHz; the application clock "
            "awslabs/amazon-eks-ami sets for H100)",
            "min_sm_clock_mhz": "lowest GH100 SM clock reported by nvidia-smi (345 MHz at idle, "
            "awslabs/amazon-eks-ami PR #1985)",
        },
    },
    "a100": {
        "description": "NVIDIA A100-SXM4-40GB",
        "tdp_w": 400.0, "peak_bf16_tflops": 312.0, "mem_bandwidth_gbps": 1555.0,
        "max_sm_clock_mhz": 1410.0, "min_sm_clock_mhz": 210.0,
        "sources": {
            "tdp_w, peak_bf16_tflops, mem_bandwidth_gbps": "NVIDIA A100 Tensor Core GPU datasheet, "
            "40GB SXM column: BF16 312 TFLOPS dense (624 sparse), 1,555 GB/s HBM2, 400 W",
            "max_sm_clock_mhz": "nvidia-smi Max Clocks SM 1410 MHz on A100 SXM4 (e.g. NVIDIA/DCGM#152)",
            "min_sm_clock_mhz": "lowest entry of nvidia-smi SUPPORTED_CLOCKS on A100 (210 MHz); "
            "not re-verified offline",
        },
    },
    "b200": {
        "description": "NVIDIA B200 (HGX, 1000 W configuration)",
        "tdp_w": 1000.0, "peak_bf16_tflops": 2250.0, "mem_bandwidth_gbps": 8000.0,
        "max_sm_clock_mhz": 1980.0, "min_sm_clock_mhz": 345.0,
        "sources": {
            "tdp_w, peak_bf16_tflops, mem_bandwidth_gbps": "NVIDIA HGX B200 specifications: "
            "FP16/BF16 4.5 PFLOPS with sparsity (2.25 dense) per GPU, 8 TB/s HBM3e, 1,000 W",
            "max_sm_clock_mhz": "not in NVIDIA's public specs; third-party spec listings give a "
            "1.98 GHz boost clock (approximate)",
            "min_sm_clock_mhz": "not published; assumed equal to GH100's 345 MHz floor",
        },
    },
    "orin": {
        "description": "NVIDIA Jetson AGX Orin 64GB (GPU, MAXN)",
        "tdp_w": 60.0, "peak_bf16_tflops": 42.5, "mem_bandwidth_gbps": 204.8,
        "max_sm_clock_mhz": 1300.0, "min_sm_clock_mhz": 306.0,
        "sources": {
            "tdp_w": "module maximum power 60 W (NVIDIA moderator, forums.developer.nvidia.com "
            "thread 323456; shared/data/energy/edge row 'max_module_power')",
            "peak_bf16_tflops": "derived: Jetson AGX Orin Series Technical Brief, GPU 170 sparse "
            "INT8 TOPS -> 85 dense INT8 -> 42.5 dense FP16/BF16 TFLOPS",
            "mem_bandwidth_gbps": "Jetson AGX Orin 64GB: 256-bit LPDDR5, 204.8 GB/s",
            "max_sm_clock_mhz": "Jetson AGX Orin 64GB GPU max frequency 1.3 GHz",
            "min_sm_clock_mhz": "not in the technical brief and not sourced: an assumed floor "
            "for clock requests",
        },
    },
}

IDLE_FRACTION_OF_TDP = 0.10
ASSUMPTIONS = {
    "idle_w": f"{IDLE_FRACTION_OF_TDP:.2f} x tdp_w: no row in shared/data/energy measures an idle "
    "GPU; a datacenter GPU with a model loaded and no kernels running reads roughly this in nvidia-smi",
    "clock_power_exponent": "2.0: energy per operation ~ V^2 and DVFS lowers V roughly with f; the "
    "data has no clock sweeps, so this is not fitted",
}
# The committed profiles must reproduce held-out rows within this (tests check it).
HOLDOUT_TOLERANCE = {"median": 0.25, "p90": 1.5}


def _exp(z):
    return np.exp(np.clip(z, -60.0, 60.0))


def _sigmoid(z):
    return 1.0 / (1.0 + _exp(-z))


# Fitted parameters: name -> (unconstrained LM variable -> value, value -> variable, start value).
PARAMS: dict[str, tuple[Callable, Callable, float]] = {
    "eta_mem": (_sigmoid, lambda p: np.log(p / (1.0 - p)), 0.7),
    "seq_bytes": (_exp, np.log, 2e8),
    "seq_bytes_exponent": (lambda z: z, lambda x: x, 0.5),
    "step_overhead_s": (_exp, np.log, 0.003),
    "eta_compute": (_sigmoid, lambda p: np.log(p / (1.0 - p)), 0.5),
    "power_k_mem": (_exp, np.log, 1.0),
    "power_k_compute": (_exp, np.log, 5.0),
}
# Decode rows alone cannot tell eta_compute from the other terms (only prefill is compute-bound),
# so a weak prior holds it where no prefill rows exist. Its weight equals one data residual.
ETA_COMPUTE_PRIOR = {"value": 0.5, "log_sigma": 0.5,
                     "why": "typical prefill model-FLOP utilisation of vLLM / TensorRT-LLM"}


def make_profile(name: str, values: dict[str, float]) -> DeviceProfile:
    sheet = DATASHEETS[name]
    return DeviceProfile(
        name=name, description=sheet["description"], tdp_w=sheet["tdp_w"],
        idle_w=round(IDLE_FRACTION_OF_TDP * sheet["tdp_w"], 3),
        peak_bf16_tflops=sheet["peak_bf16_tflops"], mem_bandwidth_gbps=sheet["mem_bandwidth_gbps"],
        max_sm_clock_mhz=sheet["max_sm_clock_mhz"], min_sm_clock_mhz=sheet["min_sm_clock_mhz"],
        clock_power_exponent=2.0, **values,
    )


def levenberg_marquardt(fun: Callable[[np.ndarray], np.ndarray], z0: np.ndarray,
                        iters: int = 300, tol: float = 1e-10) -> np.ndarray:
    """Minimise ``sum(fun(z)**2)`` from ``z0`` (forward-difference Jacobian, numpy only)."""
    z, lam = np.asarray(z0, dtype=float), 1e-2
    r = fun(z)
    cost = float(r @ r)
    for _ in range(iters):
        jac = np.empty((r.size, z.size))
        for j in range(z.size):
            dz = z.copy()
            dz[j] += 1e-6 * (1.0 + abs(z[j]))
            jac[:, j] = (fun(dz) - r) / (dz[j] - z[j])
        a, g = jac.T @ jac, jac.T @ r
        while True:  # raise damping until the step lowers the cost
            step = np.linalg.solve(a + lam * (np.diag(np.diag(a)) + 1e-9 * np.eye(z.size)), -g)
            r_new = fun(z + step)
            new_cost = float(r_new @ r_new)
            if new_cost < cost or lam > 1e8:
                break
            lam *= 4.0
        if new_cost >= cost:
            break
        gain, z, r, cost, lam = cost - new_cost, z + step, r_new, new_cost, max(lam / 3.0, 1e-9)
        if gain < tol * (1.0 + cost):
            break
    return z


def fit_gpu(name: str, rows: Sequence[Row], free: Sequence[str], fixed: dict[str, float]) -> dict:
    """Fit the ``free`` parameters of profile ``name`` on ``rows``; ``fixed`` supplies the rest."""

    def values_of(z: np.ndarray) -> dict[str, float]:
        return {**fixed, **{k: float(PARAMS[k][0](zi)) for k, zi in zip(free, z, strict=True)}}

    def fun(z: np.ndarray) -> np.ndarray:
        vals = values_of(z)
        res = [np.log(p / m) for p, m in predict(make_profile(name, vals), rows).values()]
        if "eta_compute" in free:
            res.append([np.log(vals["eta_compute"] / ETA_COMPUTE_PRIOR["value"])
                        / ETA_COMPUTE_PRIOR["log_sigma"]])
        return np.concatenate(res)

    best = None
    # Several starts: the roofline max() makes the cost surface piecewise, with local minima.
    for scale in (1.0, 0.3, 3.0):
        z0 = np.array([PARAMS[k][1](PARAMS[k][2] * (1.0 if k.startswith("eta") else scale))
                       for k in free])
        z = levenberg_marquardt(fun, z0)
        cost = float(np.sum(fun(z) ** 2))
        if best is None or cost < best[0]:
            best = (cost, z)
    return {k: _round(v) for k, v in values_of(best[1]).items()}


def _round(x: float) -> float:
    return 0.0 if abs(x) < 1e-9 else float(f"{x:.5g}")


def build_document(data_dir: Path) -> dict:
    """Fit every profile on the rows under ``data_dir`` and return the JSON document."""
    rows = load_rows(data_dir)
    fitted: dict[str, dict[str, float]] = {}
    for name in ("h100", "b200", "a100"):
        fitted[name] = fit_gpu(name, _select(rows, name, "fit"), list(PARAMS), {})
    # Orin: only batch-1 decode rates exist, so only eta_mem and the step overhead are fitted;
    # the rest is borrowed from the A100 fit (same Ampere generation).
    orin_free = ["eta_mem", "step_overhead_s"]
    borrowed = {k: v for k, v in fitted["a100"].items() if k not in orin_free}
    orin_rows = _select(rows, "orin", "fit")
    fitted["orin"] = fit_gpu("orin", orin_rows, orin_free, borrowed)
    profiles = {name: _entry(name, fitted[name], rows) for name in sorted(fitted)}
    # Too few Orin rows to hold a model out: report leave-one-out errors instead.
    loo_pred, loo_meas = [], []
    for i, row in enumerate(orin_rows):
        vals = fit_gpu("orin", orin_rows[:i] + orin_rows[i + 1:], orin_free, borrowed)
        pred, meas = predict(make_profile("orin", vals), [row])["itl_s"]
        loo_pred.append(pred[0])
        loo_meas.append(meas[0])
    loo = {"itl_s": _summary(np.array(loo_pred), np.array(loo_meas))}
    profiles["orin"]["evaluation"]["leave_one_out"] = loo
    return {
        "schema": 1,
        "generated_by": "python -m workers.devices.fit_profiles --data <shared/data/energy> "
        "--out workers/devices/profiles/profiles.json",
        "model": "see the workers/devices/simulated.py module docstring",
        "error_metric": "absolute relative error |predicted / measured - 1|: median and p90 over rows",
        "holdout_rule": f"per GPU, the ML.ENERGY models at index {HOLDOUT_EVERY - 1} mod "
        f"{HOLDOUT_EVERY} in name order are held out of the fit and only scored",
        "holdout_tolerance": HOLDOUT_TOLERANCE,
        "profiles": profiles,
    }


def _select(rows: Sequence[Row], gpu: str, role: str) -> list[Row]:
    return [r for r in rows if r.gpu == gpu and r.role == role]


def _entry(name: str, values: dict[str, float], rows: Sequence[Row]) -> dict:
    sheet = DATASHEETS[name]
    profile = make_profile(name, values)
    by_role: dict[str, dict] = {}
    for role in ("fit", "holdout", "validation"):
        subset = _select(rows, name, role)
        if subset:
            by_role[role] = {
                "n_rows": len(subset),
                "models": sorted({r.model for r in subset}),
                "errors": error_summary(profile, subset),
                "errors_by_dataset": {d: error_summary(profile, [r for r in subset if r.dataset == d])
                                      for d in sorted({r.dataset for r in subset})},
                "rows": [r.row_id for r in subset],
            }
    return {
        "description": sheet["description"],
        "datasheet": {k: v for k, v in sheet.items() if k != "description"},
        "assumed": {"idle_w": profile.idle_w, "clock_power_exponent": profile.clock_power_exponent,
                    "why": ASSUMPTIONS},
        "fitted": values,
        "eta_compute_prior": ETA_COMPUTE_PRIOR if name != "orin" else None,
        "evaluation": by_role,
        "notes": NOTES[name],
        "power": POWER[name],
    }


# Where each profile's power model comes from. A profile whose power is not validated against
# measured power says so in its energy source label (``SimulatedDevice.energy_source``).
POWER = {
    "h100": {"validated": True, "label": "h100",
             "basis": "power coefficients fitted to measured power (ML.ENERGY v3, Argonne)"},
    "b200": {"validated": True, "label": "b200",
             "basis": "power coefficients fitted to measured power (ML.ENERGY v3)"},
    "a100": {"validated": True, "label": "a100",
             "basis": "power coefficients fitted to Argonne measured power and ML.ENERGY v2 energy"},
    "orin": {"validated": False, "label": "orin-unvalidated-power-from-a100-fit",
             "basis": "power_k_mem, power_k_compute (and eta_compute, seq_bytes) borrowed from the A100 fit; "
                      "no measured Jetson Orin power was available, so its joules are unvalidated"},
}


NOTES = {
    "h100": "Fit on ML.ENERGY v3 lm-arena-chat (dense BF16, measured power, TP 1-4 with per-GPU "
    "params = params / TP) and Argonne vLLM / TensorRT-LLM runs (measured power; their batched "
    "1024-token prefills are the only compute-bound rows). Validation only: "
    "ML.ENERGY v2 H100 rows (older vLLM, power derived from energy; ~2-3x slower ITL and about "
    "half the power of v3 for the same model) and v3 gpqa (8k-token reasoning outputs).",
    "b200": "Fit on ML.ENERGY v3 lm-arena-chat (dense BF16) only; without prefill rows "
    "eta_compute rests on its prior. v3 gpqa rows are validation.",
    "a100": "Fit on ML.ENERGY v2 (A100-SXM4-40GB; power derived from energy per request, so only "
    "ITL and J/token are fitted there) and Argonne A100 runs (measured power). The two sources "
    "disagree: Argonne power is ~30-40% above what v2 energy implies. Llama-2-7B (no GQA) at "
    "batch >= 32 is bound by KV-cache capacity on 40 GB, which the lumped KV term cannot follow.",
    "orin": "THIN DATA: no public measured power for LLM decoding on Jetson AGX Orin was found "
    "offline. Only eta_mem and step_overhead_s are fitted, from 7 batch-1 INT4 decode rates "
    "(MLC, llama.cpp) of AGX / IGX Orin; eta_compute, seq_bytes and the power coefficients are "
    "borrowed from the A100 fit (same Ampere generation), so power is unvalidated. Orin Nano "
    "rows are a different device and are not used. Use for relative comparisons only.",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="shared/data/energy directory")
    parser.add_argument("--out", type=Path, required=True, help="profiles.json to write")
    args = parser.parse_args(argv)
    doc = build_document(args.data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    for name, entry in doc["profiles"].items():
        print(name, json.dumps(entry["fitted"]), file=sys.stderr)
        for role, info in entry["evaluation"].items():
            print(f"  {role:<13} {json.dumps(info.get('errors', info))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
