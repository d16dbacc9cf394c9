"""LoRA adapters over a frozen causal LM: PEFT glue, per-text losses, early-layer features, the objective.

A LoRA adapter adds ``ΔW = (alpha / r) B A`` to a frozen weight ``W`` (Hu et al. 2021, "LoRA:
Low-Rank Adaptation of Large Language Models", eq. 3), with ``A`` of shape ``(r, d_in)`` and ``B``
of shape ``(d_out, r)``; ``B`` starts at zero, so a fresh adapter leaves the base model unchanged.
Adapters are built, saved and loaded by PEFT (``LoraConfig``, ``get_peft_model``,
``PeftModel.from_pretrained``), so an adapter folder written here loads unchanged anywhere PEFT runs.

What lives here:

- :func:`lora_config` and :func:`adapter_target_problems` (does the base have the target modules, and
  is the rank at most the width of every targeted layer);
- :class:`TokenizedTexts` and :func:`tokenize_texts`: texts as right-padded token rows;
- :func:`text_nll`: each text's summed next-token loss and its number of predicted tokens;
- :func:`pooled_hidden`: the masked mean of the hidden state after an early block, computed by a
  forward pass that stops at that block (what a learned router reads);
- :class:`TrainableView` and :class:`AdapterObjective`: what the shared loop
  (:func:`moespec.models.training.fit`) needs to train only the adapter's weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np


# --------------------------------------------------------------------------------------------------
# PEFT configuration and checks


def lora_config(rank: int, alpha: float, dropout: float, target_modules: Sequence[str]) -> Any:
    """The PEFT ``LoraConfig`` of a causal-LM adapter (no bias terms are trained)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def linear_widths(model: Any) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of every linear layer of ``model``, by module name.

    Works on a model built on the ``meta`` device (no weights are read).
    """
    import torch

    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            widths[name] = (module.in_features, module.out_features)
    return widths


def adapter_target_problems(
    widths: dict[str, tuple[int, int]], target_modules: Sequence[str], rank: int, key: str
) -> list[str]:
    """Why a LoRA of ``rank`` on ``target_modules`` cannot be put on a model with these linear layers.

    A target matches a module whose name is the target or ends with ``"." + target`` (PEFT's rule for
    a list of names). A rank above ``min(d_in, d_out)`` of a matched layer adds no expressive power
    and is refused, as is a target matching no linear layer.

    Parameters
    ----------
    widths : dict
        :func:`linear_widths` of the base model.
    target_modules : sequence of str
    rank : int
    key : str
        Dotted config key of the adapter settings (``lora.adapter``), named in the messages.
    """
    problems = []
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name in widths})
    for target in target_modules:
        matched = {name: w for name, w in widths.items() if name == target or name.endswith("." + target)}
        if not matched:
            problems.append(
                f"{key}.target_modules: the base model has no linear layer named {target!r} "
                f"(its linear layers: {', '.join(leaf_names)})"
            )
            continue
        narrowest = min(min(w) for w in matched.values())
        if rank > narrowest:
            problems.append(
                f"{key}.rank: {rank} is above the width {narrowest} of the {target!r} layers "
                f"(min of their input and output sizes)"
            )
    return problems


def meta_model(folder: str, trust_remote_code: bool = False) -> Any:
    """The causal LM of a local HF folder built on the ``meta`` device: its structure, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------------------------------
# texts as tokens


@dataclass
class TokenizedTexts:
    """Texts as right-padded rows of token ids.

    Attributes
    ----------
    input_ids : ndarray of shape (n_texts, max_tokens), int64
    attention_mask : ndarray of shape (n_texts, max_tokens), int64
        1 on real tokens (a prefix of each row), 0 on padding.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return self.attention_mask.sum(axis=1)

    def rows(self, index: Any) -> "TokenizedTexts":
        """A subset of the texts, trimmed to its own longest row."""
        mask = self.attention_mask[index]
        width = max(int(mask.sum(axis=1).max(initial=1)), 1)
        return TokenizedTexts(self.input_ids[index][:, :width], mask[:, :width])


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> TokenizedTexts:
    """Tokenise ``texts`` (with the tokenizer's special tokens), truncated to ``max_length`` tokens."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="np")
    mask = np.asarray(encoded["attention_mask"], dtype=np.int64)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    if tokenizer.padding_side == "left":  # store right-padded rows whatever the tokenizer's habit
        shift = mask.shape[1] - mask.sum(axis=1)
        ids = np.stack([np.roll(row, -s) for row, s in zip(ids, shift)])
        mask = np.stack([np.roll(row, -s) for row, s in zip(mask, shift)])
    return TokenizedTexts(ids, mask)


def causal_labels(input_ids: Any, attention_mask: Any) -> Any:
    """HF causal-LM labels: the input ids with padding set to -100 (ignored by the loss)."""
    return input_ids.masked_fill(attention_mask == 0, -100)


def text_nll(model: Any, texts: TokenizedTexts, batch_size: int, device: Any) -> tuple[np.ndarray, np.ndarray]:
    """Summed next-token negative log-likelihood of each text, and its number of predicted tokens.

    Token ``t + 1`` is predicted from tokens ``0..t`` of the same text; the first token (a BOS for most
    tokenizers) is never a target, so a text of ``n`` tokens has ``n - 1`` targets.

    Returns
    -------
    nll : ndarray of shape (n_texts,), float64
        Nats, summed over the text's targets.
    tokens : ndarray of shape (n_texts,), int64
    """
    import torch
    import torch.nn.functional as F

    nll = np.zeros(len(texts))
    model.eval()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = texts.rows(slice(start, start + batch_size))
            ids = torch.as_tensor(batch.input_ids, device=device)
            mask = torch.as_tensor(batch.attention_mask, device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
            losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
            nll[start : start + len(batch)] = (losses * mask[:, 1:]).sum(dim=1).double().cpu().numpy()
    return nll, np.maximum(texts.lengths - 1, 0).astype(np.int64)


class _StopForward(Exception):
    """Raised by a forward hook to end a forward pass early, carrying the hidden state it saw."""

    def __init__(self, hidden: Any):
        super().__init__("early exit")
        self.hidden = hidden


def decoder_blocks(model: Any) -> Any:
    """The list of transformer blocks of a HF decoder (``model.model.layers`` for LLaMA, Qwen2, Gemma 3)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    blocks = getattr(decoder, "layers", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__}: cannot find the decoder's list of blocks (.layers)")
    return blocks


def pooled_hidden(model: Any, texts: TokenizedTexts, layer: int, batch_size: int, device: Any) -> np.ndarray:
    """Masked mean of the hidden state after block ``layer`` (1-based), by a forward pass stopped there.

    For ``layer`` below the number of blocks this equals the mean of ``hidden_states[layer]`` of a full
    forward pass with ``output_hidden_states=True`` (HF's index 0 is the embedding output); the blocks
    above are never run, so the cost grows with ``layer``, not with the model's depth.

    Returns
    -------
    ndarray of shape (n_texts, d_model), float32
    """
    import torch

    blocks = decoder_blocks(model)
    if not 1 <= layer <= len(blocks):
        raise ValueError(f"layer {layer} is not a block of this model (1..{len(blocks)})")

    def stop(module: Any, args: Any, output: Any) -> None:
        raise _StopForward(output[0] if isinstance(output, tuple) else output)

    pooled = []
    handle = blocks[layer - 1].register_forward_hook(stop)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = texts.rows(slice(start, start + batch_size))
                ids = torch.as_tensor(batch.input_ids, device=device)
                mask = torch.as_tensor(batch.attention_mask, device=device)
                try:
                    model(input_ids=ids, attention_mask=mask)
                except _StopForward as stopped:
                    hidden = stopped.hidden.float()  # (B, T, D)
                weights = mask.unsqueeze(-1).float()
                pooled.append(((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)).cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(pooled).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# training with the shared loop


class TrainableView:
    """A PEFT model as the shared loop sees it: only the adapter's weights are state.

    :func:`~moespec.models.training.fit` clips ``parameters()``, keeps ``state_dict()`` as the best
    weights and checkpoints it; a LoRA run must not copy or store the frozen base (Gemma-3-270M is
    1 GB in float32, an adapter 1-10 MB), so this view exposes the trainable tensors alone, through
    PEFT's own ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``.
    """

    def __init__(self, peft_model: Any):
        self.model = peft_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> "TrainableView":
        self.model.train(mode)
        return self

    def eval(self) -> "TrainableView":
        self.model.eval()
        return self

    def parameters(self) -> list[Any]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise KeyError(f"adapter state has keys this adapter lacks: {unexpected[:4]}")


class AdapterObjective:
    """Next-token loss of one domain's texts, for the shared loop.

    Parameters
    ----------
    train, val : TokenizedTexts
    batch_size : int
        Texts per batch (training and validation).
    seed : int
        The batches of epoch ``e`` are a permutation seeded by ``(seed, e)``.
    device : torch.device or str
    autocast : torch.dtype, optional
        Training forward passes under autocast to this dtype; validation runs in the weights' dtype.
    """

    def __init__(
        self,
        train: TokenizedTexts,
        val: TokenizedTexts,
        batch_size: int,
        seed: int,
        device: Any,
        autocast: Optional[Any] = None,
    ):
        import torch

        self.train, self.val = train, val
        self.batch_size, self.seed = batch_size, seed
        self.device = torch.device(device)
        self.autocast = autocast

    def batches(self, epoch: int) -> list[Any]:
        from moespec.models.training import epoch_order

        order = epoch_order(len(self.train), self.seed, epoch).numpy()
        return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def train_batch(self, model: Any, batch: Any, scale: float) -> tuple[dict[str, float], float]:
        import torch

        rows = self.train.rows(np.sort(batch))
        ids = torch.as_tensor(rows.input_ids, device=self.device)
        mask = torch.as_tensor(rows.attention_mask, device=self.device)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            # HF's loss is the mean over the batch's targets; the weight makes the loop's running
            # means token-weighted, like the validation loss.
            loss = model(input_ids=ids, attention_mask=mask, labels=causal_labels(ids, mask)).loss
        (loss * scale).backward()
        return {"total": float(loss.detach())}, float((mask[:, 1:] != 0).sum())

    def evaluate(self, model: Any) -> dict[str, Any]:
        nll, tokens = text_nll(model, self.val, self.batch_size, self.device)
        val_loss = float(nll.sum() / max(tokens.sum(), 1))
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700.0))}
