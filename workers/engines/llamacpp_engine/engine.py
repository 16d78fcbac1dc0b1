"""The llama.cpp engine: continuous batching over GGUF models through llama.cpp's batch API.

A step is ``schedule -> execute -> update`` in one ``llama_decode``: expire overdue requests, put
every running sequence's last token (one row each, at its next position, under its own sequence
id) and every newly admitted prompt into one batch, decode it, read each sequence's logits from
its last row, sample, and free the finished sequences' KV cells by sequence id. Requests join and
leave only between steps. Batch slots are sequence ids ``0..max_batch-1``; id ``max_batch`` is
reserved for scoring, which runs between steps and never touches the running batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wattserve.errors import InvalidRequest
from wattserve.specs import ExpertSpec, GgufPackageSource, LlamaCppEngineSpec
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
from ..stops import StopChecker
from .batch import StepBatch
from .model import ContextShape, GgufModel, default_threads
from .sampler import Sampler, log_prob
from .text import ByteDetokenizer, GgufTokenizer


@dataclass(slots=True)
class _Sequence(ActiveRequest):
    sampler: Sampler | None = None
    stopper: StopChecker | None = None
    detok: ByteDetokenizer | None = None
    slot: int = -1  # its sequence id while it holds KV cells
    n_past: int = 0  # tokens of this sequence in its KV cells
    row: int = -1  # this step's batch row whose logits predict its next token
    output_ids: list[int] = field(default_factory=list)
    logprob_sum: float = 0.0


class LlamaCppEngine(Engine):
    def __init__(self, gguf_path: str | Path, expert: ExpertSpec, model_label: str | None = None) -> None:
        spec = expert.engine
        if not isinstance(spec, LlamaCppEngineSpec):
            raise TypeError("LlamaCppEngine needs an engine spec of kind llamacpp")
        self.expert = expert.name
        self.model = GgufModel(Path(gguf_path), n_gpu_layers=spec.n_gpu_layers)
        try:
            self._open(spec, expert)
        except BaseException:
            self.model.close()
            raise
        src = expert.model
        add_bos = src.add_bos_token if isinstance(src, GgufPackageSource) else None
        self.tokenizer = GgufTokenizer(self.model, add_bos=add_bos)
        self.eog_ids = frozenset(t for t in range(self.model.n_vocab) if self.model.is_eog(t))
        self.scheduler: Scheduler[_Sequence] = Scheduler(expert.max_batch, spec.max_prefill_tokens_per_step)
        self._free_slots = list(range(expert.max_batch - 1, -1, -1))  # pop() hands out 0 first
        self.info = EngineInfo(
            model=model_label or str(gguf_path),
            engine="llamacpp",
            params=self.model.n_params,
            max_model_len=self.max_model_len,
            max_batch=expert.max_batch,
            device="cuda" if self.model.on_gpu else "cpu",
            num_layers=self.model.n_layer,
        )
        self._warm_up()

    def _open(self, spec: LlamaCppEngineSpec, expert: ExpertSpec) -> None:
        # Like the torch engine: the expert's limit, capped by what the model was trained for.
        self.max_model_len = min(expert.max_model_len, self.model.n_ctx_train or expert.max_model_len)
        threads = spec.threads or default_threads()
        # The first prompt admitted in a step is never refused by the prefill budget (scheduler.py),
        # so a step can hold one whole prompt plus every decode row.
        self.score_seq = expert.max_batch
        shape = ContextShape(
            n_seq=expert.max_batch + 1,
            cells_per_seq=self.max_model_len,
            n_batch=expert.max_batch + max(spec.max_prefill_tokens_per_step, self.max_model_len),
            n_ubatch=spec.n_ubatch,
            threads=threads,
            threads_batch=spec.threads_batch or threads,
        )
        self.model.open_context(shape)
        self.max_model_len = min(self.max_model_len, self.model.cells_per_seq)
        self.batch = StepBatch(self.model.lib, shape.n_batch)

    def _warm_up(self) -> None:
        """One tiny decode at load, so the first request does not pay llama.cpp's graph set-up."""
        self.batch.clear()
        self.batch.add([self.model.bos_id if self.model.bos_id >= 0 else 0], 0, self.score_seq)
        self.batch.decode(self.model.ctx)
        self.model.forget(self.score_seq)

    # -- admission -----------------------------------------------------------------------------
    def validate(self, call: GenerateCall, arrival_s: float) -> PreparedRequest:
        ids, call = encode_checked(self.tokenizer, call, expert=self.expert, max_model_len=self.max_model_len)
        return PreparedRequest(call=call, prompt_ids=ids, arrival_s=arrival_s)

    def validate_score(self, call: ScoreCall, arrival_s: float) -> PreparedScore:
        if not call.prompt or not call.choices or not all(call.choices):
            raise InvalidRequest("scoring needs a prompt and at least one non-empty choice")
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

    def add(self, request: PreparedRequest) -> None:
        sampling = request.call.sampling
        self.scheduler.add(_Sequence(
            req=request,
            sampler=Sampler(sampling, frozenset() if sampling.ignore_eos else self.eog_ids, self.model.n_vocab,
                            request.prompt_ids),
            stopper=StopChecker(sampling.stop),
            detok=ByteDetokenizer(self.model),
        ))

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> SequenceOutput | None:
        seq = self.scheduler.remove(request_id)
        if seq is None:
            return None
        self._release(seq)
        return self._output(seq, "", (), reason)

    def has_work(self) -> bool:
        return bool(self.scheduler.running) or self.scheduler.num_waiting > 0

    def load(self) -> tuple[int, int]:
        return len(self.scheduler.running), self.scheduler.num_waiting

    @property
    def slots_in_use(self) -> int:
        """Sequence ids holding KV cells (tests check that none leak)."""
        return self.scheduler.max_batch - len(self._free_slots)

    # -- the step ------------------------------------------------------------------------------
    def step(self, now_s: float) -> StepResult:
        result = StepResult()
        for seq in self.scheduler.expired(now_s):
            result.outputs.append(self.abort(seq.request_id, FinishReason.DEADLINE))
        decoding = list(self.scheduler.running)  # every running sequence holds a slot already
        admitted = self.scheduler.admit()
        if not decoding and not admitted:  # everything expired: nothing to compute
            return result
        for seq in admitted:
            seq.slot = self._free_slots.pop()
        # Rows in sequence-id order, lowest free ids first: when finished slots were handed out
        # again in reverse order, a batch-8 decode cost ~35% more CPU per token than bare
        # llama.cpp's (same process, alternating runs); in order it costs the same.
        batch = self.batch
        batch.clear()
        for seq in sorted(decoding + admitted, key=lambda s: s.slot):
            if seq.n_past:
                seq.row = batch.add((seq.output_ids[-1],), seq.n_past, seq.slot)
            else:
                seq.row = batch.add(seq.req.prompt_ids, 0, seq.slot)
        t0 = time.perf_counter()
        batch.decode(self.model.ctx)
        finished: list[_Sequence] = []
        for seq in decoding:
            seq.n_past += 1
            result.tokens_by_request[seq.request_id] = 1
            self._advance(seq, result, finished)
        prefill_tokens = 0
        for seq in admitted:
            seq.n_past = seq.prompt_len
            prefill_tokens += seq.prompt_len
            result.tokens_by_request[seq.request_id] = seq.prompt_len
            self._advance(seq, result, finished)
        elapsed = time.perf_counter() - t0
        for seq in finished:
            self.scheduler.remove(seq.request_id)
            self._release(seq)
        # One decode computes both kinds of rows. A step with prompts in it is profiled as prefill
        # (decode rows riding along cost little next to a prompt); pure decode steps give the
        # decode ms per step. Energy is split by tokens either way (the loop's ledger).
        if admitted:
            result.timings = StepTimings(prefill_s=elapsed, prefill_tokens=prefill_tokens)
        else:
            result.timings = StepTimings(decode_s=elapsed, decode_batch=len(decoding))
        result.work = StepWork(
            prefill_tokens=prefill_tokens, decode_tokens=len(decoding), batch_size=len(decoding) + len(admitted)
        )
        return result

    def _advance(self, seq: _Sequence, result: StepResult, finished: list[_Sequence]) -> None:
        """Sample ``seq``'s next token from its row's logits and report text and completion."""
        logits = self.batch.logits(self.model.ctx, seq.row, self.model.n_vocab)
        token = seq.sampler.pick(logits)
        seq.output_ids.append(token)
        seq.logprob_sum += log_prob(logits, token)
        call = seq.req.call
        reason = None
        text = ""
        if token in self.eog_ids and not call.sampling.ignore_eos:
            reason = FinishReason.STOP
        else:
            # stop strings count only past min_tokens, as in the torch engine and vLLM
            text, hit = seq.stopper.push(seq.detok.push(token), check=len(seq.output_ids) > call.sampling.min_tokens)
            if hit:
                reason = FinishReason.STOP
        if reason is None and (
            len(seq.output_ids) >= call.max_tokens or seq.prompt_len + len(seq.output_ids) >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            # release text held back for stop-string matching; bytes of an unfinished character
            # stay unsaid, as with the torch engine's detokenizer
            text += seq.stopper.flush()
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
            logprob_sum=seq.logprob_sum,
        )

    def _release(self, seq: _Sequence) -> None:
        """Free ``seq``'s KV cells (by its sequence id) and its slot."""
        if seq.slot < 0:
            return
        self.model.forget(seq.slot)
        self._free_slots.append(seq.slot)
        self._free_slots.sort(reverse=True)  # pop() hands out the lowest free id
        seq.slot = -1

    # -- scoring -------------------------------------------------------------------------------
    def score(self, request: PreparedScore) -> ScoreOutput:
        """Sum of log p(choice | prompt) per choice, in the reserved scoring sequence: the prompt
        is decoded once, then each choice after it (its cells removed before the next)."""
        t0 = time.perf_counter()
        model, batch, seq = self.model, self.batch, self.score_seq
        prompt = request.prompt_ids
        n = len(prompt)
        logprobs: list[float] = []
        try:
            batch.clear()
            row = batch.add(prompt, 0, seq)
            batch.decode(model.ctx)
            after_prompt = np.array(batch.logits(model.ctx, row, model.n_vocab))  # next decode reuses the buffer
            prompt_s = time.perf_counter() - t0
            tokens = n
            for choice in request.choice_ids:
                total = log_prob(after_prompt, choice[0])
                if len(choice) > 1:
                    model.lib.llama_memory_seq_rm(model.memory, seq, n, -1)
                    batch.clear()
                    rows = batch.add_outputs(choice[:-1], n, seq)
                    batch.decode(model.ctx)
                    tokens += len(choice) - 1
                    for r, target in zip(rows, choice[1:], strict=True):
                        total += log_prob(batch.logits(model.ctx, r, model.n_vocab), target)
                logprobs.append(total)
        finally:
            model.forget(seq)
        elapsed = time.perf_counter() - t0
        work = StepWork(prefill_tokens=tokens, batch_size=len(request.choice_ids))
        # the profile learns the prompt rate from the prompt alone (prefill_tokens = n): the
        # choices' tokens also read the output layer, which the router prices apart
        return ScoreOutput(logprobs, work, StepTimings(prefill_s=elapsed, prefill_tokens=n, scored_s=elapsed - prompt_s))

    def close(self) -> None:
        self.scheduler.running.clear()
        self.model.close()
