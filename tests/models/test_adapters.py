"""LoRA glue: zero-B adapters, per-text losses against transformers, early-exit features, PEFT round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moespec.models import adapters
from tests.builders import one_torch_thread, save_tiny_llama

TEXTS = [
    "the film was great and the acting was fine",
    "stocks fell on the market today",
    "the patient reported a mild fever",
    "a short one",
]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("base"))


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _peft(base, rank=4):
    from peft import get_peft_model

    torch.manual_seed(0)
    return get_peft_model(base, adapters.lora_config(rank, 8.0, 0.0, ["q_proj", "v_proj", "down_proj"]))


def _logits(model, tokens):
    with torch.no_grad():
        return model(
            input_ids=torch.as_tensor(tokens.input_ids), attention_mask=torch.as_tensor(tokens.attention_mask)
        ).logits


def test_an_adapter_whose_b_is_zero_leaves_the_base_unchanged(base_folder):
    with one_torch_thread():
        base, tokenizer = _load(base_folder)
        tokens = adapters.tokenize_texts(tokenizer, TEXTS, 32)
        reference = _logits(base, tokens).clone()
        model = _peft(base)
        lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
        assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
        assert any(torch.count_nonzero(p) > 0 for name, p in model.named_parameters() if "lora_A" in name)
        assert torch.equal(_logits(model, tokens), reference)
        with torch.no_grad():
            lora_b[0].normal_()
        assert not torch.allclose(_logits(model, tokens), reference)  # the check above can fail


def test_text_nll_matches_the_loss_transformers_computes(base_folder):
    with one_torch_thread():
        base, tokenizer = _load(base_folder)
        tokens = adapters.tokenize_texts(tokenizer, TEXTS, 32)
        nll, counts = adapters.text_nll(base, tokens, batch_size=3, device="cpu")
        for row, text in enumerate(TEXTS):
            ids = torch.as_tensor(tokenizer(text)["input_ids"])[None]
            with torch.no_grad():
                expected = base(input_ids=ids, labels=ids).loss  # mean over the text's targets
            assert counts[row] == ids.shape[1] - 1
            np.testing.assert_allclose(nll[row] / counts[row], float(expected), rtol=1e-5)


def test_truncation_and_padding_keep_rows_right_padded(base_folder):
    _, tokenizer = _load(base_folder)
    tokenizer.padding_side = "left"
    tokens = adapters.tokenize_texts(tokenizer, TEXTS, 5)
    assert tokens.input_ids.shape == (4, 5)
    assert (tokens.lengths <= 5).all()
    for mask in tokens.attention_mask:  # real tokens form a prefix of each row
        assert (np.diff(mask) <= 0).all() and mask[0] == 1


def test_pooled_hidden_equals_the_hidden_state_of_a_full_forward_pass(base_folder):
    with one_torch_thread():
        base, tokenizer = _load(base_folder)
        tokens = adapters.tokenize_texts(tokenizer, TEXTS, 32)
        pooled = adapters.pooled_hidden(base, tokens, layer=1, batch_size=2, device="cpu")
        with torch.no_grad():
            hidden = base(
                input_ids=torch.as_tensor(tokens.input_ids),
                attention_mask=torch.as_tensor(tokens.attention_mask),
                output_hidden_states=True,
            ).hidden_states[1]
        mask = torch.as_tensor(tokens.attention_mask)[..., None].float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
        np.testing.assert_allclose(pooled, expected.numpy(), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="layer 3 is not a block"):
            adapters.pooled_hidden(base, tokens, layer=3, batch_size=2, device="cpu")


def test_targets_and_ranks_are_checked_against_the_model(base_folder):
    widths = adapters.linear_widths(adapters.meta_model(str(base_folder)))
    assert adapters.adapter_target_problems(widths, ["q_proj", "v_proj"], 8, "lora.adapter") == []
    missing = adapters.adapter_target_problems(widths, ["q_proj", "c_attn"], 8, "lora.adapter")
    assert len(missing) == 1 and "lora.adapter.target_modules" in missing[0] and "'c_attn'" in missing[0]
    assert "q_proj" in missing[0]  # the message lists the layers the model has
    # k_proj maps 32 -> 2 kv heads x 8 = 16 features: a rank of 17 exceeds its width.
    too_wide = adapters.adapter_target_problems(widths, ["q_proj", "k_proj"], 17, "lora.adapter")
    assert too_wide == [
        "lora.adapter.rank: 17 is above the width 16 of the 'k_proj' layers (min of their input and output sizes)"
    ]


def test_an_adapter_round_trips_through_peft(base_folder, tmp_path):
    from peft import PeftModel

    with one_torch_thread():
        base, tokenizer = _load(base_folder)
        tokens = adapters.tokenize_texts(tokenizer, TEXTS, 32)
        model = _peft(base)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.1)
        trained = _logits(model, tokens)
        model.save_pretrained(tmp_path / "adapter")
        fresh, _ = _load(base_folder)
        loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        assert torch.equal(_logits(loaded, tokens), trained)
        with loaded.disable_adapter():
            assert not torch.allclose(_logits(loaded, tokens), trained)


def test_the_trainable_view_holds_only_the_adapter(base_folder):
    with one_torch_thread():
        base, _ = _load(base_folder)
        view = adapters.TrainableView(_peft(base))
        state = view.state_dict()
        assert state and all("lora_" in key for key in state)
        assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in view.parameters())
        changed = {key: torch.full_like(value, 0.5) for key, value in state.items()}
        view.load_state_dict(changed)
        assert all(torch.equal(view.state_dict()[key], changed[key]) for key in state)


def test_the_uniform_merge_adds_the_mean_of_the_adapters_updates(base_folder, tmp_path):
    """route's merge baseline: add_weighted_adapter with "cat" and weights 1/n gives exactly mean(ΔW_i)."""
    from peft import PeftModel

    with one_torch_thread():
        for index in range(2):
            model = _peft(_load(base_folder)[0])
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_()
            model.save_pretrained(tmp_path / f"adapter{index}")
        merged = PeftModel.from_pretrained(_load(base_folder)[0], tmp_path / "adapter0", adapter_name="a0")
        merged.load_adapter(tmp_path / "adapter1", adapter_name="a1")
        merged.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], "merge", combination_type="cat")
        layer = merged.base_model.model.model.layers[1].mlp.down_proj
        deltas = [layer.get_delta_weight(name) for name in ("a0", "a1", "merge")]
    assert deltas[0].abs().max() > 0.1
    torch.testing.assert_close(deltas[2], (deltas[0] + deltas[1]) / 2, rtol=1e-5, atol=1e-6)
