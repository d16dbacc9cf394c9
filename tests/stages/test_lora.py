"""The lora and route stages, run for real on a tiny LLaMA: adapters, routers, resume, bad input.

The synthetic case: three domains whose texts draw words from disjoint vocabularies, so that an
adapter trained on one domain must help that domain most, and keywords planted in the wrong
domains' texts, so that the seed's keyword rules mislead while the words themselves do not.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from moespec.artifacts import ArtifactWriter, open_artifact, write_artifact
from moespec.config import load_experiment
from moespec.errors import ConfigError
from moespec.launch.runner import run_inline
from moespec.stages import lora, route
from tests.builders import one_torch_thread, save_tiny_llama, word_tokenizer

DOMAINS = ["math", "code", "conversation"]
#: Planted keywords: code texts mention "calculate" (a math keyword), conversation texts "function" (code).
PLANTED = {"math": None, "code": "calculate", "conversation": "function"}
KEYWORDS = {"math": ["calculate", "+", "="], "code": ["python", "function"], "conversation": ["hello"]}


def _write_domains(folder, n_texts=36, words_per_text=16, seed=0):
    """One jsonl file per domain: texts of words from the domain's own slice of the tokenizer's vocabulary."""
    vocab = sorted(w for w in word_tokenizer().get_vocab() if w.isalpha() and len(w) > 2)
    rng = np.random.default_rng(seed)
    paths = {}
    for index, name in enumerate(DOMAINS):
        words = vocab[index * 60 : (index + 1) * 60]
        lines = []
        for row in range(n_texts):
            text = rng.choice(words, size=words_per_text).tolist()
            if PLANTED[name] and row % 2 == 0:
                text.insert(3, PLANTED[name])
            lines.append(json.dumps({"text": " ".join(text)}))
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


def lora_section(base, paths, **changes):
    section = {
        "base": {"name": str(base)},
        "data": [{"kind": "files", "paths": [str(paths[d])], "domain": d} for d in DOMAINS],
        "adapter": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "training": {
            "max_steps": 24,
            "batch_size": 8,
            "lr": 0.02,
            "eval_every": 8,
            "checkpoint_every": 4,
            "warmup_steps": 2,
        },
        "max_length": 24,
    }
    section.update(changes)
    return section


ROUTE = {
    "routers": [
        {"kind": "oracle"},
        {"kind": "base"},
        {"kind": "merge"},
        {"kind": "learned", "layer": 1},
        {"kind": "keyword", "rules": KEYWORDS, "default": "math"},
    ],
    "bootstrap": 200,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    return save_tiny_llama(folder / "base"), _write_domains(folder), folder


@pytest.fixture(scope="module")
def pipeline(setup):
    base, paths, folder = setup
    with one_torch_thread():
        dirs = run_inline(
            {"experiment": "lora", "lora": lora_section(base, paths), "route": ROUTE}, root=folder / "results"
        )
    lora_dir = next(v for k, v in dirs.items() if k[0] == "lora")
    route_dir = next(v for k, v in dirs.items() if k[0] == "route")
    return lora_dir, route_dir


def test_one_adapter_per_domain_is_written_in_peft_format(setup, pipeline):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moespec.models.adapters import text_nll, tokenize_texts

    base, _, _ = setup
    lora_dir, route_dir = pipeline
    with open_artifact(lora_dir) as reader, open_artifact(route_dir) as routed:
        assert reader.read("adapter_name").tolist() == DOMAINS
        assert (reader.read("steps_run") == 24).all()
        assert (reader.read("best_val_loss") < reader.read("base_val_loss")).all()
        assert reader["curves/train_loss"].shape == (3, 24) and reader["curves/val_step"][0].tolist() == [8, 16, 24]
        folder = lora_dir / reader.read("adapter_folder")[1]
        texts = [t for t, d in zip(routed.read("text_id"), routed.read("text_domain"))]
        code_rows = routed.read("text_domain") == 1
        expected = routed.read("text_nll")[1, code_rows]
    # The saved folder loads unchanged with PEFT's own API and scores the test texts as route did.
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    source = [json.loads(line)["text"] for line in (setup[1]["code"]).read_text().splitlines()]
    rows = [int(t.split("/")[1]) for t, is_code in zip(texts, code_rows) if is_code]
    with one_torch_thread():
        nll, _ = text_nll(model, tokenize_texts(tokenizer, [source[r] for r in rows], 24), 8, "cpu")
    np.testing.assert_allclose(nll, expected, rtol=1e-5)


def test_each_adapter_lowers_its_own_domains_loss_more_than_the_others(pipeline):
    _, route_dir = pipeline
    with open_artifact(route_dir) as reader:
        names = reader.read("model_names").tolist()
        matrix = reader.read("loss_matrix")  # (models, domains)
    base = matrix[names.index("base")]
    gain = base[None, :] - matrix[:3]  # (adapter, domain): how much each adapter lowers each domain's loss
    for adapter in range(3):
        others = [d for d in range(3) if d != adapter]
        assert gain[adapter, adapter] > gain[adapter, others].max(), gain
        assert matrix[adapter, adapter] < matrix[others, adapter].min(), matrix  # and it is the best adapter there


def test_the_learned_router_beats_keywords_that_mislead(pipeline):
    _, route_dir = pipeline
    summary = json.loads((route_dir / "summary.json").read_text())
    accuracy, gain = summary["router_accuracy"], summary["gain_recovered"]
    assert accuracy["oracle"] == 1.0 and gain["oracle"] == 1.0 and gain["base"] == 0.0
    assert "base" not in accuracy and "merge" not in accuracy  # they choose no domain
    assert accuracy["learned"] > 0.75 > 0.5 > accuracy["keyword"]  # keywords: right on math texts only
    assert gain["learned"] > gain["keyword"]
    with open_artifact(route_dir) as reader:
        keyword = reader.read("router_names").tolist().index("keyword")
        confusion = reader.read("confusion")[keyword]
        assert confusion.sum() == len(reader.read("text_id"))
        # Every code text with the planted "calculate" went to math, every planted conversation text to code.
        assert confusion[1, 0] > 0 and confusion[2, 1] > 0
        low, high = reader.read("gain_recovered_low"), reader.read("gain_recovered_high")
        point = reader.read("gain_recovered")
        assert ((low <= point) & (point <= high))[np.isfinite(low)].all()
        assert reader.read("routing_seconds_per_text")[keyword] > 0
        assert reader.h5.attrs["base_forward_seconds_per_text"] > 0


def _run_shard(cfg, folder, shard=0):
    writer = ArtifactWriter(
        folder, "lora", "test", schema=lora.schema(cfg), shard_index=shard, num_shards=cfg.num_shards()
    )
    with write_artifact(writer):
        lora.run(cfg, {}, writer)
    return writer.path


def test_resume_after_preemption_is_bit_identical(setup, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from moespec.models.adapters import AdapterObjective

    base, paths, _ = setup
    cfg = lora.Config.model_validate(lora_section(base, paths))
    with one_torch_thread():
        reference = _run_shard(cfg, tmp_path / "reference")
        real_batch = AdapterObjective.train_batch
        calls = []

        def preempted(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 11:
                raise KeyboardInterrupt("preempted")
            return real_batch(self, *args, **kwargs)

        monkeypatch.setattr(AdapterObjective, "train_batch", preempted)
        with pytest.raises(KeyboardInterrupt):
            _run_shard(cfg, tmp_path / "resumed")
        assert (tmp_path / "resumed" / "work.shard-00000" / "checkpoint.pt").exists()
        assert not list((tmp_path / "resumed").glob("adapter-*"))  # nothing half-written under a final name
        monkeypatch.setattr(AdapterObjective, "train_batch", real_batch)
        resumed = _run_shard(cfg, tmp_path / "resumed")
    folder = lora.adapter_folder_name(0, "math")
    expected = load_file(tmp_path / "reference" / folder / "adapter_model.safetensors")
    found = load_file(tmp_path / "resumed" / folder / "adapter_model.safetensors")
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[k], found[k]) for k in expected)
    with h5py.File(reference) as a, h5py.File(resumed) as b:
        np.testing.assert_array_equal(a["curves/train_loss"][()], b["curves/train_loss"][()])
        np.testing.assert_array_equal(a["curves/val_loss"][()], b["curves/val_loss"][()])


# --------------------------------------------------------------------------------------------------
# bad input


def _problems(config):
    with pytest.raises(ConfigError) as caught:
        load_experiment(config)
    return "\n".join(caught.value.problems)


def test_an_adapter_target_the_base_lacks_is_a_validate_time_error(setup):
    base, paths, _ = setup
    section = lora_section(base, paths, adapter={"target_modules": ["q_proj", "c_attn"]})
    message = _problems({"experiment": "x", "lora": section})
    assert "lora.adapter.target_modules: the base model has no linear layer named 'c_attn'" in message


def test_a_rank_above_the_layer_width_is_a_validate_time_error(setup):
    base, paths, _ = setup
    section = lora_section(base, paths, adapter={"rank": 40, "target_modules": ["q_proj"]})
    assert "lora.adapter.rank: 40 is above the width 32 of the 'q_proj' layers" in _problems(
        {"experiment": "x", "lora": section}
    )


def test_a_keyword_router_without_a_default_domain_is_an_error(setup):
    base, paths, _ = setup
    routers = [{"kind": "oracle"}, {"kind": "base"}, {"kind": "keyword", "rules": KEYWORDS}]
    message = _problems({"experiment": "x", "lora": lora_section(base, paths), "route": {"routers": routers}})
    assert "route.routers[2]: default: a keyword router needs a default domain" in message


def test_keyword_rules_must_name_domains_of_the_lora_data(setup):
    base, paths, _ = setup
    routers = [
        {"kind": "oracle"},
        {"kind": "base"},
        {"kind": "keyword", "rules": {"poetry": ["rhyme"]}, "default": "knowledge"},
    ]
    message = _problems({"experiment": "x", "lora": lora_section(base, paths), "route": {"routers": routers}})
    assert "route.routers[2].rules: domain(s) ['poetry'] are not domains of lora.data" in message
    assert "route.routers[2].default: domain(s) ['knowledge']" in message


def test_gain_recovered_needs_the_base_and_oracle_routers(setup):
    base, paths, _ = setup
    message = _problems(
        {
            "experiment": "x",
            "lora": lora_section(base, paths),
            "route": {"routers": [{"kind": "learned"}, {"kind": "base"}]},
        }
    )
    assert "route.routers: gain recovered needs a base and an oracle router; add {kind: oracle}" in message


def test_a_domain_with_too_few_texts_to_split_is_an_error(setup, tmp_path):
    base, paths, _ = setup
    section = lora_section(base, paths, data=[{"kind": "builtin", "n_per_domain": 2, "domains": ["movies", "news"]}])
    assert "lora.data[0].n_per_domain: 2 text(s) per domain cannot be split into training, validation and test" in (
        _problems({"experiment": "x", "lora": section})
    )
    # Known only once the file is read: a clear error at run time, naming the key and the domain.
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "one"}\n{"text": "two"}\n')
    cfg = lora.Config.model_validate(
        lora_section(
            base,
            paths,
            data=[
                {"kind": "files", "paths": [str(paths["math"])], "domain": "math"},
                {"kind": "files", "paths": [str(short)], "domain": "short"},
            ],
        )
    )
    with pytest.raises(Exception, match=r"lora.data: domain\(s\) short \(2\) have too few texts"):
        _run_shard(cfg, tmp_path / "run")
    assert not list((tmp_path / "run").glob("*.h5"))


def test_route_refuses_a_learned_layer_the_base_lacks(setup, pipeline, tmp_path):
    lora_dir, _ = pipeline
    cfg = route.Config.model_validate(
        {"routers": [{"kind": "oracle"}, {"kind": "base"}, {"kind": "learned", "layer": 5}], "bootstrap": 0}
    )
    writer = ArtifactWriter(tmp_path, "route", "test", schema=route.schema(cfg))
    with open_artifact(lora_dir) as reader, pytest.raises(ConfigError, match="layer 5 is above the 2 blocks"):
        with write_artifact(writer), one_torch_thread():
            route.run(cfg, {"lora": reader}, writer)
    assert not list(tmp_path.glob("*.h5"))


# --------------------------------------------------------------------------------------------------
# a base this pipeline trained


def test_adapters_over_the_lm_stages_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = {
        "experiment": "lm-base",
        "lm": {
            "data": [{"kind": "builtin", "n_per_domain": 20, "domains": ["movies", "medical"]}],
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
            "model": {
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "num_experts": 4,
                "top_k": 2,
                "expert_size": 32,
            },
            "seq_len": 32,
            "batch_size": 4,
            "max_steps": 4,
            "warmup_steps": 1,
            "eval_every": 2,
        },
        "lora": {
            "base": {"kind": "lm"},
            "data": [{"kind": "builtin", "n_per_domain": 10, "domains": ["movies", "medical"], "seed": 1}],
            "adapter": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": 2, "batch_size": 4, "eval_every": 2},
            "max_length": 24,
        },
        "route": {"routers": [{"kind": "oracle"}, {"kind": "base"}], "bootstrap": 0},
    }
    assert "lora: reads the lm stage (lm) but the experiment has no lm section" in _problems(
        {k: v for k, v in config.items() if k != "lm"}
    )
    # The lm section describes the base: targets and rank are checked against it before anything runs.
    wrong = {**config, "lora": {**config["lora"], "adapter": {"rank": 40, "target_modules": ["q_proj", "c_attn"]}}}
    message = _problems(wrong)
    assert "lora.adapter.target_modules: the base model has no linear layer named 'c_attn'" in message
    assert "lora.adapter.rank: 40 is above the width 32 of the 'q_proj' layers" in message
    with one_torch_thread():
        dirs = run_inline(config, root=tmp_path)
    lm_dir = next(v for k, v in dirs.items() if k[0] == "lm")
    lora_dir = next(v for k, v in dirs.items() if k[0] == "lora")
    with open_artifact(lora_dir) as reader:
        assert reader.h5.attrs["base"] == f"lm {lm_dir.name}"
        assert reader.h5.attrs["base_path"] == str(lm_dir / "model")
        folder = lora_dir / reader.read("adapter_folder")[0]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_dir / "model"), folder)
    assert any("lora_A" in name for name, _ in model.named_parameters())
    summary = json.loads((next(v for k, v in dirs.items() if k[0] == "route") / "summary.json").read_text())
    assert summary["gain_recovered"]["oracle"] == 1.0
