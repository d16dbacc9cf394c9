"""The objective of a decoder LM for the shared training loop (:func:`moespec.models.training.fit`).

:class:`LMObjective` supplies the loop with shuffled batches of packed windows, one forward and
backward pass per batch (next-token cross-entropy plus, for MoE models, the weighted
load-balancing and router z-losses; bf16 autocast when asked), and the validation metrics:

- ``val_loss``: mean next-token loss over every validation target (nats/token), its
  ``val_perplexity`` = exp(val_loss), ``val_accuracy`` (argmax = target);
- ``val_bits_per_byte``: summed loss / ln 2 / UTF-8 bytes of the validation texts (every token of
  every validation text, and the end-of-text after it, is a target once; see
  :mod:`moespec.data.packing`), the same per domain;
- MoE: per layer, ``expert_load`` (share of routed slots per expert), ``router_entropy`` (mean per
  token entropy of the router's softmax / log E), the validation balance and z-losses.

Everything it returns is plain floats and lists, so that the loop's checkpoints hold it as is.
The routing of the first validation tokens is kept after each evaluation (:attr:`last_routing`)
for router saturation and the token-level specialisation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from moespec.data.packing import PAD, PackedTokens, inputs_and_labels
from moespec.models.lm import loss_terms


@dataclass
class ValidationRouting:
    """Routing of validation tokens (the first ``n`` real input positions, in window order).

    Attributes
    ----------
    expert_index : ndarray of shape (n, L, k), int16
        Top-k experts per MoE layer.
    token_id : ndarray of shape (n,), int64
        The input token the router saw.
    domain : ndarray of shape (n,), int64
        Domain of the text the token belongs to.
    """

    expert_index: np.ndarray
    token_id: np.ndarray
    domain: np.ndarray


class LMObjective:
    """Training batches, the loss of one batch and the validation metrics of a causal LM.

    Parameters
    ----------
    train, val : PackedTokens
    val_domain : ndarray of shape (n_val_texts,), int64
        Domain of each validation text (``val.owner`` indexes it).
    val_bytes : ndarray of shape (n_val_texts,), int64
        UTF-8 bytes of each validation text.
    n_domains : int
    eot_id : int
    batch_size : int
        Windows per batch (training and validation).
    seed : int
        Batches of epoch ``e`` are a permutation seeded by ``(seed, e)``.
    device : torch.device
    balance_weight, z_weight : float
    autocast : torch.dtype, optional
        Training forward passes under autocast to this dtype; validation is float32.
    routing_tokens : int
        Validation tokens whose routing :attr:`last_routing` keeps.
    """

    def __init__(
        self,
        train: PackedTokens,
        val: PackedTokens,
        val_domain: np.ndarray,
        val_bytes: np.ndarray,
        n_domains: int,
        eot_id: int,
        batch_size: int,
        seed: int,
        device: Any,
        balance_weight: float,
        z_weight: float,
        autocast: Optional[Any] = None,
        routing_tokens: int = 0,
    ):
        self.train = torch.as_tensor(train.windows)
        self.val = val
        self.val_domain = np.asarray(val_domain, dtype=np.int64)
        self.domain_bytes = np.bincount(self.val_domain, weights=val_bytes, minlength=n_domains)
        self.n_domains = n_domains
        self.eot_id = eot_id
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.balance_weight, self.z_weight = balance_weight, z_weight
        self.autocast = autocast
        self.routing_tokens = routing_tokens
        self.last_routing: Optional[ValidationRouting] = None
        self.eval_seconds = 0.0  # spent in evaluate (throughput leaves it out)

    # -- the loop's protocol ---------------------------------------------------------------------------

    def batches(self, epoch: int) -> list[Any]:
        from moespec.models.training import epoch_order

        order = epoch_order(len(self.train), self.seed, epoch)
        return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def train_batch(self, model: Any, batch: Any, scale: float) -> tuple[dict[str, float], float]:
        inputs, labels = self._tensors(self.train[batch].numpy())
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            terms, _ = loss_terms(model, inputs, labels, self.balance_weight, self.z_weight)
        (terms["total"] * scale).backward()
        values = torch.stack([value.detach().float() for value in terms.values()]).tolist()  # one device sync
        return dict(zip(terms, values)), float((labels != -100).sum())

    @torch.no_grad()
    def evaluate(self, model: Any) -> dict[str, Any]:
        started = time.perf_counter()
        model.eval()
        sums = _Sums(self.n_domains)
        routing: list[tuple[np.ndarray, ...]] = []
        for start in range(0, len(self.val), self.batch_size):
            windows = self.val.windows[start : start + self.batch_size]
            owner = self.val.owner[start : start + self.batch_size]
            inputs, labels = self._tensors(windows)
            terms, output = loss_terms(model, inputs, labels, 0.0, 0.0)
            target_domain = self._domains(owner[:, 1:])
            sums.add_tokens(output.logits, labels, target_domain)
            if output.get("router_logits") is not None:
                input_domain = self._domains(owner[:, :-1])  # the router sees the input token
                real = torch.as_tensor(input_domain >= 0, device=self.device).reshape(-1)
                sums.add_routing(
                    output.router_logits,
                    real,
                    model.config.num_experts_per_tok,
                    float(terms["balance"]),
                    float(terms["z"]),
                )
                if sum(len(r[1]) for r in routing) < self.routing_tokens:
                    routing.append(
                        _routing_rows(
                            output.router_logits, real, model.config.num_experts_per_tok, windows[:, :-1], input_domain
                        )
                    )
        metrics = sums.metrics(self.domain_bytes)
        if routing:
            self.last_routing = _merge_routing(routing, self.routing_tokens)
        self.eval_seconds += time.perf_counter() - started
        return metrics

    # -- helpers -----------------------------------------------------------------------------------------

    def _tensors(self, windows: np.ndarray) -> tuple[Any, Any]:
        inputs, labels = inputs_and_labels(windows, self.eot_id)
        return (torch.as_tensor(inputs, device=self.device), torch.as_tensor(labels, device=self.device))

    def _domains(self, owner: np.ndarray) -> np.ndarray:
        """Domain of each position's text; -1 for the leading end-of-text and padding."""
        return np.where(owner == PAD, -1, self.val_domain[np.maximum(owner, 0)])


def make_optimizer(model: Any, *, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (GPT-2/nanoGPT practice: not on norms and biases).

    torch's fused kernel where the parameters live on the CPU or a CUDA device: one pass over each
    parameter instead of a dozen (4.3x faster than the default per-tensor loop for 14.7M
    parameters on a 2-core CPU; an MoE LM has more parameters than its dense twin per active one,
    so the optimiser's share of an MoE step is larger). The update is AdamW's, element-wise.
    """
    parameters = list(model.parameters())
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        fused=fused or None,
    )


class _Sums:
    """Running sums of one validation pass."""

    def __init__(self, n_domains: int):
        self.nll = np.zeros(n_domains)
        self.tokens = np.zeros(n_domains)
        self.correct = 0.0
        self.load: Optional[np.ndarray] = None  # (L, E) routed-slot counts
        self.entropy: Optional[np.ndarray] = None  # (L,) sums of normalised entropies
        self.routed = 0.0
        self.balance = self.z = 0.0
        self.batches = 0

    def add_tokens(self, logits: Any, labels: Any, target_domain: np.ndarray) -> None:
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        real = (labels != -100).cpu().numpy()
        n_domains = len(self.nll)
        self.nll += np.bincount(target_domain[real], weights=nll.double().cpu().numpy()[real], minlength=n_domains)
        self.tokens += np.bincount(target_domain[real], minlength=n_domains)
        self.correct += float(((logits.argmax(-1) == labels) & (labels != -100)).sum())

    def add_routing(self, router_logits: tuple, real: Any, top_k: int, balance: float, z: float) -> None:
        loads, entropies = [], []
        for logits in router_logits:
            probs = torch.softmax(logits.float()[real], dim=-1)  # (n, E)
            index = probs.topk(top_k, dim=-1).indices
            loads.append(torch.bincount(index.reshape(-1), minlength=probs.shape[-1]).double().cpu().numpy())
            entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1) / math.log(probs.shape[-1])
            entropies.append(float(entropy.double().sum()))
        self.load = np.array(loads) if self.load is None else self.load + np.array(loads)
        self.entropy = np.array(entropies) if self.entropy is None else self.entropy + np.array(entropies)
        self.routed += float(real.sum())
        self.balance += balance
        self.z += z
        self.batches += 1

    def metrics(self, domain_bytes: np.ndarray) -> dict[str, Any]:
        total_nll, total_tokens = float(self.nll.sum()), float(self.tokens.sum())
        val_loss = total_nll / max(total_tokens, 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            domain_loss = np.where(self.tokens > 0, self.nll / np.maximum(self.tokens, 1), np.nan)
            domain_bpb = np.where(domain_bytes > 0, self.nll / math.log(2) / np.maximum(domain_bytes, 1), np.nan)
        metrics = {
            "val_loss": val_loss,
            "val_perplexity": math.exp(min(val_loss, 700.0)),
            "val_bits_per_byte": total_nll / math.log(2) / max(float(domain_bytes.sum()), 1.0),
            "val_accuracy": self.correct / max(total_tokens, 1.0),
            "val_tokens": int(total_tokens),
            "val_domain_loss": domain_loss.tolist(),
            "val_domain_bits_per_byte": domain_bpb.tolist(),
        }
        if self.load is not None:
            metrics.update(
                expert_load=(self.load / self.load.sum(axis=1, keepdims=True)).tolist(),
                router_entropy=(self.entropy / max(self.routed, 1.0)).tolist(),
                val_balance=self.balance / self.batches,
                val_z=self.z / self.batches,
            )
        return metrics


def _routing_rows(
    router_logits: tuple, real: Any, top_k: int, inputs: np.ndarray, input_domain: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(expert_index (n, L, k), token ids (n,), domains (n,)) of a batch's real input positions."""
    index = torch.stack([logits.float()[real].topk(top_k, dim=-1).indices for logits in router_logits], dim=1)
    mask = real.cpu().numpy()
    return (
        index.to(torch.int16).cpu().numpy(),
        inputs.reshape(-1)[mask].astype(np.int64),
        input_domain.reshape(-1)[mask].astype(np.int64),
    )


def _merge_routing(parts: list[tuple[np.ndarray, ...]], limit: int) -> ValidationRouting:
    index, tokens, domains = (np.concatenate([part[i] for part in parts])[:limit] for i in range(3))
    return ValidationRouting(index, tokens, domains)
