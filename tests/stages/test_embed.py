"""The embed stage end to end through the runner: artifacts, shards, modes, errors, config checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moespec.artifacts import open_artifact
from moespec.config import load_experiment
from moespec.errors import ConfigError, StageError
from moespec.launch.runner import run_inline
from tests.builders import one_torch_thread


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    """No hub lookups; one torch thread (tiny models, small batches, a possibly shared box)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with one_torch_thread():
        yield


def _experiment(**embed):
    section = {
        "model": {"name": "builtin:tiny-bert"},
        "data": [{"kind": "builtin", "n_per_domain": 4}],
        "batch_size": 8,
        "max_length": 48,
        **embed,
    }
    return {"experiment": "e", "embed": section}


def _run(tmp_path, **embed):
    arts = run_inline(_experiment(**embed), root=tmp_path)
    return sorted(set(arts.values()))[0]


def _reference(texts, name="builtin:tiny-bert", **kw):
    from moespec.embedding import TextEncoder, load_model

    loaded = load_model(name)
    encoder = TextEncoder(loaded.model, loaded.tokenizer, **{"max_length": 48, "batch_size": 8, **kw})
    return encoder.encode(texts, sort_by_length=False)


def test_embed_writes_rows_in_source_order_with_metadata(tmp_path):
    from moespec.data import BuiltinSource

    folder = _run(tmp_path)
    texts = BuiltinSource(n_per_domain=4).load()
    with open_artifact(folder) as art:
        embeddings = art["embeddings"][:]
        assert embeddings.shape == (24, 256) and embeddings.dtype == np.float32
        assert list(art.read("text_id")) == texts.text_id
        assert list(art.read("domain_names")) == texts.domain_names
        assert np.array_equal(art.read("domain"), texts.domain) and np.array_equal(art.read("label"), texts.label)
        assert list(art.read("label_names")) == texts.label_names
        attrs = art.attrs
        assert (attrs["model_name"], attrs["pooling"], attrs["max_length"], attrs["dtype"]) == (
            "builtin:tiny-bert",
            "mean",
            48,
            "float32",
        )
        assert list(attrs["layers"]) == [-1] and list(attrs["layer_indices"]) == [4]
        assert attrs["row_offset"] == 0 and attrs["n_total"] == 24
        assert json.loads(attrs["sources"])[0]["kind"] == "builtin"
    assert np.abs(embeddings - _reference(texts.texts)[-1]).max() <= 1e-5
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["n_texts"] == 24 and summary["dim"] == 256 and summary["tokens"] > 24
    assert 0 < summary["pad_efficiency"] <= 1 and summary["tokens_per_s"] > 0


def test_layer_list_stores_every_layer_and_first_as_embeddings(tmp_path):
    folder = _run(tmp_path, layer=[1, -1], storage_dtype="float16")
    with open_artifact(folder) as art:
        assert {"layers/1", "layers/-1"} <= set(art.names())
        assert art["embeddings"].dtype == np.float16
        assert np.array_equal(art["embeddings"][:], art["layers/1"][:])
        assert not np.allclose(art["layers/1"][:], art["layers/-1"][:])
        assert list(art.attrs["layer_indices"]) == [1, 4]


def test_sharded_llama_equals_unsharded_and_keeps_offsets(tmp_path):
    settings = {"model": {"name": "builtin:tiny-llama"}, "pooling": "last"}
    whole = _run(tmp_path / "one", **settings)
    arts = run_inline(_experiment(shards=4, **settings), root=tmp_path / "four")
    assert len(arts) == 4
    folder = next(iter(arts.values()))
    with open_artifact(whole) as one, open_artifact(folder) as many:
        assert many["embeddings"].is_virtual
        assert np.abs(many["embeddings"][:] - one["embeddings"][:]).max() <= 1e-5
        assert list(many.read("text_id")) == list(one.read("text_id"))
    offsets = []
    for shard in sorted(folder.glob("embed.shard-*.h5")):
        with open_artifact(shard) as part:
            offsets.append((part.attrs["row_offset"], part["embeddings"].shape[0], part.attrs["n_total"]))
    assert offsets == [(0, 6, 24), (6, 6, 24), (12, 6, 24), (18, 6, 24)]


def test_token_embedding_mode_exports_the_input_embedding_matrix(tmp_path):
    from moespec.embedding import load_model

    experiment = {
        "experiment": "e",
        "embed": {"model": {"name": "builtin:tiny-bert"}, "mode": "token_embeddings", "shards": 2},
    }
    folder = next(iter(run_inline(experiment, root=tmp_path).values()))
    loaded = load_model("builtin:tiny-bert")
    weight = loaded.model.get_input_embeddings().weight.detach().numpy()
    with open_artifact(folder) as art:
        assert np.array_equal(art["embeddings"][:], weight)
        ids = art.read("token_id")
        assert np.array_equal(ids, np.arange(len(weight)))
        assert list(art.read("text_id")[:3]) == ["[PAD]", "[UNK]", "[CLS]"]
        assert set(art.read("label").tolist()) == {-1} and list(art.read("domain_names")) == ["tokens"]


def test_files_and_builtin_sources_together(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"body": f"text {i} " * (1 + i), "y": i % 2}) + "\n" for i in range(6)))
    data = [
        {"kind": "files", "paths": [str(path)], "text_field": "body", "label_field": "y", "n": 4},
        {"kind": "builtin", "n_per_domain": 2, "domains": ["news"]},
    ]
    with open_artifact(_run(tmp_path, data=data)) as art:
        assert list(art.read("domain_names")) == ["mine", "news"]
        assert list(art.read("label_names"))[:2] == ["mine/0", "mine/1"]
        assert art["embeddings"].shape == (6, 256)


def test_nan_model_fails_the_task_and_writes_nothing(tmp_path):
    import torch

    from moespec.embedding import load_model

    loaded = load_model("builtin:tiny-bert")
    with torch.no_grad():
        loaded.model.encoder.layer[0].attention.output.LayerNorm.bias.fill_(float("nan"))
    broken = tmp_path / "broken-bert"
    loaded.model.save_pretrained(broken)
    loaded.tokenizer.save_pretrained(broken)
    with pytest.raises(StageError, match="produced NaN/inf embeddings"):
        run_inline(_experiment(model={"name": str(broken)}), root=tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.h5")) and not list((tmp_path / "out").rglob("*.tmp"))


def test_unknown_model_fails_with_its_name(tmp_path):
    with pytest.raises(StageError, match="model 'nobody-here/no-such-model' is not in the cache"):
        run_inline(_experiment(model={"name": "nobody-here/no-such-model"}), root=tmp_path)
    with pytest.raises(ConfigError, match="embed.model.name: unknown built-in model"):
        load_experiment(_experiment(model={"name": "builtin:gigantic"}))


@pytest.mark.parametrize(
    "embed, message",
    [
        ({"mode": "token_embeddings"}, "mode token_embeddings exports the vocabulary matrix; remove data"),
        ({"data": [{"kind": "builtin"}, {"kind": "builtin", "domains": ["news"]}]}, "domain(s) ['news'] come from"),
        ({"data": []}, "give at least one text source"),
        ({"layer": []}, "must be non-empty"),
        ({"shards": 0}, "embed.shards:"),
        ({"data": [{"kind": "files", "paths": ["/x.jsonl", "/y.csv"]}]}, "embed.data[0]: paths mix formats"),
    ],
)
def test_config_problems_are_reported_at_load_time(embed, message):
    with pytest.raises(ConfigError) as info:
        load_experiment(_experiment(**embed))
    assert message in str(info.value)


def test_more_shards_than_texts_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="has no rows: there are only 6 rows"):
        run_inline(_experiment(shards=7, data=[{"kind": "builtin", "n_per_domain": 1}]), root=tmp_path)


def test_validating_an_embed_config_imports_neither_torch_nor_datasets():
    code = (
        "import sys; from moespec.stages import embed; embed.Config.model_validate({'data': [{'kind': 'hf', "
        "'name': 'x'}]}); print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
