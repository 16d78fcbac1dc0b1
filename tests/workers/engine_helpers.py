"""Helpers the engine tests share: building a torch engine, driving it step by step, calls."""

from __future__ import annotations

from wattserve.specs import ExpertSpec
from wattserve.types import GenerateCall, SamplingParams
from workers.engines.torch_engine import TorchEngine

TV_MEDIANS = [0.4, 0.21, 0.18]  # per-exit medians of the tv criterion on the tiny 8-layer models
EXIT_PROMPTS = ["The capital of France is", "Energy is measured in", "Hello world! How", "A small model"]


def make_engine(model_dir, **overrides) -> TorchEngine:
    spec = ExpertSpec(
        name="t",
        model={"kind": "local", "path": str(model_dir)},
        engine={"kind": "torch", "threads": 1, **overrides.pop("engine", {})},
        **{"max_batch": 4, "max_model_len": 128, **overrides},
    )
    return TorchEngine(model_dir, spec)


def exit_engine(model_dir, **early_exit):
    """A torch engine on ``model_dir`` with an exit every two layers."""
    return make_engine(model_dir, engine={"early_exit": {"exit_every": 2, **early_exit}})


def run(engine, calls, join_at=None, max_steps=500, logprobs: dict | None = None):
    """Drive ``engine`` until idle; ``join_at`` maps step number -> calls added then.
    Returns per-request (text, token ids, finish reason) and the batch sizes seen; ``logprobs``
    (a dict) gets each request's summed log-probability."""
    join_at = dict(join_at or {})
    for c in calls:
        engine.add(engine.validate(c, 0.0))
    texts, ids, reasons, batches = {}, {}, {}, []
    for step in range(max_steps):
        for c in join_at.pop(step, []):
            engine.add(engine.validate(c, 0.0))
        if not engine.has_work() and not join_at:
            break
        res = engine.step(float(step))
        batches.append(res.work.batch_size)
        for out in res.outputs:
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
            ids.setdefault(out.request_id, []).extend(out.token_ids)
            if logprobs is not None:
                logprobs[out.request_id] = out.logprob_sum
            if out.finish_reason is not None:
                reasons[out.request_id] = out.finish_reason
    return texts, ids, reasons, batches


def gen(rid, n=12, **kw):
    return GenerateCall(request_id=rid, prompt="Energy is measured in", max_tokens=n,
                        sampling=SamplingParams(ignore_eos=True, **kw))
