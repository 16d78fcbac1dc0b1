"""The torch/transformers engine: continuous batching over a slot KV cache.

A step is ``schedule -> execute -> update``: expire overdue requests, decode one token for every
running sequence (one batched forward), prefill the newly admitted ones (one forward each, the
first token comes from it), then release the slots of sequences that finished. Requests join
and leave only at these boundaries, each with its own KV rows.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wattserve.errors import ConfigError, InvalidRequest
from wattserve.specs import ExpertSpec, TorchEngineSpec
from wattserve.types import FinishReason, GenerateCall, ScoreCall, StepWork

from ..base import (
    ActiveRequest,
    Engine,
    EngineInfo,
    PreparedRequest,
    PreparedScore,
    ScoreOutput,
    SequenceOutput,
    StepResult,
    StepTimings,
)
from ..chat import encode_checked
from ..scheduler import Scheduler
from .early_exit.control import ExitControl, ExitTally
from .kv_cache import SlotKVCache
from .runner import DecoderRunner
from .sampling import IncrementalDetokenizer, StopChecker, make_generator, sample


@dataclass(slots=True)
class _Sequence(ActiveRequest):
    detok: IncrementalDetokenizer | None = None
    stopper: StopChecker | None = None
    generator: torch.Generator | None = None
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    exits: ExitTally | None = None  # early exit: operating point and costs so far
    logprob_sum: float = 0.0  # confidence of the answer: the router's cascade reads its mean


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype, max_layers: int | None = None) -> torch.nn.Module:
    """The transformers model in ``model_dir``; with ``max_layers``, only its first layers are
    built and loaded (early exit's ``max_exit_layer``: deeper weights never reach memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if max_layers is None:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    cfg = AutoConfig.from_pretrained(model_dir)
    if max_layers > cfg.num_hidden_layers:
        raise ConfigError(f"max_exit_layer {max_layers} is deeper than the model ({cfg.num_hidden_layers} layers)")
    cfg.num_hidden_layers = max_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:max_layers]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the deliberately skipped layers would be listed as unused
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, config=cfg)
    finally:
        hf_logging.set_verbosity(verbosity)


def resolve_device_and_dtype(spec: TorchEngineSpec) -> tuple[torch.device, torch.dtype]:
    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = spec.dtype
    if dtype_name == "auto":
        # bf16 matmuls are slow on CPUs without AVX512-BF16/AMX; fp32 is the safe default there.
        dtype_name = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype_name)


def score_choices(
    model: torch.nn.Module,
    prompt_cache,
    after_prompt: torch.Tensor,
    choice_ids: list[list[int]],
    device: torch.device,
    max_rows: int,
) -> tuple[list[float], int]:
    """Each choice's summed log-prob after a prompt already run, and the choice tokens computed.

    ``after_prompt`` is the log-softmax at the prompt's last position: it scores every choice's
    first token, so a one-token choice costs no forward at all. The others run their tokens but
    the last (position t predicts token t+1) in batches of at most ``max_rows`` rows, each batch
    on its own copy of ``prompt_cache`` repeated once per row, right padded: a padded position
    comes after every real one, so causal attention keeps it out of the real ones and its logits
    are never read. ``prompt_cache`` itself is left as it was.
    """
    totals = [float(after_prompt[c[0]]) for c in choice_ids]
    longer = [i for i, c in enumerate(choice_ids) if len(c) > 1]
    computed = 0
    for b in range(0, len(longer), max(1, max_rows)):
        rows = longer[b : b + max(1, max_rows)]
        width = max(len(choice_ids[i]) - 1 for i in rows)
        # pad with each row's own last input token: any id works, its outputs are never read
        inputs = [choice_ids[i][:-1] + [choice_ids[i][-2]] * (width - len(choice_ids[i]) + 1) for i in rows]
        cache = copy.deepcopy(prompt_cache)
        cache.batch_repeat_interleave(len(rows))
        logits = model(input_ids=torch.tensor(inputs, device=device), past_key_values=cache, use_cache=True).logits
        lp = torch.log_softmax(logits.float(), dim=-1)
        for r, i in enumerate(rows):
            targets = torch.tensor(choice_ids[i][1:], device=device)
            totals[i] += float(lp[r, : len(targets)].gather(1, targets[:, None]).sum())
            computed += len(targets)
        del cache
    return totals, computed


class TorchEngine(Engine):
    def __init__(self, model_dir: str | Path, expert: ExpertSpec, model_label: str | None = None) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        spec = expert.engine
        assert isinstance(spec, TorchEngineSpec)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.device, self.dtype = resolve_device_and_dtype(spec)
        self.expert = expert.name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        exit_spec = spec.early_exit
        model = load_causal_lm(model_dir, self.dtype, exit_spec.max_exit_layer if exit_spec else None)
        self.model = model.to(self.device).eval().requires_grad_(False)  # serving never needs grads
        cfg = self.model.config
        self.max_model_len = min(expert.max_model_len, int(cfg.max_position_embeddings))
        self.eos_ids = self._eos_ids(model_dir, GenerationConfig)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache = SlotKVCache(
            num_layers=cfg.num_hidden_layers,
            max_slots=expert.max_batch,
            kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            max_len=self.max_model_len,
            dtype=self.dtype,
            device=self.device,
        )
        self.runner = DecoderRunner(self.model, self.cache)
        self.exits = ExitControl(exit_spec, self.runner, f"experts.{expert.name}.engine.early_exit") if exit_spec else None
        self.scheduler: Scheduler[_Sequence] = Scheduler(expert.max_batch, spec.max_prefill_tokens_per_step)
        self.slots: list[_Sequence | None] = [None] * expert.max_batch
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe for concurrent use
        self.info = EngineInfo(
            model=model_label or str(model_dir),
            engine="torch",
            params=sum(p.numel() for p in self.model.parameters()),
            max_model_len=self.max_model_len,
            max_batch=expert.max_batch,
            device=str(self.device),
            num_layers=cfg.num_hidden_layers,
        )

    def _eos_ids(self, model_dir, generation_config_cls) -> frozenset[int]:
        ids: set[int] = set()
        try:
            gen = generation_config_cls.from_pretrained(model_dir)
            eos = gen.eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except OSError:
            pass  # no generation_config.json: the tokenizer's EOS is all we have
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    # -- admission -----------------------------------------------------------------------------
    def validate(self, call: GenerateCall, arrival_s: float) -> PreparedRequest:
        with self._tok_lock:
            ids, call = encode_checked(self.tokenizer, call, expert=self.expert, max_model_len=self.max_model_len)
        return PreparedRequest(call=call, prompt_ids=ids, arrival_s=arrival_s)

    def validate_score(self, call: ScoreCall, arrival_s: float) -> PreparedScore:
        if not call.prompt or not call.choices or not all(call.choices):
            raise InvalidRequest("scoring needs a prompt and at least one non-empty choice")
        with self._tok_lock:
            prompt_ids = self.tokenizer(call.prompt).input_ids
            # Choices continue the prompt: tokenized without special tokens (no second BOS).
            choice_ids = [self.tokenizer(c, add_special_tokens=False).input_ids for c in call.choices]
        if not prompt_ids or not all(choice_ids):
            raise InvalidRequest("the prompt or a choice tokenizes to nothing")
        longest = max(len(c) for c in choice_ids)
        if len(prompt_ids) + longest > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) plus the longest choice ({longest} tokens) exceeds "
                f"expert {self.expert!r}'s limit of {self.max_model_len} tokens"
            )
        return PreparedScore(call, prompt_ids, choice_ids, arrival_s)

    @torch.no_grad()
    def score(self, request: PreparedScore) -> ScoreOutput:
        """Sum of log p(choice | prompt) per choice: the prompt runs once (a plain transformers
        forward with its own cache, never the engine's KV slots), then the choices run together
        on copies of that cache (:func:`score_choices`). Timings as the llama.cpp engine's: the
        prompt's tokens in ``prefill_tokens``, the choices' time in ``scored_s``."""
        t0 = time.perf_counter()
        prompt_ids = torch.tensor([request.prompt_ids], device=self.device)
        out = self.model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
        after_prompt = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        self._sync()
        prompt_s = time.perf_counter() - t0
        logprobs, choice_tokens = score_choices(
            self.model, out.past_key_values, after_prompt, request.choice_ids, self.device, self.scheduler.max_batch
        )
        self._sync()
        elapsed = time.perf_counter() - t0
        n = len(request.prompt_ids)
        work = StepWork(prefill_tokens=n + choice_tokens, batch_size=len(request.choice_ids))
        return ScoreOutput(logprobs, work, StepTimings(prefill_s=elapsed, prefill_tokens=n, scored_s=elapsed - prompt_s))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the phase's kernels, not just their launch

    def add(self, request: PreparedRequest) -> None:
        with self._tok_lock:
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids)
        seq = _Sequence(
            req=request,
            detok=detok,
            stopper=StopChecker(request.call.sampling.stop),
            generator=make_generator(request.call.sampling, self.device),
        )
        if self.exits is not None:
            seq.exits = self.exits.assign(request.call, len(request.prompt_ids))
        self.scheduler.add(seq)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> SequenceOutput | None:
        seq = self.scheduler.remove(request_id)
        if seq is None:
            return None
        if seq.slot >= 0:
            self._free(seq)
        return self._output(seq, "", (), reason)

    def has_work(self) -> bool:
        return bool(self.scheduler.running) or self.scheduler.num_waiting > 0

    def load(self) -> tuple[int, int]:
        return len(self.scheduler.running), self.scheduler.num_waiting

    # -- the step ------------------------------------------------------------------------------
    def step(self, now_s: float) -> StepResult:
        result = StepResult()
        for seq in self.scheduler.expired(now_s):
            result.outputs.append(self.abort(seq.request_id, FinishReason.DEADLINE))
        decoding = [self.slots[s] for s in range(self.cache.used)]
        admitted = self.scheduler.admit()
        finished: list[_Sequence] = []
        timings = StepTimings()

        decode_compute, weight_fraction = float(len(decoding)), 1.0
        if decoding:
            t0 = time.perf_counter()
            decode_compute, weight_fraction = self._decode(decoding, now_s, result, finished)
            timings.decode_s, timings.decode_batch = time.perf_counter() - t0, len(decoding)

        t0 = time.perf_counter()
        for seq in admitted:
            seq.slot = self.cache.allocate()
            self.slots[seq.slot] = seq
            logits = self.runner.prefill(seq.slot, seq.req.prompt_ids)
            if seq.exits is not None:
                self.exits.count_prefill_token(seq.exits)
            result.tokens_by_request[seq.request_id] = seq.prompt_len
            timings.prefill_tokens += seq.prompt_len
            self._advance(seq, logits, now_s, result, finished)
        if admitted:
            timings.prefill_s = time.perf_counter() - t0

        # Free highest slots first so compaction never moves a slot that is about to be freed.
        for seq in sorted(finished, key=lambda s: s.slot, reverse=True):
            self.scheduler.remove(seq.request_id)
            self._free(seq)
        result.timings = timings
        tokens = timings.prefill_tokens + len(decoding)
        result.work = StepWork(
            prefill_tokens=timings.prefill_tokens,
            decode_tokens=len(decoding),
            batch_size=len(decoding) + len(admitted),
            # prefill runs every layer; decode rows count what early exit left them
            layer_fraction=(timings.prefill_tokens + decode_compute) / tokens if tokens else 1.0,
            weight_fraction=1.0 if admitted else weight_fraction,
        )
        return result

    def _decode(self, decoding: list[_Sequence], now_s: float, result: StepResult, finished: list) -> tuple[float, float]:
        """One token for every running sequence; returns (effective full-depth tokens computed,
        share of the decoder's weights read) for the device model."""
        token_ids = [seq.output_ids[-1] for seq in decoding]
        compute, weight_fraction = float(len(decoding)), 1.0
        if self.exits is None:
            logits = self.runner.decode(token_ids)
        else:
            logits, step_exits = self.exits.decode(token_ids, [seq.exits for seq in decoding])
            compute, weight_fraction = step_exits.compute_sum, step_exits.weight_fraction
            result.exit_counts = step_exits.counts
            result.exit_probes = step_exits.probed
        for i, seq in enumerate(decoding):
            self._advance(seq, logits[i], now_s, result, finished)
        return compute, weight_fraction

    def _advance(self, seq: _Sequence, logits: torch.Tensor, now_s: float, result: StepResult, finished: list) -> None:
        """Sample the next token for ``seq`` and report text and completion."""
        params = seq.req.call.sampling
        early = len(seq.output_ids) < params.min_tokens  # EOS and stop strings wait until min_tokens
        token = sample(logits, params, seq.generator, prompt_ids=seq.req.prompt_ids, output_ids=seq.output_ids,
                       banned_ids=self.eos_ids if early and not params.ignore_eos else ())
        seq.output_ids.append(token)
        seq.logprob_sum += float(torch.log_softmax(logits.float(), dim=-1)[token])
        result.tokens_by_request[seq.request_id] = result.tokens_by_request.get(seq.request_id, 0) + 1
        call = seq.req.call
        reason = None
        text = ""
        if token in self.eos_ids and not call.sampling.ignore_eos:
            reason = FinishReason.STOP
        else:
            with self._tok_lock:
                delta = seq.detok.push(token)
            # vLLM checks stop strings only once the output is longer than min_tokens
            text, hit = seq.stopper.push(delta, check=len(seq.output_ids) > params.min_tokens)
            if hit:
                reason = FinishReason.STOP
        if reason is None and (
            len(seq.output_ids) >= call.max_tokens
            or seq.prompt_len + len(seq.output_ids) >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            text += seq.stopper.flush()  # release text held back for stop-string matching
            finished.append(seq)
        result.outputs.append(self._output(seq, text, (token,), reason))

    def _output(self, seq: _Sequence, text: str, ids: tuple[int, ...], reason: FinishReason | None) -> SequenceOutput:
        return SequenceOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=ids,
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.output_ids),
            exits=seq.exits.usage(self.info.num_layers) if seq.exits is not None and reason is not None else None,
            logprob_sum=seq.logprob_sum,
        )

    def _free(self, seq: _Sequence) -> None:
        moved = self.cache.free(seq.slot)
        if moved is not None:
            mover = self.slots[moved]
            self.slots[seq.slot] = mover
            mover.slot = seq.slot
            self.slots[moved] = None
        else:
            self.slots[seq.slot] = None
        seq.slot = -1

    def observe_energy(self, prefill_j_per_layer_token: float | None, decode_j_per_layer_token: float | None) -> None:
        if self.exits is not None:
            self.exits.observe_energy(prefill_j_per_layer_token, decode_j_per_layer_token)

    def close(self) -> None:
        self.scheduler.running.clear()
        del self.runner, self.model, self.cache
