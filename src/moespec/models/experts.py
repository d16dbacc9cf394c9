"""A sort-by-expert experts implementation for transformers' MoE layers, with its own backward.

transformers (v5) lets an MoE model choose how its experts layer runs through
``config._experts_implementation`` and the ``ExpertsInterface`` registry
(``transformers/integrations/moe.py``). Its ``eager`` loop gathers each hit expert's tokens with
``torch.where``, takes the expert's weights by indexing the ``(E, 2I, d)`` parameter and scatters the
result back with ``index_add_``. On the CPU the backward of that indexing costs more than the
products: each hit expert's ``SelectBackward`` materialises a zero-filled gradient of the whole
parameter and autograd sums the ``E`` of them, ``E^2`` expert-sized fills and adds per layer (on a
2-core CPU at E=16, d=I=256, 2,048 tokens top-2: 38 % of eager's forward + backward in ``fill_``, 14 %
in ``add_``, 25 % in the matrix products; torch profiler). ``grouped_mm`` falls back to a loop on the
CPU and scatters through autograd; ``batched_mm`` copies one weight matrix per token.

``sorted_mm`` (registered by :func:`register`) sorts the ``T x k`` routed slots by expert once,
multiplies each expert's contiguous block of slots, and recombines with gathers only: because the
sort is a bijection on slots and every token owns exactly ``k`` slots, the inverse permutation
followed by a sum over the ``k`` slots of each token undoes it, in the forward pass and (for the
input gradient) in the backward pass. The backward is written out (SwiGLU derivative through
``aten::silu_backward``) so that autograd never sees an indexing op, and each expert's weight
gradient is written once, in place, by one product. Same arithmetic as ``eager`` up to summation
order; ``bench/lm.py`` measures it against ``eager``.

Weights are transformers' layout: ``gate_up_proj`` (E, 2 * I, d) with the gate rows first,
``down_proj`` (E, d, I), activation SiLU (the Qwen2-MoE / Mixtral / OLMoE experts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Name under which :func:`register` puts the implementation into transformers' ExpertsInterface.
SORTED_MM = "sorted_mm"


class _SortedExperts(torch.autograd.Function):
    """SwiGLU experts over slots sorted by expert; forward and backward use gathers, never scatters."""

    @staticmethod
    def forward(ctx, hidden, slot_weights, token_of_slot, slot_of_token, counts, gate_up, down):
        xs = hidden.index_select(0, token_of_slot)  # (S, d), slots grouped by expert
        width = down.shape[-1]
        h = xs.new_empty(xs.shape[0], 2 * width)  # (S, 2I): [gate | up]
        y = xs.new_empty(xs.shape)  # (S, d)
        for expert, block in _blocks(counts):
            torch.mm(xs[block], gate_up[expert].t(), out=h[block])
        silu_gate = F.silu(h[:, :width])  # kept: the up half of the gradient is grad_a * silu(gate)
        a = silu_gate * h[:, width:]  # (S, I)
        for expert, block in _blocks(counts):
            torch.mm(a[block], down[expert].t(), out=y[block])
        ctx.save_for_backward(xs, h, silu_gate, a, y, slot_weights, token_of_slot, slot_of_token, gate_up, down)
        ctx.counts = counts
        return _combine(y * slot_weights.unsqueeze(-1), slot_of_token, hidden.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        xs, h, silu_gate, a, y, slot_weights, token_of_slot, slot_of_token, gate_up, down = ctx.saved_tensors
        counts, width = ctx.counts, down.shape[-1]
        grad_slot = grad_out.index_select(0, token_of_slot)  # (S, d): out[t] sums its k slots
        grad_weights = (grad_slot * y).sum(-1)  # (S,)
        grad_y = grad_slot.mul_(slot_weights.unsqueeze(-1))
        grad_a = torch.empty_like(a)
        grad_down, grad_gate_up = _expert_grads(down, counts), _expert_grads(gate_up, counts)
        for expert, block in _blocks(counts):
            torch.mm(grad_y[block].t(), a[block], out=grad_down[expert])
            torch.mm(grad_y[block], down[expert], out=grad_a[block])
        grad_h = torch.empty_like(h)  # [d gate | d up], written in place: no concatenation
        torch.ops.aten.silu_backward(grad_a * h[:, width:], h[:, :width], grad_input=grad_h[:, :width])
        torch.mul(grad_a, silu_gate, out=grad_h[:, width:])
        grad_xs = torch.empty_like(xs)
        for expert, block in _blocks(counts):
            torch.mm(grad_h[block].t(), xs[block], out=grad_gate_up[expert])
            torch.mm(grad_h[block], gate_up[expert], out=grad_xs[block])
        grad_hidden = _combine(grad_xs, slot_of_token, grad_out.shape[0])
        return grad_hidden, grad_weights, None, None, None, grad_gate_up, grad_down


def _expert_grads(weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """An uninitialised gradient of ``weight`` (E, ...) with zeros for the experts no slot reached.

    Every reached expert's gradient is written whole by one product, so only the others need zeros.
    """
    grad = torch.empty_like(weight)
    for expert, count in enumerate(counts):
        if not count:
            grad[expert].zero_()
    return grad


def _blocks(counts: list[int]):
    """(expert, slice of its slots) for every expert with at least one slot."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, slice(start, start + count)
        start += count


def _combine(per_slot: torch.Tensor, slot_of_token: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Sum the k slots of every token: (S, d) in expert order -> (T, d)."""
    return per_slot.index_select(0, slot_of_token).view(n_tokens, -1, per_slot.shape[-1]).sum(1)


def sorted_mm_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts-forward signature: (T, d) tokens, (T, k) expert ids and weights -> (T, d).

    Raises
    ------
    NotImplementedError
        For experts layers this implementation does not cover (bias, no gate, transposed or
        interleaved weights, a post-expert norm, expert parallelism).
    """
    if (
        getattr(self, "has_bias", False)
        or not getattr(self, "has_gate", True)
        or getattr(self, "is_transposed", False)
        or not getattr(self, "is_concatenated", True)
        or getattr(self, "has_post_expert_norm", False)
        or getattr(self, "_is_expert_parallel", False)
    ):
        raise NotImplementedError(
            f"{SORTED_MM} covers SwiGLU experts with [gate; up] weights and no bias; "
            f"use 'eager' for {type(self).__name__}"
        )
    n_tokens, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, token order kept inside a group
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync per layer
    slot_of_token = torch.empty_like(order)
    slot_of_token[order] = torch.arange(order.numel(), device=order.device)
    slot_weights = top_k_weights.reshape(-1)[order].to(hidden_states.dtype)
    out = _SortedExperts.apply(
        hidden_states, slot_weights, order // k, slot_of_token, counts, self.gate_up_proj, self.down_proj
    )
    return out.to(hidden_states.dtype)


def register() -> None:
    """Put :data:`SORTED_MM` into transformers' experts registry (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if SORTED_MM not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(SORTED_MM, sorted_mm_experts_forward)
