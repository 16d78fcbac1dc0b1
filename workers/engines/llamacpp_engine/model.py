"""Loading a GGUF file into llama.cpp: the model, one context sized for the expert's batch, the
vocabulary (tokenize, detokenize, chat template), and errors that say what went wrong.

llama.cpp reports why a load failed only in its log (``unknown model architecture: 'x'``, a bad
magic number, a truncated tensor), and returns NULL. :class:`LogTap` keeps the recent lines of
that log so a failed load raises :class:`~wattserve.errors.ModelSourceError` quoting them, instead
of a bare "failed to load".

KV cache layout: one sequence id per batch slot plus one for scoring, and a non-unified cache
(``kv_unified=false``), so every sequence owns ``max_model_len`` cells of its own and attends only
to them; llama.cpp's own guidance for parallel decoding of unrelated prompts.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from wattserve.errors import ConfigError, ModelSourceError

log = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"
_LOG_ERROR, _LOG_WARN, _LOG_CONT = 3, 2, 5


def import_llama_cpp():
    """The ``llama_cpp.llama_cpp`` bindings, or a ConfigError naming how to install them.

    ggml's CPU threads are OpenMP threads. With libgomp's default (active) wait policy, threads
    that wait spin; on a host with more runnable threads than cores (a shared 2-core machine) a
    descheduled thread leaves the others spinning at its barrier and a 2-thread decode step ran 5-20x
    slower than with 1 thread (benchmarks/bench_llamacpp.py, docs/llamacpp.md). PASSIVE makes
    waiting threads sleep; libgomp reads it once, when the library loads, hence before the import.
    An OMP_WAIT_POLICY already in the environment wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import llama_cpp.llama_cpp as lib
    except ImportError as error:
        raise ConfigError(
            "engine llamacpp needs llama-cpp-python 0.3.36, which is not installed on this host "
            f"({error}); `./dev` builds it, or: CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON "
            "-DGGML_F16C=ON' pip install 'wattserve[llamacpp]'"
        ) from None
    return lib


class LogTap:
    """Keeps llama.cpp's last log lines (its only error channel) and forwards warnings and errors
    to Python logging. One per process: llama.cpp's log callback is global."""

    _instance: LogTap | None = None
    _guard = threading.Lock()

    def __init__(self, lib) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self._partial = ""
        self._level = 0

        def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            self._level = self._level if level == _LOG_CONT else level
            self._partial += (text or b"").decode("utf-8", "replace")
            while "\n" in self._partial:
                line, self._partial = self._partial.split("\n", 1)
                self.lines.append(line)
                if self._level == _LOG_ERROR:
                    log.error("llama.cpp: %s", line)
                elif self._level == _LOG_WARN:
                    log.debug("llama.cpp: %s", line)

        self._callback = lib.llama_log_callback(on_log)  # kept alive as long as the tap
        lib.llama_log_set(self._callback, ctypes.c_void_p(0))

    @classmethod
    def install(cls, lib) -> LogTap:
        with cls._guard:
            if cls._instance is None:
                cls._instance = cls(lib)
            return cls._instance

    def mark(self) -> int:
        self.lines.append("\x00mark")
        return len(self.lines)

    def since_mark(self) -> list[str]:
        """Lines logged since the last :meth:`mark` (the reasons of a failed call)."""
        lines = list(self.lines)
        start = max((i for i, line in enumerate(lines) if line == "\x00mark"), default=-1) + 1
        return [line.strip() for line in lines[start:] if line.strip()]


def check_gguf_file(path: Path) -> None:
    """Raise ModelSourceError unless ``path`` is a readable file that starts like a GGUF."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ModelSourceError(f"cannot read GGUF file {path}: {error}", path=str(path)) from None
    if magic != _GGUF_MAGIC:
        raise ModelSourceError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {_GGUF_MAGIC!r}); the llamacpp "
            "engine serves GGUF models only",
            path=str(path),
        )


def _load_failure(path: Path, what: str, lines: list[str]) -> ModelSourceError:
    reasons = [line for line in lines if "error" in line.lower() or "unknown" in line.lower() or "failed" in line.lower()]
    detail = "; ".join((reasons or lines)[-4:]) or "llama.cpp logged no reason"
    hint = ""
    if "unknown model architecture" in detail:
        hint = " (this llama.cpp build does not know the model's architecture: serve it with engine torch, or use a newer llama-cpp-python)"
    return ModelSourceError(f"llama.cpp could not {what} {path}: {detail}{hint}", path=str(path))


@dataclass(slots=True, frozen=True)
class ContextShape:
    """How the context is laid out: sequences, cells per sequence, and batch sizes."""

    n_seq: int  # sequence ids: the batch slots and one for scoring
    cells_per_seq: int  # KV cells each sequence owns: the expert's max_model_len
    n_batch: int  # most tokens one llama_decode takes
    n_ubatch: int
    threads: int
    threads_batch: int


class GgufModel:
    """A llama.cpp model over one GGUF file, then (:meth:`open_context`) its context. Only the
    engine loop thread decodes; tokenization (``tokenize``, ``piece``) is thread-safe in
    llama.cpp and may run on any thread."""

    def __init__(self, path: Path, n_gpu_layers: int = 0) -> None:
        lib = import_llama_cpp()
        self.lib = lib
        self.path = Path(path)
        self.ctx = None
        check_gguf_file(self.path)
        self.tap = LogTap.install(lib)
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self.tap.mark()
        model = lib.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model:
            raise _load_failure(self.path, "load", self.tap.since_mark())
        self.model = model
        self.vocab = lib.llama_model_get_vocab(model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(model))
        self.n_layer = int(lib.llama_model_n_layer(model))
        self.n_params = int(lib.llama_model_n_params(model))
        self.size_bytes = int(lib.llama_model_size(model))
        self.architecture = self.meta("general.architecture") or "unknown"
        self.bos_id = int(lib.llama_vocab_bos(self.vocab))
        self.eos_id = int(lib.llama_vocab_eos(self.vocab))
        self.adds_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        self.on_gpu = n_gpu_layers != 0 and bool(lib.llama_supports_gpu_offload())

    def open_context(self, shape: ContextShape) -> None:
        """Create the context: ``shape.n_seq`` sequences of ``shape.cells_per_seq`` KV cells each."""
        lib = self.lib
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = shape.n_seq * shape.cells_per_seq
        cparams.n_batch = shape.n_batch
        cparams.n_ubatch = min(shape.n_ubatch, shape.n_batch)
        cparams.n_seq_max = shape.n_seq
        cparams.n_threads = shape.threads
        cparams.n_threads_batch = shape.threads_batch
        cparams.kv_unified = False
        cparams.no_perf = True
        self.tap.mark()
        ctx = lib.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise _load_failure(self.path, f"create a context of {cparams.n_ctx} tokens for", self.tap.since_mark())
        self.ctx = ctx
        self.memory = lib.llama_get_memory(ctx)
        self.cells_per_seq = int(lib.llama_n_ctx_seq(ctx))

    # -- metadata and vocabulary ---------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # a long value (a chat template): ask again with room for it
            buf = ctypes.create_string_buffer(n + 1)
            self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        raw = self.lib.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", "replace") if raw else None

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) are parsed
        as such, like a Hugging Face tokenizer does. ``add_special``: the vocabulary's BOS rule."""
        data = text.encode("utf-8")
        room = len(data) + 8
        tokens = (ctypes.c_int32 * room)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), tokens, room, add_special, True)
        if n < 0:  # cannot happen with one slot per byte plus specials, but llama.cpp says how many
            room = -n
            tokens = (ctypes.c_int32 * room)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), tokens, room, add_special, True)
        return list(tokens[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token; control tokens render as nothing unless ``special``."""
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    # -- KV cache ----------------------------------------------------------------------------
    def forget(self, seq_id: int) -> None:
        """Remove every KV cell of ``seq_id``: its slot can take a new sequence."""
        self.lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def cells_used(self, seq_id: int) -> int:
        return int(self.lib.llama_memory_seq_pos_max(self.memory, seq_id)) + 1

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None


def default_threads() -> int:
    """The cores this process may run on (its affinity mask), what llama.cpp should use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
