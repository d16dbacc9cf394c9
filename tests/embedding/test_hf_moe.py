"""Router capture and expert ablation in HF MoE models, checked against known answers.

Tiny random Mixtral, Qwen2-MoE, OLMoE and Switch-Transformers models are built in code, saved with
``save_pretrained`` and loaded through ``from_pretrained`` like real checkpoints
(:func:`save_tiny_moe`, also used by the ablate stage's tests).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from moespec.embedding import hf_moe
from moespec.embedding.hf_moe import BlockReplay, RouterAblation, RouterHooks
from moespec.errors import ConfigError
from tests.builders import N_EXPERTS, TOP_K, save_tiny_moe, tiny_config, word_tokenizer

# --------------------------------------------------------------------------------------------------
# tests

TEXTS = [
    "the movie was great and the cast was fine",
    "stocks fell in the market today",
    "the patient reported a mild fever",
    "a short one",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-moe")
    return {
        kind: save_tiny_moe(kind, root / kind, n_layers=3 if kind == "mixtral" else 2)
        for kind in ("mixtral", "qwen2_moe", "olmoe", "switch")
    }


@pytest.fixture(scope="module")
def mixtral(folders):
    return hf_moe.load_moe_model(str(folders["mixtral"]), task="lm", dtype="float32")


@pytest.fixture(scope="module")
def qwen(folders):
    return hf_moe.load_moe_model(str(folders["qwen2_moe"]), task="lm", dtype="float32")


def _batch(loaded, texts=TEXTS):
    return loaded.tokenizer(texts, padding=True, return_tensors="pt")


def _mask(*experts, n=N_EXPERTS):
    row = torch.zeros(1, n, dtype=torch.bool)
    row[0, list(experts)] = True
    return row


def test_routers_are_found_in_every_layer(mixtral, qwen):
    assert [s.name for s in mixtral.sites] == [f"model.layers.{i}.mlp.gate" for i in range(3)]
    assert [(s.block_stack, s.block_index) for s in mixtral.sites] == [("model.layers", i) for i in range(3)]
    assert all(s.renormalize and s.top_k == TOP_K and s.n_experts == N_EXPERTS for s in mixtral.sites)
    assert not any(s.renormalize for s in qwen.sites)  # norm_topk_prob=False in the tiny config
    assert mixtral.tokenizer.padding_side == "right"


def test_captured_logits_equal_the_models_own_router_logits(mixtral, qwen, folders):
    olmoe = hf_moe.load_moe_model(str(folders["olmoe"]), task="lm", dtype="float32")
    assert [type(s.module).__name__ for s in olmoe.sites] == ["OlmoeTopKRouter"] * 2
    for loaded in (mixtral, qwen, olmoe):
        batch = _batch(loaded)
        with torch.no_grad(), RouterHooks(loaded.sites) as hooks:
            hooks.capture = True
            output = loaded.model(**batch, output_router_logits=True)
        for captured, reference in zip(hooks.logits, output.router_logits):
            torch.testing.assert_close(captured, reference.float())


def test_hooks_without_ablation_change_nothing(mixtral):
    batch = _batch(mixtral)
    with torch.no_grad():
        reference = mixtral.model(**batch).logits
        with RouterHooks(mixtral.sites) as hooks:
            hooks.capture = True
            hooked = mixtral.model(**batch).logits
    torch.testing.assert_close(hooked, reference, rtol=0, atol=0)


def _without_expert(folder, expert):
    """The same Mixtral with ``expert`` removed from every layer: what masking it must equal."""
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = tiny_config("mixtral", model.config.vocab_size, n_layers=3)
    config.num_local_experts = N_EXPERTS - 1
    smaller = MixtralForCausalLM(config)
    keep = [e for e in range(N_EXPERTS) if e != expert]
    state = {
        k: (v[keep] if k.endswith(("gate.weight", "gate_up_proj", "down_proj")) else v)
        for k, v in model.state_dict().items()
    }
    smaller.load_state_dict(state)
    return smaller.eval()


def test_mask_equals_the_model_without_the_expert(mixtral, folders):
    batch = _batch(mixtral)
    with torch.no_grad(), RouterHooks(mixtral.sites) as hooks:
        with hooks.ablating(RouterAblation(_mask(1), "mask", layer=None)):
            masked = mixtral.model(**batch).logits
        reference = _without_expert(folders["mixtral"], 1)(**batch).logits
        baseline = mixtral.model(**batch).logits
    torch.testing.assert_close(masked, reference, rtol=1e-5, atol=1e-5)
    assert (masked - baseline).abs().max() > 1e-3


def test_zero_equals_zeroed_expert_weights_in_that_layer(mixtral):
    batch = _batch(mixtral)
    experts = mixtral.model.model.layers[1].mlp.experts
    with torch.no_grad(), RouterHooks(mixtral.sites) as hooks:
        with hooks.ablating(RouterAblation(_mask(2), "zero", layer=1)):
            zeroed = mixtral.model(**batch).logits
        saved = experts.down_proj.data[2].clone()
        experts.down_proj.data[2] = 0.0
        try:
            reference = mixtral.model(**batch).logits
        finally:
            experts.down_proj.data[2] = saved
    torch.testing.assert_close(zeroed, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["mixtral", "qwen"])
def test_renormalise_drops_the_expert_without_rerouting(which, mixtral, qwen):
    loaded = {"mixtral": mixtral, "qwen": qwen}[which]
    router = loaded.sites[0].module
    hidden = torch.randn(20, router.weight.shape[1])
    with torch.no_grad():
        _, weights, index = router(hidden)
        with RouterHooks(loaded.sites) as hooks, hooks.ablating(RouterAblation(_mask(0), "drop", layer=0)):
            _, dropped, same_index = router(hidden)
    assert torch.equal(index, same_index)  # no re-routing
    hit = index == 0
    assert hit.any() and (dropped[hit] == 0).all()
    kept = hit.any(-1)
    if loaded.sites[0].renormalize:  # Mixtral, top-2: the other selected expert gets all the weight
        torch.testing.assert_close(dropped[kept].sum(-1), torch.ones(int(kept.sum())))
    else:  # Qwen2-MoE without norm_topk_prob: the other weights stay as they were
        torch.testing.assert_close(dropped[~hit], weights[~hit])
    torch.testing.assert_close(dropped[~kept], weights[~kept])


def test_qwen_mask_reroutes_and_keeps_the_shared_expert(qwen):
    batch = _batch(qwen)
    with torch.no_grad(), RouterHooks(qwen.sites) as hooks:
        chosen = []
        handle = qwen.sites[1].module.register_forward_hook(lambda m, a, out: chosen.append(out[2]))
        with hooks.ablating(RouterAblation(_mask(3), "mask", layer=1)):
            qwen.model(**batch)
        handle.remove()
    assert not (chosen[0] == 3).any()  # hooks run in order: the recorder sees the re-routed choice
    assert chosen[0].shape[-1] == TOP_K


def test_replay_and_batched_copies_equal_full_single_passes(mixtral):
    batch = _batch(mixtral)
    replay = BlockReplay(mixtral.model, mixtral.sites)
    masks = torch.eye(N_EXPERTS, dtype=torch.bool)
    with torch.no_grad(), RouterHooks(mixtral.sites) as hooks:
        with replay.recording():
            mixtral.model(**batch)
        ablation = RouterAblation(masks, "mask", layer=2)
        with hooks.ablating(ablation), replay.replaying(mixtral.sites[2], N_EXPERTS) as used:
            batched = mixtral.model(**hf_moe.repeat_batch(batch, N_EXPERTS)).logits
        assert used and not replay.can_replay(mixtral.sites[0])  # nothing comes before the first block
        for expert in range(N_EXPERTS):
            with hooks.ablating(RouterAblation(masks[expert : expert + 1], "mask", layer=2)):
                single = mixtral.model(**batch).logits
            rows = slice(expert * len(TEXTS), (expert + 1) * len(TEXTS))
            torch.testing.assert_close(batched[rows], single, rtol=1e-5, atol=1e-5)


def test_token_nll_matches_the_models_own_loss(mixtral):
    batch = _batch(mixtral, TEXTS[:1])
    with torch.no_grad():
        output = mixtral.model(**batch, labels=batch["input_ids"])
    nll = hf_moe.token_nll(output.logits, batch["input_ids"], batch["attention_mask"])
    assert float(nll.sum() / nll.shape[1]) == pytest.approx(float(output.loss), rel=1e-5)
    padded = _batch(mixtral)
    counts = padded["attention_mask"][:, 1:].sum(-1)
    losses = hf_moe.next_token_loss(mixtral.model, padded)
    assert losses.shape == (len(TEXTS),) and (counts < counts.max()).any()


def test_run_texts_restores_text_order_and_matches_single_passes(mixtral):
    masks = np.eye(N_EXPERTS, dtype=bool)[[0, 3]]
    result = hf_moe.run_texts(
        mixtral,
        TEXTS,
        hf_moe.next_token_loss,
        max_length=16,
        batch_size=3,
        tokens_per_pass=64,
        masks=masks,
        layers=np.array([1, 2]),
        modes=("mask", "zero"),
        record_routing=True,
    )
    for i, text in enumerate(TEXTS):
        alone = hf_moe.next_token_loss(mixtral.model, _batch(mixtral, [text]))
        assert result.base[i] == pytest.approx(alone[0], rel=1e-5)
    assert result.ablated["mask"].shape == (2, len(TEXTS)) and result.ablated["zero"].shape == (2, len(TEXTS))
    with torch.no_grad(), RouterHooks(mixtral.sites) as hooks, hooks.ablating(RouterAblation(_mask(3), "zero", 2)):
        expected = hf_moe.next_token_loss(mixtral.model, _batch(mixtral, [TEXTS[1]]))
    assert result.ablated["zero"][1, 1] == pytest.approx(expected[0], rel=1e-5)
    routing = result.routing
    n_real = sum(len(ids) for ids in mixtral.tokenizer(TEXTS)["input_ids"])
    assert routing.probs.shape == (n_real, 3, N_EXPERTS) and routing.expert_index.shape == (n_real, 3, TOP_K)
    assert routing.text.tolist() == sorted(routing.text.tolist()) and routing.position[0] == 0
    first_text = mixtral.tokenizer(TEXTS[:1])["input_ids"][0]
    assert routing.token_id[: len(first_text)].tolist() == first_text
    np.testing.assert_allclose(routing.probs.sum(-1), 1.0, rtol=1e-5)


def test_switch_encoder_capture_and_ablation(folders):
    loaded = hf_moe.load_moe_model(str(folders["switch"]), task="probe", dtype="float32")
    assert all(s.kind == "switch" and s.top_k == 1 for s in loaded.sites) and len(loaded.sites) == 2
    batch = _batch(loaded)
    router = loaded.sites[0].module
    dispatched = []
    with torch.no_grad(), RouterHooks(loaded.sites) as hooks:
        # Registered after the ablation hook, so it sees the output as the MoE block will.
        handle = router.register_forward_hook(lambda m, a, out: dispatched.append(out[0]))
        hooks.capture = True
        base = hf_moe.pooled_state(loaded.model, batch)
        expert = int(hooks.logits[0].argmax(-1).mode().values)
        hooks.capture = False
        with hooks.ablating(RouterAblation(_mask(expert), "mask", layer=0)):
            masked = hf_moe.pooled_state(loaded.model, batch)
        with hooks.ablating(RouterAblation(_mask(expert), "zero", layer=0)):
            hf_moe.pooled_state(loaded.model, batch)
    handle.remove()
    assert dispatched[0][..., expert].sum() > 0 and dispatched[1][..., expert].sum() == 0
    assert torch.equal(dispatched[2], dispatched[0])  # zero keeps the routing
    assert np.abs(masked - base).max() > 1e-4


def test_not_an_moe_and_wrong_task_are_clear_errors(tmp_path, folders):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    with pytest.raises(ConfigError, match="LlamaForCausalLM is not a mixture-of-experts model"):
        hf_moe.load_moe_model(str(tmp_path / "llama"), task="lm")
    with pytest.raises(ConfigError, match="not a causal language model.*use task 'probe'"):
        hf_moe.load_moe_model(str(folders["switch"]), task="lm")
    with pytest.raises(ConfigError, match="does not exist"):
        hf_moe.load_moe_model(str(tmp_path / "missing"), task="lm")
