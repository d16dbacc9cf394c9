"""Decoder-only language models over transformers' own architectures: an MoE LM and its dense twin.

:class:`LMModelConfig` describes a Qwen2-MoE causal LM (experts, top-k, ``decoder_sparse_step``,
``mlp_only_layers``, a shared expert, ``norm_topk_prob``) and, with one line (``dense_twin``), the
dense model matched to it: a Qwen2 (or Llama) causal LM with the same width, depth, heads,
vocabulary and positions whose FFN width makes its parameter count equal the MoE's *active*
parameters (``dense_twin: active``) or its *total* parameters (``dense_twin: total``). Every model
is a plain ``transformers`` model: ``save_pretrained`` writes a folder that
``AutoModelForCausalLM.from_pretrained`` loads.

Parameter counts (:func:`parameter_counts`): ``total`` is every parameter; ``active`` is what one
token uses, every parameter except the routed experts it is not sent to,
``total - n_moe_layers * (E - k) * 3 * d * I``, embeddings and output head included (the
convention of OLMoE and of ``docs/lm.md``).

What transformers lacks and this module adds, thinly, without changing the saved model:
``dropout`` on each block's attention and FFN output (forward hooks, training mode only; Qwen2 has
only attention-probability dropout, which is set too), the router z-loss (ST-MoE, Zoph et al.
2022, eq. 5) computed from the router logits the model returns, and the ``sorted_mm`` experts
implementation (:mod:`moespec.models.experts`).

This module imports neither torch nor transformers at import time (configs validate on a laptop).
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Experts implementations a config may name (``auto`` measures and picks, see :func:`choose_experts_implementation`).
ExpertsImplementation = Literal["auto", "eager", "grouped_mm", "batched_mm", "sorted_mm"]
#: Candidates ``auto`` times per device type; ``batched_mm`` copies a weight matrix per token and
#: measured 45x slower than ``eager`` on a CPU (docs/lm.md), so it is never tried there.
AUTO_CANDIDATES = {"cpu": ("eager", "sorted_mm"), "cuda": ("eager", "grouped_mm", "batched_mm", "sorted_mm")}


class LMModelConfig(BaseModel):
    """A decoder MoE LM over one of transformers' MoE architectures, or the dense model matched to it.

    Attributes
    ----------
    architecture : {"qwen2_moe", "mixtral", "olmoe"}
        transformers' MoE causal LM: Qwen2-MoE (MoE every ``decoder_sparse_step``-th block,
        ``mlp_only_layers``, a shared expert, biased q/k/v), Mixtral (every block MoE, top-k weights
        always renormalised) or OLMoE (every block MoE, q/k RMS norms). The last two have no shared
        expert and no dense blocks.
    hidden_size, num_layers, num_heads : int
        Width, blocks, attention heads.
    num_kv_heads : int, optional
        Key/value heads (grouped-query attention); None = ``num_heads``.
    intermediate_size : int, optional
        FFN width of the blocks that are dense in the MoE model (``mlp_only_layers`` and the
        blocks between sparse ones); None = 4 x ``hidden_size``.
    num_experts, top_k : int
    expert_size : int, optional
        FFN width of one routed expert (``moe_intermediate_size``); None = ``hidden_size``.
    shared_expert_size : int
        Width of Qwen2-MoE's always-on shared expert (0 = none).
    decoder_sparse_step : int
        Block ``i`` (0-based) is an MoE block when ``(i + 1) % decoder_sparse_step == 0``.
    mlp_only_layers : list of int
        Blocks forced dense.
    norm_topk_prob : bool
        Renormalise the top-k routing weights to sum to 1.
    dense_twin : {None, "active", "total"}
        Build the dense model whose parameter count matches this MoE's active (or total) count.
    dense_architecture : {"qwen2", "llama"}
        Architecture of the dense twin.
    vocab_size : int, optional
        Embedding rows; None = the tokenizer's size. Set, it must be at least the tokenizer's.
    max_positions : int, optional
        Longest sequence the model accepts; None = the stage's ``seq_len``.
    tie_embeddings : bool
    rope_theta : float
    dropout : float
        Dropout on attention probabilities and on each block's attention and FFN output.
    init_std : float
    experts_implementation : {"auto", "eager", "grouped_mm", "batched_mm", "sorted_mm"}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Literal["qwen2_moe", "mixtral", "olmoe"] = "qwen2_moe"
    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: Optional[int] = Field(None, ge=1)
    intermediate_size: Optional[int] = Field(None, ge=1)
    num_experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    expert_size: Optional[int] = Field(None, ge=1)
    shared_expert_size: int = Field(0, ge=0)
    decoder_sparse_step: int = Field(1, ge=1)
    mlp_only_layers: list[int] = Field(default_factory=list)
    norm_topk_prob: bool = False
    dense_twin: Optional[Literal["active", "total"]] = None
    dense_architecture: Literal["qwen2", "llama"] = "qwen2"
    vocab_size: Optional[int] = Field(None, ge=2)
    max_positions: Optional[int] = Field(None, ge=2)
    tie_embeddings: bool = False
    rope_theta: float = Field(10000.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_std: float = Field(0.02, gt=0.0)
    experts_implementation: ExpertsImplementation = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> "LMModelConfig":
        problems = []
        if self.top_k > self.num_experts:
            problems.append(f"top_k {self.top_k} is above num_experts {self.num_experts}")
        if self.decoder_sparse_step > self.num_layers:
            problems.append(
                f"decoder_sparse_step {self.decoder_sparse_step} is above num_layers {self.num_layers} "
                f"(no block would be an MoE block)"
            )
        outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if outside:
            problems.append(f"mlp_only_layers {outside} are not blocks 0..{self.num_layers - 1}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not self.moe_layers():
            problems.append("no MoE block: every block is in mlp_only_layers or between sparse steps")
        if self.architecture != "qwen2_moe":
            only_qwen = {
                "decoder_sparse_step": self.decoder_sparse_step != 1,
                "mlp_only_layers": bool(self.mlp_only_layers),
                "shared_expert_size": self.shared_expert_size != 0,
                "intermediate_size": self.intermediate_size is not None,
            }
            for key in (key for key, used in only_qwen.items() if used):
                problems.append(f"{key} needs architecture qwen2_moe ({self.architecture} has every block MoE)")
        if self.architecture == "mixtral" and not self.norm_topk_prob:
            problems.append("mixtral always renormalises the top-k routing weights: set norm_topk_prob: true")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def is_moe(self) -> bool:
        return self.dense_twin is None

    def moe_layers(self) -> list[int]:
        """Blocks that are MoE blocks in the MoE model (Qwen2-MoE's rule)."""
        return [
            i
            for i in range(self.num_layers)
            if i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
        ]

    def dense_width(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    def expert_width(self) -> int:
        return self.expert_size or self.hidden_size


def _shared_hf_kwargs(cfg: LMModelConfig, vocab_size: int, max_positions: int, eot_id: int, ffn_width: int) -> dict:
    """What the MoE and its dense twin share: sizes, attention, positions, initialisation, special tokens."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=ffn_width,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=max_positions,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_dropout=cfg.dropout,
        rms_norm_eps=1e-6,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
    )


def moe_hf_config(
    cfg: LMModelConfig, vocab_size: int, max_positions: int, eot_id: int, aux_loss_coef: float = 0.01
) -> Any:
    """The transformers config of the MoE model described by ``cfg`` (``aux_loss_coef``: its load-balancing weight)."""
    # Mixtral's and OLMoE's FFN width is the expert's (they have no dense blocks); Qwen2-MoE's is its dense blocks'.
    ffn_width = cfg.dense_width() if cfg.architecture == "qwen2_moe" else cfg.expert_width()
    common = dict(
        **_shared_hf_kwargs(cfg, vocab_size, max_positions, eot_id, ffn_width),
        num_experts_per_tok=cfg.top_k,
        router_aux_loss_coef=aux_loss_coef,
    )
    if cfg.architecture == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(**common, num_local_experts=cfg.num_experts, router_jitter_noise=0.0)
    if cfg.architecture == "olmoe":
        from transformers import OlmoeConfig

        return OlmoeConfig(**common, num_experts=cfg.num_experts, norm_topk_prob=cfg.norm_topk_prob)
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **common,
        decoder_sparse_step=cfg.decoder_sparse_step,
        moe_intermediate_size=cfg.expert_width(),
        shared_expert_intermediate_size=cfg.shared_expert_size,
        num_experts=cfg.num_experts,
        norm_topk_prob=cfg.norm_topk_prob,
        mlp_only_layers=list(cfg.mlp_only_layers),
        qkv_bias=True,
    )


def dense_hf_config(cfg: LMModelConfig, vocab_size: int, max_positions: int, eot_id: int, width: int) -> Any:
    """The config of a dense twin with FFN width ``width`` (Qwen2, or Llama with biased q/k/v)."""
    from transformers import LlamaConfig, Qwen2Config

    common = _shared_hf_kwargs(cfg, vocab_size, max_positions, eot_id, width)
    if cfg.dense_architecture == "llama":
        return LlamaConfig(**common, attention_bias=False)
    return Qwen2Config(**common)


def hf_config(cfg: LMModelConfig, vocab_size: int, max_positions: int, eot_id: int, aux_loss_coef: float = 0.01) -> Any:
    """The transformers config of the model ``cfg`` describes (the MoE, or its matched dense twin)."""
    moe = moe_hf_config(cfg, vocab_size, max_positions, eot_id, aux_loss_coef)
    if cfg.is_moe:
        return moe
    total, active = parameter_counts_of_config(moe)
    target = active if cfg.dense_twin == "active" else total
    return dense_hf_config(
        cfg, vocab_size, max_positions, eot_id, matched_width(cfg, vocab_size, max_positions, eot_id, target)
    )


def matched_width(cfg: LMModelConfig, vocab_size: int, max_positions: int, eot_id: int, target: int) -> int:
    """The FFN width whose dense model has the parameter count nearest ``target``.

    A dense model's count is affine in its FFN width (``3 * d * L`` per unit), so two counts on the
    meta device give the line; the width is rounded to the nearest integer (at least 1).
    """
    at_1 = parameter_counts_of_config(dense_hf_config(cfg, vocab_size, max_positions, eot_id, 1))[0]
    at_2 = parameter_counts_of_config(dense_hf_config(cfg, vocab_size, max_positions, eot_id, 2))[0]
    return max(1, round(1 + (target - at_1) / (at_2 - at_1)))


def parameter_counts_of_config(config: Any) -> tuple[int, int]:
    """(total, active) parameters of the model a transformers config builds, counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model = AutoModelForCausalLM.from_config(config)
    return parameter_counts(model)


def parameter_counts(model: Any) -> tuple[int, int]:
    """(total, active) parameters of a causal LM; active leaves out the routed experts a token skips.

    Tied input and output embeddings count once.
    """
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    n_experts = int(getattr(config, "num_experts", 0) or 0)
    if not n_experts:
        return total, total
    k = int(config.num_experts_per_tok)
    skipped = 0
    for module in model.modules():
        if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and hasattr(module, "num_experts"):
            per_expert = (module.gate_up_proj.numel() + module.down_proj.numel()) // module.num_experts
            skipped += (module.num_experts - k) * per_expert
    return total, total - skipped


def build_model(config: Any, seed: int) -> Any:
    """A freshly initialised causal LM from a transformers config, its weights drawn from ``seed``.

    transformers initialises through the global torch RNG; it is forked, so the caller's stream
    is left as it was.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from moespec.models.experts import register

    register()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # Qwen2-MoE builds its shared expert even at width 0; torch warns that the empty init is a no-op.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    skip_empty_shared_experts(model)
    return model


def skip_empty_shared_experts(model: Any) -> int:
    """Let Qwen2-MoE blocks whose shared expert has width 0 skip it; returns how many blocks were changed.

    transformers' ``Qwen2MoeSparseMoeBlock`` always runs its shared expert and the expert's sigmoid
    gate, even at ``shared_expert_intermediate_size = 0``, where both add exactly zero: three empty
    matrix products, a zero-filled (tokens, d) output, a gate projection, a sigmoid, a product and a
    sum per layer, forward and backward (about 10 % of the block's time at d=256, E=8 on a CPU).
    The block's ``forward`` is replaced on the instance by the routed experts alone; its modules and
    parameters stay, so the saved folder is a standard Qwen2-MoE checkpoint that transformers loads
    and runs unchanged, to the same outputs.
    """
    import types

    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    changed = 0
    for module in model.modules():
        if isinstance(module, Qwen2MoeSparseMoeBlock) and module.shared_expert.gate_proj.out_features == 0:
            module.forward = types.MethodType(_routed_experts_only, module)
            changed += 1
    return changed


def _routed_experts_only(self: Any, hidden_states: Any) -> Any:
    """``Qwen2MoeSparseMoeBlock.forward`` without the (empty) shared expert: (batch, seq, d) -> same."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    flat = hidden_states.view(-1, hidden_dim)
    _, routing_weights, selected_experts = self.gate(flat)
    return self.experts(flat, selected_experts, routing_weights).reshape(batch_size, sequence_length, hidden_dim)


def add_dropout(model: Any, p: float) -> list[Any]:
    """Dropout on the output of every block's attention and FFN (training mode only); returns the hook handles.

    GPT-2's residual dropout (Radford et al. 2019; nanoGPT's ``resid_dropout``): transformers'
    Qwen2 and Llama blocks only drop attention probabilities. Hooks are not saved with the model.
    """
    import torch.nn.functional as F

    if p <= 0:
        return []

    def drop(module: Any, args: Any, output: Any) -> Any:
        if not module.training:
            return None
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True),) + tuple(output[1:])
        return F.dropout(output, p, True)

    return [layer.self_attn.register_forward_hook(drop) for layer in model.model.layers] + [
        layer.mlp.register_forward_hook(drop) for layer in model.model.layers
    ]


def router_z_loss(router_logits: Any) -> Any:
    """ST-MoE router z-loss, mean over tokens and MoE layers of ``logsumexp(logits)^2`` (Zoph et al. 2022, eq. 5)."""
    import torch

    return torch.stack([torch.logsumexp(logits.float(), dim=-1).square().mean() for logits in router_logits]).mean()


def loss_terms(
    model: Any, input_ids: Any, labels: Any, balance_weight: float, z_weight: float
) -> tuple[dict[str, Any], Any]:
    """The training objective of a causal LM, term by term.

    Parameters
    ----------
    model : transformers causal LM
    input_ids : LongTensor of shape (batch, seq)
    labels : LongTensor of shape (batch, seq)
        Next token of each position (already shifted), -100 where there is none.
    balance_weight, z_weight : float
        Weights of transformers' load-balancing loss (Switch, Fedus et al. 2022, eq. 4; pooled
        over layers, ``top_k`` under perfect balance) and of the router z-loss.

    Returns
    -------
    terms : dict of str to scalar Tensor
        ``lm`` (mean next-token cross-entropy, nats), ``balance`` and ``z`` (MoE only), ``total``.
    output : transformers ModelOutput
        The forward pass (``logits`` (batch, seq, vocab), ``router_logits`` per MoE layer).
    """
    import torch.nn.functional as F

    is_moe = bool(getattr(model.config, "num_experts", 0))
    extra = {"output_router_logits": True} if is_moe else {}
    output = model(input_ids=input_ids, use_cache=False, **extra)
    lm = F.cross_entropy(output.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    terms = {"lm": lm}
    total = lm
    if is_moe:
        terms["balance"] = output.aux_loss
        terms["z"] = router_z_loss(output.router_logits)
        total = lm + balance_weight * terms["balance"] + z_weight * terms["z"]
    terms["total"] = total
    return terms, output


def choose_experts_implementation(
    model: Any, input_ids: Any, labels: Any, candidates: tuple[str, ...], repeats: int = 3
) -> tuple[str, dict[str, float]]:
    """Time a training step (forward + backward) of ``model`` under each experts implementation; pick the fastest.

    Runs on a deep copy under a forked RNG: the model, its gradients and the caller's random
    stream are unchanged. Each candidate gets one warm-up step; then ``repeats`` rounds time every
    candidate once in turn, so that a burst of load from another process hits one round of all
    candidates rather than every step of one, and each keeps its best step.

    Returns
    -------
    name : str
    seconds : dict of str to float
        Best step time of each candidate.
    """
    import torch

    probe = copy.deepcopy(model).train()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.random.fork_rng(devices=[input_ids.device] if input_ids.device.type == "cuda" else []):
        for round_ in range(repeats + 1):
            for name in candidates:
                probe.set_experts_implementation(name)
                _synchronise(input_ids.device)
                start = time.perf_counter()
                loss_terms(probe, input_ids, labels, 0.0, 0.0)[0]["total"].backward()
                _synchronise(input_ids.device)
                if round_:  # the first round warms every candidate up
                    times[name].append(time.perf_counter() - start)
                probe.zero_grad(set_to_none=True)
    del probe
    seconds = {name: min(values) for name, values in times.items()}
    return min(seconds, key=seconds.get), seconds


def _synchronise(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(params_active: int, num_layers: int, seq_len: int, hidden_size: int) -> float:
    """Training FLOPs per token: 6 N_active plus attention's 12 L T d (Kaplan et al. 2020, table 1; PaLM app. B)."""
    return 6.0 * params_active + 12.0 * num_layers * seq_len * hidden_size
