"""Router logits and expert ablation in pretrained Hugging Face MoE models, through forward hooks.

Written for the router layout of transformers v5 (the installed version), where every MoE block
calls a router module that returns its routing decision (docs/moe.md, "Router logits from pretrained
Hugging Face MoEs"):

``topk`` routers (``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter``, ``OlmoeTopKRouter``)
    ``forward(hidden) -> (router_logits, top_k_weights, top_k_index)``: softmax over all experts in
    float32, top-k, renormalised always (Mixtral) or when ``norm_topk_prob`` (Qwen2-MoE, OLMoE).
    Qwen2-MoE's always-on shared expert is outside the router and is never ablated.
``switch`` routers (``SwitchTransformersTop1Router``)
    ``forward(hidden) -> (one_hot_dispatch, top1_probability, router_logits)`` with a per-sequence
    expert capacity (later tokens dropped first).

A forward hook on each router recomputes the router logits from its input with the router's own
weight (so what is recorded are logits even in revisions whose router returns probabilities in
place of logits) and, when an ablation targets that layer, replaces the router's output with the
routing of :func:`moespec.models.routing.route_topk` under the ablation (the same code as our own
MoE models): ``mask`` sets the expert's logit to -inf before the softmax and top-k, so tokens
re-route; ``zero`` keeps the routing and zeroes the expert's weight; ``drop`` removes it from the
selected set without re-routing and renormalises what is left when the router renormalises. For
Switch (top-1, never renormalised) ``drop`` equals ``zero``.

Transformers v4 (``block_sparse_moe.gate`` an ``nn.Linear``, per-expert modules) is not handled:
:func:`find_routers` then finds no supported router and says so.

Several ablations run in one forward pass by repeating the batch (``n_copies``); the router input
is then ``n_copies`` blocks of equal size, copy-major, and copy ``c`` gets ablation mask ``c``.
:func:`run_texts` drives it all over a list of texts: per batch one unablated pass (routing
recorded) and the batched ablation passes, with :func:`next_token_loss` or :func:`pooled_state`
(or any ``measure(model, batch)``) as what is kept of each pass.
:class:`BlockReplay` reuses work shared by the ablations of one layer: the blocks before that
layer's block see the same input whatever is ablated, so their output is recorded once, in the
baseline pass, and replayed instead of recomputed.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moespec.errors import ConfigError
from moespec.models.routing import Ablation, route_topk

_log = logging.getLogger("moespec")

#: Router classes whose forward is "softmax over all experts, top-k, optional renormalisation".
TOPK_ROUTERS = ("MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "OlmoeTopKRouter")
#: Switch-style top-1 routers with expert capacity.
SWITCH_ROUTERS = ("SwitchTransformersTop1Router",)
#: Routers that always renormalise the top-k weights (the others follow ``norm_topk_prob``).
_ALWAYS_RENORMALISE = ("MixtralTopKRouter",)
#: The stack of blocks a router lives in: ``model.layers.3.mlp.gate`` -> (``model.layers``, 3).
_BLOCK_PATTERN = re.compile(r"^(?P<stack>.*?(?:^|\.)(?:layers|block|h))\.(?P<index>\d+)\.")

HookMode = Literal["mask", "zero", "drop"]


@dataclass
class RouterSite:
    """One MoE layer of a model: its router and where it sits.

    Attributes
    ----------
    index : int
        MoE layer number, in module order (0 = closest to the input).
    name : str
        Qualified name of the router module (``model.layers.0.mlp.gate``).
    module : nn.Module
    kind : {"topk", "switch"}
    n_experts, top_k : int
    renormalize : bool
        Whether the router divides the selected probabilities by their sum.
    block_stack : str
        Qualified name of the ``ModuleList`` of blocks that holds this router ("" if none).
    block_index : int
        Position of the router's block in that list (-1 if none).
    """

    index: int
    name: str
    module: nn.Module
    kind: Literal["topk", "switch"]
    n_experts: int
    top_k: int
    renormalize: bool
    block_stack: str = ""
    block_index: int = -1


def find_routers(model: nn.Module) -> list[RouterSite]:
    """Every supported router of ``model``, in module order.

    Raises
    ------
    ConfigError
        The model has no MoE layer, or its routers are of a kind this module does not handle
        (the message names the class).
    """
    sites: list[RouterSite] = []
    unsupported: set[str] = set()
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in TOPK_ROUTERS:
            renormalize = cls in _ALWAYS_RENORMALISE or bool(getattr(module, "norm_topk_prob", False))
            sites.append(
                RouterSite(len(sites), name, module, "topk", int(module.num_experts), int(module.top_k), renormalize)
            )
        elif cls in SWITCH_ROUTERS:
            sites.append(RouterSite(len(sites), name, module, "switch", int(module.num_experts), 1, False))
        elif "router" in cls.lower() or (cls.lower().endswith("gate") and hasattr(module, "top_k")):
            unsupported.add(cls)
    if not sites:
        if unsupported:
            raise ConfigError(
                f"model {type(model).__name__}: router class(es) {sorted(unsupported)} are not supported "
                f"for routing capture and ablation; supported: "
                f"{', '.join(TOPK_ROUTERS + SWITCH_ROUTERS)}"
            )
        raise ConfigError(
            f"model {type(model).__name__} is not a mixture-of-experts model: it has no router module "
            f"(supported: {', '.join(TOPK_ROUTERS + SWITCH_ROUTERS)})"
        )
    for site in sites:
        match = _BLOCK_PATTERN.match(site.name)
        if match:
            site.block_stack, site.block_index = match["stack"], int(match["index"])
    return sites


# --------------------------------------------------------------------------------------------------
# hooks


@dataclass(frozen=True)
class RouterAblation:
    """Experts to ablate in one forward pass of a HF model.

    Parameters
    ----------
    experts : BoolTensor of shape (n_copies, n_experts)
        Row ``c`` is the ablation applied to copy ``c`` of the batch (the batch is repeated
        ``n_copies`` times, copy-major).
    mode : {"mask", "zero", "drop"}
    layer : int or None
        The MoE layer ablated (None: every MoE layer).
    """

    experts: torch.Tensor
    mode: HookMode = "mask"
    layer: Optional[int] = None

    def applies_to(self, layer: int) -> bool:
        return self.layer is None or self.layer == layer

    def row_masks(self, n_rows: int) -> torch.Tensor:
        """The ablation of every router input row (copy-major blocks of equal size): (n_rows, E)."""
        n_copies = self.experts.shape[0]
        if n_rows % n_copies:
            raise ValueError(f"{n_rows} router rows cannot be split into {n_copies} equal copies")
        return self.experts.repeat_interleave(n_rows // n_copies, dim=0)


@dataclass
class RouterHooks:
    """Forward hooks on every router: record router logits, apply an ablation.

    Use as a context manager (hooks are removed on exit). Set ``capture`` to record the router
    logits of the next forward passes in ``logits`` (one (rows, E) float32 tensor per MoE layer,
    rows = batch x sequence positions, flattened row-major); set ``ablation`` to ablate.
    """

    sites: list[RouterSite]
    capture: bool = False
    ablation: Optional[RouterAblation] = None
    logits: list[Optional[torch.Tensor]] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)

    def __enter__(self) -> "RouterHooks":
        self.logits = [None] * len(self.sites)
        for site in self.sites:
            self._handles.append(site.module.register_forward_hook(self._hook_for(site), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def ablating(self, ablation: RouterAblation) -> Iterator[None]:
        """Apply ``ablation`` to the forward passes inside the block."""
        previous, self.ablation = self.ablation, ablation
        try:
            yield
        finally:
            self.ablation = previous

    def _hook_for(self, site: RouterSite):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            logits = router_logits(site, args, kwargs, output)  # (rows, E), the router's dtype
            if self.capture:
                self.logits[site.index] = logits.detach().float()
            ablation = self.ablation
            if ablation is None or not ablation.applies_to(site.index):
                return None  # the router's own output, untouched
            rows = ablation.row_masks(logits.shape[0]).to(logits.device)
            if site.kind == "switch":
                return _reroute_switch(module, output, logits, rows, ablation.mode)
            return _reroute_topk(site, output, logits, rows, ablation.mode)

        return hook


def router_logits(site: RouterSite, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    """The router logits of a call, (rows, E), recomputed from the router's input and weight."""
    if site.kind == "switch":
        return output[2].reshape(-1, site.n_experts)  # computed in the router's own (float32) dtype
    hidden = args[0] if args else kwargs["hidden_states"]
    weight = site.module.weight
    return F.linear(hidden.reshape(-1, weight.shape[-1]), weight)  # as the router computes them


def _reroute_topk(site: RouterSite, output: tuple, logits: torch.Tensor, rows: torch.Tensor, mode: HookMode) -> tuple:
    routing = route_topk(logits, site.top_k, site.renormalize, Ablation(rows, mode))
    weights = routing.combine_weights.gather(-1, routing.expert_index)  # (rows, k), slot order
    new_logits = routing.logits.to(output[0].dtype) if torch.is_tensor(output[0]) else output[0]
    return new_logits, weights.to(output[1].dtype), routing.expert_index.to(output[2].dtype)


def _reroute_switch(
    module: nn.Module, output: tuple, logits: torch.Tensor, rows: torch.Tensor, mode: HookMode
) -> tuple:
    dispatch, top_probability, raw_logits = output  # (B, T, E), (B, T, 1), (B, T, E)
    rows = rows.reshape(dispatch.shape)
    if mode != "mask":  # top-1, never renormalised: zero and drop both silence the chosen expert
        hit = (dispatch.bool() & rows).any(-1, keepdim=True)
        return dispatch, top_probability.masked_fill(hit, 0.0), raw_logits
    masked = raw_logits.float().masked_fill(rows, float("-inf"))
    probs = F.softmax(masked, dim=-1)
    top1 = probs.argmax(dim=-1)  # (B, T)
    new_dispatch = F.one_hot(top1, dispatch.shape[-1]).to(dispatch.dtype)
    # Capacity as the router applies it: a running count per expert along the sequence.
    new_dispatch = new_dispatch * (torch.cumsum(new_dispatch, dim=-2) <= module.expert_capacity)
    new_probability = probs.max(dim=-1, keepdim=True).values.to(top_probability.dtype)
    return new_dispatch, new_probability, masked.to(raw_logits.dtype)


# --------------------------------------------------------------------------------------------------
# reusing the blocks before an ablated layer


class BlockReplay:
    """Record, once, the output of the blocks before each MoE block; replay it for ablated passes.

    An ablation of MoE layer ``l`` cannot change anything before the block that holds it, so
    those blocks need not run again: inside :meth:`replaying` every earlier block of the stack
    returns the recorded output of the block just before ``l``'s (repeated for ``n_copies``),
    without computing. Only blocks that return a plain tensor (transformers v5 decoder layers)
    are replayed; otherwise the passes run in full.
    """

    def __init__(self, model: nn.Module, sites: list[RouterSite]):
        self.model = model
        self.sites = sites
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}

    def _previous_block(self, site: RouterSite) -> Optional[tuple[str, int]]:
        return (site.block_stack, site.block_index - 1) if site.block_index > 0 else None

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the outputs of the blocks just before each MoE block during the passes inside."""
        self.outputs = {}
        handles = []
        for key in {self._previous_block(s) for s in self.sites} - {None}:
            block = self.model.get_submodule(f"{key[0]}.{key[1]}")

            def store(module: nn.Module, args: tuple, output: Any, key: tuple[str, int] = key) -> None:
                if torch.is_tensor(output):
                    self.outputs[key] = output.detach()

            handles.append(block.register_forward_hook(store))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def can_replay(self, site: RouterSite) -> bool:
        key = self._previous_block(site)
        return key is not None and key in self.outputs

    @contextlib.contextmanager
    def replaying(self, site: RouterSite, n_copies: int = 1) -> Iterator[bool]:
        """Inside the block, the blocks before ``site``'s return the recorded output; yields whether they do."""
        if not self.can_replay(site):
            yield False
            return
        stack, index = self._previous_block(site)
        recorded = self.outputs[(stack, index)]
        value = recorded.repeat(n_copies, *([1] * (recorded.dim() - 1))) if n_copies > 1 else recorded
        blocks = [self.model.get_submodule(f"{stack}.{i}") for i in range(index + 1)]
        # The same tensor whatever the input; a copy, so that an in-place update downstream cannot
        # change what the next ablation replays.
        replay = lambda *args, **kwargs: value.clone()  # noqa: E731
        try:
            for block in blocks:
                block.forward = replay  # instance attribute: shadows the class's forward
            yield True
        finally:
            for block in blocks:
                vars(block).pop("forward", None)


# --------------------------------------------------------------------------------------------------
# loading


@dataclass
class LoadedMoE:
    """A pretrained MoE ready for routing analysis.

    Attributes
    ----------
    model : nn.Module
        ``AutoModelForCausalLM`` for ``task="lm"``; the base model (the encoder of an
        encoder-decoder) for ``task="probe"``. Eval mode, on ``device``.
    tokenizer : transformers tokenizer
        Right padding, with a pad token.
    sites : list of RouterSite
    commit : str
        Resolved hub commit ("" when unknown).
    device : str
    dtype : torch.dtype
    """

    model: Any
    tokenizer: Any
    sites: list[RouterSite]
    commit: str
    device: str
    dtype: Any


def load_moe_model(
    name: str,
    *,
    task: Literal["lm", "probe"],
    revision: Optional[str] = None,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    key: str = "ablate.source.model",
    log: logging.Logger = _log,
) -> LoadedMoE:
    """Load a pretrained MoE (hub name, local folder or ``builtin:`` name) and find its routers.

    Raises
    ------
    ConfigError
        The model cannot be loaded, has no causal LM head for ``task="lm"``, or is not an MoE.
        Messages start with ``key``.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from moespec.embedding.loading import hub_loading_options, offline_hint, resolve_dtype

    path = _model_path(name, key)
    torch_dtype = resolve_dtype(dtype, device)
    what = f"{name!r}" + (f" (revision {revision})" if revision else "")
    loader = AutoModelForCausalLM if task == "lm" else AutoModel
    hub = hub_loading_options(name, revision, key) if path == name and not Path(path).is_dir() else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code, **hub)
        model = loader.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code, dtype=torch_dtype, **hub
        )
    except ValueError as e:
        if task == "lm" and "Unrecognized configuration class" in str(e):
            raise ConfigError(
                f"{key}.name: {what} is not a causal language model, so task 'lm' (next-token "
                f"loss) does not apply; use task 'probe'"
            ) from e
        raise ConfigError(f"{key}.name: cannot load model {what}: {_first_line(e)}") from e
    except (OSError, KeyError, ImportError) as e:
        raise ConfigError(f"{key}.name: cannot load model {what}: {_first_line(e)} {offline_hint()}") from e
    if task == "probe" and getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    try:
        sites = find_routers(model)
    except ConfigError as e:
        raise ConfigError(f"{key}.name: {what}: {e}") from e
    _prepare_tokenizer(tokenizer, what, log)
    model = model.to(device).eval()
    commit = str(getattr(model.config, "_commit_hash", None) or "")
    log.info(
        "MoE %s: %s, %d MoE layers x %d experts (top-%d), %.1fM parameters, %s on %s",
        what,
        type(model).__name__,
        len(sites),
        sites[0].n_experts,
        sites[0].top_k,
        sum(p.numel() for p in model.parameters()) / 1e6,
        str(torch_dtype).removeprefix("torch."),
        device,
    )
    return LoadedMoE(model, tokenizer, sites, commit, device, torch_dtype)


def _model_path(name: str, key: str) -> str:
    from moespec.embedding.builtin import BUILTIN_MODELS, builtin_model_dir, is_builtin

    if is_builtin(name):
        if name not in BUILTIN_MODELS:
            raise ConfigError(
                f"{key}.name: unknown built-in model {name!r}; built-in models are {', '.join(BUILTIN_MODELS)}"
            )
        return str(builtin_model_dir(name))
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"{key}.name: local model folder {name!r} does not exist")
    return str(Path(name).expanduser()) if name.startswith(("/", "./", "../", "~")) else name


def _prepare_tokenizer(tokenizer: Any, what: str, log: logging.Logger) -> None:
    # Right padding keeps position ids equal to token positions (Mixtral numbers positions 0..T-1
    # whatever the mask); pads are excluded from every loss and pooling through the mask.
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer of {what} has neither a pad nor an eos token; batching needs one")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer of %s has no pad token: padding with eos %r", what, tokenizer.eos_token)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------------------
# what a forward pass gives


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood of every position (0 where the target is padding).

    Parameters
    ----------
    logits : Tensor of shape (batch, seq, vocab)
    input_ids, attention_mask : Tensor of shape (batch, seq)

    Returns
    -------
    Tensor of shape (batch, seq - 1), float32
        Position ``t`` is ``-log p(x_{t+1} | x_{<=t})``.
    """
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return nll * attention_mask[:, 1:].to(nll.dtype)


def repeat_batch(batch: dict[str, torch.Tensor], n_copies: int) -> dict[str, torch.Tensor]:
    """Every tensor of a tokenised batch repeated ``n_copies`` times along the batch axis, copy-major."""
    if n_copies == 1:
        return batch
    return {name: value.repeat(n_copies, *([1] * (value.dim() - 1))) for name, value in batch.items()}


# --------------------------------------------------------------------------------------------------
# running texts: unablated and under many ablations


@dataclass
class TokenRouting:
    """Unablated routing of every real token, ordered by (text, position).

    Attributes
    ----------
    probs : ndarray of shape (n_tokens, n_layers, n_experts), float32
    expert_index : ndarray of shape (n_tokens, n_layers, k), int64
    text : ndarray of shape (n_tokens,), int64
        Index of the token's text in the ``texts`` given to :func:`run_texts`.
    token_id, position : ndarray of shape (n_tokens,), int64
    """

    probs: np.ndarray
    expert_index: np.ndarray
    text: np.ndarray
    token_id: np.ndarray
    position: np.ndarray


@dataclass
class TextPasses:
    """What :func:`run_texts` measured.

    Attributes
    ----------
    base : ndarray of shape (n_texts, ...)
        ``measure`` of each text, unablated.
    ablated : dict
        mode -> ndarray of shape (n_ablations, n_texts, ...): ``measure`` under each ablation.
    n_tokens : ndarray of shape (n_texts,), int64
        Next-token targets of each text (its real tokens minus one).
    routing : TokenRouting or None
    """

    base: np.ndarray
    ablated: dict[str, np.ndarray]
    n_tokens: np.ndarray
    routing: Optional[TokenRouting] = None


def run_texts(
    loaded: LoadedMoE,
    texts: list[str],
    measure: Callable[[Any, dict], np.ndarray],
    *,
    max_length: int,
    batch_size: int,
    tokens_per_pass: int = 8192,
    masks: Optional[np.ndarray] = None,
    layers: Optional[np.ndarray] = None,
    modes: tuple[str, ...] = ("mask",),
    record_routing: bool = False,
    progress: Callable = lambda batches, total: batches,
) -> TextPasses:
    """Run texts through the model unablated and under every ablation, batch by batch.

    Per batch of length-sorted texts: one unablated pass (recording router logits when asked, and
    the outputs of the blocks before each MoE block), then, for each ablated layer and mode,
    passes that hold up to ``tokens_per_pass`` tokens of batch copies, one ablation per copy, the
    blocks before the layer replayed instead of recomputed.

    Parameters
    ----------
    loaded : LoadedMoE
    texts : list of str
    measure : callable
        ``measure(model, batch) -> ndarray (batch_size, ...)``: what to keep of a forward pass
        per text (see :func:`next_token_loss`, :func:`pooled_state`).
    max_length, batch_size, tokens_per_pass : int
    masks : ndarray of shape (n_ablations, n_experts), bool, optional
        Experts ablated by each ablation.
    layers : ndarray of shape (n_ablations,), int, optional
        MoE layer of each ablation.
    modes : tuple of {"mask", "zero", "drop"}
    record_routing : bool
    progress : callable
        ``progress(batches, total)`` wraps the batch iterator (a progress bar).
    """
    tokenizer = loaded.tokenizer
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]])
    order = np.argsort(-lengths, kind="stable")  # length-sorted batches: little padding
    batches = [order[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    base, n_tokens, routing = [], [], []
    ablated: dict[str, list[np.ndarray]] = {mode: [] for mode in modes}
    hooks, replay = RouterHooks(loaded.sites), BlockReplay(loaded.model, loaded.sites)
    with torch.no_grad(), hooks:
        for rows in progress(batches, len(batches)):
            batch = tokenizer(
                [texts[r] for r in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(loaded.device)
            hooks.capture = record_routing
            with replay.recording():
                base.append(measure(loaded.model, batch))
            hooks.capture = False
            n_tokens.append(batch["attention_mask"][:, 1:].sum(-1).cpu().numpy())
            if record_routing:
                routing.append(_token_routing(hooks.logits, loaded.sites[0].top_k, batch, rows))
            if masks is not None and len(masks):
                for mode, values in _ablated_batch(
                    loaded, batch, measure, masks, layers, modes, tokens_per_pass, hooks, replay
                ).items():
                    ablated[mode].append(values)
    back = np.empty(len(texts), dtype=np.int64)
    back[order] = np.arange(len(texts))  # batches ran in length order; restore the order of ``texts``
    return TextPasses(
        np.concatenate(base)[back],
        {m: np.concatenate(v, axis=1)[:, back] for m, v in ablated.items() if v},
        np.concatenate(n_tokens)[back].astype(np.int64),
        _merge_routing(routing) if record_routing else None,
    )


def _ablated_batch(
    loaded: LoadedMoE,
    batch: dict,
    measure: Callable,
    masks: np.ndarray,
    layers: np.ndarray,
    modes: tuple[str, ...],
    tokens_per_pass: int,
    hooks: RouterHooks,
    replay: BlockReplay,
) -> dict[str, np.ndarray]:
    """Every ablation on one batch: mode -> (n_ablations, batch_size, ...)."""
    n_texts, seq = batch["input_ids"].shape
    copies = max(1, tokens_per_pass // (n_texts * seq))
    measured: dict[str, list] = {mode: [None] * len(masks) for mode in modes}
    for layer in np.unique(layers):
        site = loaded.sites[int(layer)]
        indices = np.flatnonzero(layers == layer)
        for mode in modes:
            for start in range(0, len(indices), copies):
                chunk = indices[start : start + copies]
                experts = torch.as_tensor(masks[chunk], device=batch["input_ids"].device)
                with replay.replaying(site, len(chunk)), hooks.ablating(RouterAblation(experts, mode, int(layer))):
                    values = measure(loaded.model, repeat_batch(batch, len(chunk)))  # (copies * B, ...)
                for copy, index in enumerate(chunk):
                    measured[mode][index] = values[copy * n_texts : (copy + 1) * n_texts]
    return {mode: np.stack(rows) for mode, rows in measured.items()}


def _token_routing(logits: list[torch.Tensor], top_k: int, batch: dict, rows: np.ndarray) -> tuple:
    """Probabilities and top-k experts of the real tokens of a batch, with their text, id and position."""
    real = batch["attention_mask"].reshape(-1).bool()
    probs = torch.stack([torch.softmax(layer_logits[real], dim=-1) for layer_logits in logits], dim=1)  # (n, L, E)
    seq = batch["input_ids"].shape[1]
    real_np = real.cpu().numpy()
    return (
        probs.cpu().numpy(),
        probs.topk(top_k, dim=-1).indices.cpu().numpy(),
        np.repeat(np.asarray(rows, dtype=np.int64), seq)[real_np],
        batch["input_ids"].reshape(-1)[real].cpu().numpy().astype(np.int64),
        np.tile(np.arange(seq, dtype=np.int64), len(rows))[real_np],
    )


def _merge_routing(parts: list[tuple]) -> TokenRouting:
    probs, index, text, token_id, position = (np.concatenate([p[i] for p in parts]) for i in range(5))
    order = np.lexsort((position, text))
    return TokenRouting(probs[order], index[order], text[order], token_id[order], position[order])


@torch.no_grad()
def next_token_loss(model: Any, batch: dict) -> np.ndarray:
    """Sum of next-token losses of each text of a batch: (batch_size,) float64."""
    logits = model(**batch, use_cache=False).logits
    return token_nll(logits, batch["input_ids"], batch["attention_mask"]).sum(-1).double().cpu().numpy()


@torch.no_grad()
def pooled_state(model: Any, batch: dict, pooling: str = "mean") -> np.ndarray:
    """Padding-aware pooled last hidden state of each text: (batch_size, hidden) float32."""
    from moespec.embedding.pooling import pool

    return pool(model(**batch).last_hidden_state, batch["attention_mask"], pooling).cpu().numpy()
