"""One ``llama_batch`` per engine step: every running sequence's next token and every admitted
prompt, each row tagged with its sequence id, decoded by a single ``llama_decode``.

The batch's arrays are numpy buffers owned here (not ``llama_batch_init``'s), so a step fills
them with slice assignments instead of a Python loop per token, and nothing has to be freed.
Each row carries exactly one sequence id; ``seq_id[i]`` points at ``_seq[i]`` once, at build.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np


class DecodeError(RuntimeError):
    """``llama_decode`` refused or failed a batch; ``code`` is its return value."""

    def __init__(self, code: int, n_tokens: int) -> None:
        meaning = {1: "no KV cache slot for the batch", 2: "aborted", -1: "invalid batch"}.get(code, "fatal error")
        super().__init__(f"llama_decode failed on a batch of {n_tokens} tokens: {meaning} (code {code})")
        self.code = code


class StepBatch:
    """A reusable batch of up to ``capacity`` tokens."""

    def __init__(self, lib, capacity: int) -> None:
        self.lib = lib
        self.capacity = capacity
        self._token = np.zeros(capacity, dtype=np.int32)
        self._pos = np.zeros(capacity, dtype=np.int32)
        self._n_seq = np.ones(capacity, dtype=np.int32)
        self._seq = np.zeros(capacity, dtype=np.int32)
        self._out = np.zeros(capacity, dtype=np.int8)
        seq_base = self._seq.ctypes.data
        self._seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * capacity)(
            *(ctypes.cast(seq_base + 4 * i, ctypes.POINTER(ctypes.c_int32)) for i in range(capacity))
        )
        self.batch = lib.llama_batch()
        self.batch.token = self._token.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.batch.embd = ctypes.POINTER(ctypes.c_float)()
        self.batch.pos = self._pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.batch.n_seq_id = self._n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.batch.seq_id = self._seq_ptrs
        self.batch.logits = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, tokens: Sequence[int], start_pos: int, seq_id: int, output_last: bool = True) -> int:
        """Append ``tokens`` of ``seq_id`` at positions ``start_pos...``; returns the row of the last
        token (its logits are kept when ``output_last``)."""
        k = len(tokens)
        if self.n + k > self.capacity:
            raise ValueError(f"batch of {self.capacity} tokens cannot take {k} more (holds {self.n})")
        sl = slice(self.n, self.n + k)
        self._token[sl] = tokens
        self._pos[sl] = np.arange(start_pos, start_pos + k, dtype=np.int32)
        self._seq[sl] = seq_id
        self._out[sl] = 0
        self.n += k
        if output_last:
            self._out[self.n - 1] = 1
        return self.n - 1

    def add_outputs(self, tokens: Sequence[int], start_pos: int, seq_id: int) -> range:
        """Append ``tokens`` keeping the logits of every one (scoring); returns their rows."""
        first = self.n
        self.add(tokens, start_pos, seq_id, output_last=False)
        self._out[first : self.n] = 1
        return range(first, self.n)

    def decode(self, ctx) -> None:
        """Run the batch through the model (one ``llama_decode``); raises DecodeError."""
        self.batch.n_tokens = self.n
        code = self.lib.llama_decode(ctx, self.batch)
        if code != 0:
            raise DecodeError(int(code), self.n)

    def logits(self, ctx, row: int, n_vocab: int) -> np.ndarray:
        """The float32 logits of ``row`` (a view into llama.cpp's buffer, valid until the next decode)."""
        ptr = self.lib.llama_get_logits_ith(ctx, row)
        if not ptr:
            raise DecodeError(-1, self.n)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))
