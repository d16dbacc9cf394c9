"""Loading models: the built-in cache (deterministic, race-safe), clear errors, devices and dtypes."""

from __future__ import annotations

import threading

import pytest
import torch

from moespec.embedding import builtin
from moespec.embedding.loading import load_model, resolve_device, resolve_dtype
from moespec.errors import ConfigError


def test_builtin_models_load_through_the_auto_classes(tiny_bert, tiny_llama):
    assert type(tiny_bert.model).__name__ == "BertModel" and not tiny_bert.model.training
    assert type(tiny_llama.model).__name__ == "LlamaModel"
    assert tiny_bert.tokenizer.pad_token == "[PAD]" and tiny_bert.dtype == torch.float32
    folder = builtin.builtin_model_dir("builtin:tiny-bert")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert folder.is_relative_to(builtin.cache_root())


def test_builtin_build_is_deterministic_and_safe_when_two_builders_race(tmp_path, monkeypatch):
    def build_in(cache):
        monkeypatch.setenv("MOESPEC_CACHE", str(cache))
        results, errors = [], []

        def worker():
            try:
                results.append(builtin.builtin_model_dir("builtin:tiny-llama"))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(set(results)) == 1
        assert [p.name for p in (cache / "models").iterdir()] == ["tiny-llama-v1"]  # no leftover temp folder
        return results[0]

    first, second = build_in(tmp_path / "a"), build_in(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("MOESPEC_CACHE", str(tmp_path / "a"))
    assert builtin.builtin_model_dir("builtin:tiny-llama") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt


def _no_download(monkeypatch):
    """Make any from_pretrained call fail the test: an uncached model must be refused before it."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called for a model that is not cached")

    for cls in (transformers.AutoModel, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_uncached_hub_model_offline_is_refused_at_once_naming_the_fix_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _no_download(monkeypatch)
    with pytest.raises(ConfigError) as info:
        load_model("nobody-here/no-such-model-xyz")
    text = str(info.value)
    assert text.startswith(
        "embed.model.name: model 'nobody-here/no-such-model-xyz' is not in the cache "
        f"{tmp_path / 'hf' / 'hub'}, and HF_HUB_OFFLINE is set"
    )
    assert "hpc/README.md" in text and "run with HF_HUB_OFFLINE=1" not in text and "moespec.embedding" not in text


def test_uncached_hub_model_with_an_unreachable_hub_is_refused_without_retries(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _no_download(monkeypatch)
    with pytest.raises(ConfigError) as info:
        load_model("nobody-here/no-such-model-xyz")
    assert "the hub cannot be reached" in str(info.value)
    assert str(info.value).count("HF_HUB_OFFLINE=1") == 1 and "hpc/README.md" in str(info.value)


def fake_hub_cache(hf_home, repo_id: str, folder) -> None:
    """Lay out ``folder``'s files as huggingface_hub caches a downloaded model (refs/main -> snapshot)."""
    import shutil

    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_a_cached_hub_model_loads_from_the_cache_alone(tmp_path, monkeypatch):
    fake_hub_cache(tmp_path / "hf", "someone/tiny-bert", builtin.builtin_model_dir("builtin:tiny-bert"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    loaded = load_model("someone/tiny-bert")
    assert type(loaded.model).__name__ == "BertModel" and loaded.name == "someone/tiny-bert"


def test_bad_local_models_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="local model folder .* does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=f"cannot load model '{tmp_path}'"):
        load_model(str(tmp_path))  # a folder without config.json
    with pytest.raises(ConfigError, match="unknown built-in model 'builtin:huge'"):
        load_model("builtin:huge")
    with pytest.raises(ConfigError, match="has no revisions"):
        load_model("builtin:tiny-bert", revision="v2")


def test_dtype_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_device_auto_follows_the_runner_and_cuda_needs_a_gpu():
    assert resolve_device("auto", "cpu") == "cpu"
    assert resolve_device("cpu", "cuda") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="embed.model.device: 'cuda' asks for a GPU"):
            resolve_device("cuda")


def test_bfloat16_weights_still_pool_in_float32(corpus_texts):
    from moespec.embedding.encoder import TextEncoder

    loaded = load_model("builtin:tiny-bert", dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    rows = TextEncoder(loaded.model, loaded.tokenizer, max_length=32, batch_size=8).encode(corpus_texts[:8])[-1]
    assert rows.dtype == "float32"
