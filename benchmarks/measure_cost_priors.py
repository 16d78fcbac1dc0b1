"""Measure each text expert of a config on this machine and print ``router.cost_priors`` for it.

Each expert is loaded in-process (no Ray, no gateway), one at a time so that no other model
competes for the CPU, and serves: its start-up probe (``ExpertWorker.probe``), then ``--rounds``
rounds of a prompt-heavy request (~400 prompt tokens, 1 output token: what ``Score`` and short
answers cost) and an output-heavy one (a short prompt, ``--output-tokens`` tokens with end of
sequence ignored). It prints the figures its profile measured (prefill ms/token, decode ms per
step at batch 1, busy power overall and in prefill-only and decode-only steps: EWMAs, as the
router reads them), the ``cost_priors`` line to paste,
and, per request shape, the energy those figures predict through the router's own cost model
(``router/cost.py``) against the mean measured, so a prior's error is known before it is used.

    .venv/bin/python benchmarks/measure_cost_priors.py [--config configs/local.yaml] [--rounds 3]

Energy is what the expert's device reports (``modeled:cpu`` on a machine without counters:
watts_per_core x CPU seconds + idle power x wall time). Quote the CPU model with the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host import cpu_model  # noqa: E402 - benchmarks/ is the script's directory

from router.cost import CostModel, CostPrior  # noqa: E402
from runtime.config import load_config  # noqa: E402
from wattserve.types import GenerateCall, SamplingParams  # noqa: E402
from workers.expert import ExpertWorker  # noqa: E402

LONG_PROMPT = ("Read the passage and answer the question at the end. " + (
    "The committee met on a cold Tuesday to review the budget for the new library wing. After a long "
    "discussion of heating costs, shelving and the reading room's windows, the members agreed to delay "
    "the vote until the architect could present revised drawings. ") * 7
    + "Question: what did the committee decide?\nAnswer:")
SHORT_PROMPT = "Write a short story about a lighthouse keeper."




async def _serve(worker: ExpertWorker, rid: str, prompt: str, max_tokens: int):
    """One greedy request of exactly ``max_tokens`` tokens; its usage."""
    stream = worker.open_stream("measure")
    call = GenerateCall(request_id=rid, prompt=prompt, max_tokens=max_tokens,
                        sampling=SamplingParams(temperature=0.0, ignore_eos=True))
    refused = (await worker.submit("measure", [call]))[0]
    if refused is not None:
        raise refused
    try:
        async for batch in stream:
            for _, item in batch:
                if isinstance(item, BaseException):
                    raise item
                if item[-1].usage is not None:
                    return item[-1].usage
    finally:
        await stream.aclose()
    raise RuntimeError("the stream ended without a usage")


async def measure(spec, cache_dir: str, rounds: int, output_tokens: int) -> dict:
    worker = ExpertWorker(spec, 0, cache_dir, exit_on_failure=False)
    try:
        await worker.ready()
        probe = await worker.probe()
        shapes = {"prompt-heavy": (LONG_PROMPT, 1), "output-heavy": (SHORT_PROMPT, output_tokens)}
        usages: dict[str, list] = {s: [] for s in shapes}
        for i in range(rounds):
            for shape, (prompt, n) in shapes.items():
                usages[shape].append(await _serve(worker, f"{shape}-{i}", prompt, n))
        prof = await worker.profile()
    finally:
        worker.shutdown()
    prior = CostPrior(prefill_ms_per_token=prof.prefill_ms_per_token or 0.0,
                      decode_ms_per_token=prof.decode_ms_per_step_by_batch.get(1, prof.decode_ms_per_token or 0.0),
                      busy_power_w=prof.busy_power_w, prefill_power_w=prof.prefill_power_w,
                      decode_power_w=prof.decode_power_w)
    model = CostModel(priors={spec.name: prior})
    one_power = CostModel(priors={spec.name: CostPrior(prior.prefill_ms_per_token, prior.decode_ms_per_token,
                                                       busy_power_w=prior.busy_power_w)})
    rows = []
    for shape, us in usages.items():
        p, n = us[0].prompt_tokens, us[0].completion_tokens
        rows.append({"shape": shape, "prompt_tokens": p, "output_tokens": n,
                     "measured_j": statistics.mean(u.energy_j for u in us),
                     "predicted_j": model.predict(None, spec.name, p, n).energy_j,
                     "one_power_j": one_power.predict(None, spec.name, p, n).energy_j,
                     "latency_ms": statistics.mean(u.latency_ms for u in us)})
    return {"expert": spec.name, "prior": prior, "probe": probe, "rows": rows, "energy_source": prof.energy_source}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--cache-dir", help="model cache (default: the config's model_cache_dir)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    cache_dir = args.cache_dir or cfg.model_cache_dir or tempfile.mkdtemp()
    print(f"CPU: {cpu_model()}; config {args.config}; {args.rounds} rounds per request shape, one expert at a time")
    results = [asyncio.run(measure(e, cache_dir, args.rounds, args.output_tokens))
               for e in cfg.experts if e.modality == "text"]
    for r in results:
        print(f"\n{r['expert']} ({r['energy_source']}): start-up probe {r['probe']['prompt_tokens']}+"
              f"{r['probe']['completion_tokens']} tokens, {r['probe']['energy_j']:.3f} J")
        print(f"  {'request':<13} {'prompt':>6} {'output':>6} {'measured J':>10} {'predicted J':>11} {'pred/meas':>9} "
              f"{'one power':>9} {'ms':>7}")
        for row in r["rows"]:
            print(f"  {row['shape']:<13} {row['prompt_tokens']:>6} {row['output_tokens']:>6} {row['measured_j']:>10.3f} "
                  f"{row['predicted_j']:>11.3f} {row['predicted_j'] / row['measured_j']:>9.2f} "
                  f"{row['one_power_j'] / row['measured_j']:>9.2f} {row['latency_ms']:>7.0f}")
    print("(pred/meas: priced with each phase's power; one power: with busy_power_w for both phases)")
    print("\nrouter:\n  cost_priors:")
    for r in results:
        p = r["prior"]
        print(f"    {r['expert']}: {{prefill_ms_per_token: {p.prefill_ms_per_token:.2f}, "
              f"decode_ms_per_token: {p.decode_ms_per_token:.1f}, busy_power_w: {p.busy_power_w:.1f}, "
              f"prefill_power_w: {p.prefill_power_w:.1f}, decode_power_w: {p.decode_power_w:.1f}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
