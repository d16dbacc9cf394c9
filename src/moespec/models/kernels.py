"""CPU kernels for the dictionary MoE's hard top-k shrinkage, compiled with numba when it is installed.

The unrolled LISTA experts keep, in every step, the ``k_e`` largest-magnitude entries of each code
vector. On CPU the codes are stored as columns, (E, m, N), and each step needs the ``k_e``-th
largest magnitude of every column: 448 columns of 32 entries per step at the default sizes and
batch 64. Three ways of getting it, measured on this project's 2-core CI machine (torch 2.13):

* ``torch.sort`` / ``torch.topk`` along m: about 100 us per step;
* NumPy's vectorised sort of the transposed magnitudes: 25 us, 45 us with the transposing copy and
  the mask (the fallback below, used when numba is missing);
* a sorting network applied to all N columns at once (Batcher's odd-even merge sort, Knuth TAOCP
  vol. 3, 5.3.4): each of its 191 compare-exchanges is one vectorised min/max over a row of N
  values, and numba compiles the whole step to one loop nest: 11 us, 15 times faster than NumPy at
  batch 4096 (where the fallback takes 9.6 ms).

Both keep the entries whose magnitude is at least the ``k_e``-th largest, so they agree exactly
(ties, which would keep an extra entry, have probability zero for float32 data).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

try:  # numba lags new Python releases by a few months: the NumPy fallback keeps moespec usable meanwhile.
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

HAVE_NUMBA = numba is not None


_KERNEL_DTYPES = (torch.float32, torch.float64)


def fused(tensor: torch.Tensor) -> bool:
    """Whether the compiled CPU kernels below apply to ``tensor``."""
    return HAVE_NUMBA and not tensor.is_cuda and tensor.dtype in _KERNEL_DTYPES and tensor.device.type == "cpu"


@functools.lru_cache(maxsize=None)
def sorting_network(size: int) -> np.ndarray:
    """Batcher's odd-even merge sorting network for ``size`` (a power of two) inputs.

    Returns
    -------
    ndarray of shape (n_comparators, 2), int64
        Pairs ``(i, j)``, ``i < j``, in order: after applying ``a[i], a[j] = min, max`` for each,
        ``a`` is sorted ascending (191 comparators for 32 inputs).
    """
    if size < 1 or size & (size - 1):
        raise ValueError(f"sorting network size must be a power of two, got {size}")
    pairs = []
    block = 1
    while block < size:  # merge sorted runs of length `block` into runs of 2 * block
        step = block
        while step >= 1:
            for start in range(step % block, size - step, 2 * step):
                for offset in range(min(step, size - start - step)):
                    first, second = start + offset, start + offset + step
                    if first // (2 * block) == second // (2 * block):
                        pairs.append((first, second))
            step //= 2
        block *= 2
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def keep_largest_columns_(codes: np.ndarray, keep: np.ndarray) -> None:
    """Zero all but the ``keep[e]`` largest-magnitude entries of each column of ``codes[e]``, in place.

    Parameters
    ----------
    codes : ndarray of shape (E, m, N), float32 or float64, C-contiguous
        Code vectors as columns.
    keep : ndarray of shape (E,), int64
        Entries kept per column of each expert, 1 <= keep[e]; keep[e] >= m keeps everything.
    """
    if HAVE_NUMBA:
        size = 1 << max(codes.shape[1] - 1, 0).bit_length()
        _keep_largest_network(codes, keep, sorting_network(size))
    else:  # pragma: no cover - exercised only where numba is missing
        keep_largest_columns_numpy_(codes, keep)


def keep_largest_columns_numpy_(codes: np.ndarray, keep: np.ndarray) -> None:
    """``keep_largest_columns_`` with NumPy's sort: the fallback, and the kernel's reference in tests."""
    magnitude = np.abs(codes)  # (E, m, N)
    order_statistics = np.ascontiguousarray(magnitude.transpose(0, 2, 1))  # (E, N, m)
    order_statistics.sort(axis=-1)
    rank = np.clip(codes.shape[1] - keep, 0, None)  # ascending position of the smallest kept entry
    threshold = order_statistics[np.arange(len(codes)), :, rank]  # (E, N)
    np.multiply(codes, magnitude >= threshold[:, None, :], out=codes)


def _keep_largest_network_py(codes, keep, network):
    """The numba kernel's source (see ``keep_largest_columns_``)."""
    n_experts, code_dim, n_columns = codes.shape
    size = 1
    while size < code_dim:
        size *= 2
    ordered = np.empty((size, n_columns), dtype=codes.dtype)  # magnitudes, sorted down the rows
    for expert in range(n_experts):
        k = keep[expert]
        if k >= code_dim:
            continue
        for row in range(code_dim):
            for column in range(n_columns):
                ordered[row, column] = abs(codes[expert, row, column])
        for row in range(code_dim, size):  # padding below every magnitude
            for column in range(n_columns):
                ordered[row, column] = -1.0
        for comparator in range(network.shape[0]):
            low, high = ordered[network[comparator, 0]], ordered[network[comparator, 1]]
            for column in range(n_columns):  # one vectorised min/max across all columns
                a, b = low[column], high[column]
                low[column] = a if a < b else b
                high[column] = b if a < b else a
        threshold = ordered[size - k]  # k-th largest magnitude of each column
        for row in range(code_dim):
            values = codes[expert, row]
            for column in range(n_columns):
                if abs(values[column]) < threshold[column]:
                    values[column] = 0.0




# ---------------------------------------------------------------- the dictionary MoE's gate and losses
#
# Fused element-wise passes of ``moespec.models.dictionary.head_forward``/``head_backward`` and of
# the contrastive loss, each replacing 5 to 15 torch operations whose dispatch (about 3 us each on
# this CPU) outweighs their arithmetic at training batch sizes. The matrix products stay in torch.
# Every kernel is tested against the torch operations it replaces.


def _route_py(logits, codes, straight_through, probs, combine, selected, expert_index, code, dispatch_fraction):
    """Softmax over experts, arg-max selection, combine weights and the mixed code, per column.

    Parameters: logits, probs, combine (E, N); selected (E, N) bool; expert_index (N,) int64;
    codes (E, m, N); code (m, N); dispatch_fraction (E,). Returns the Switch balance loss.
    """
    n_experts, code_dim, n_columns = codes.shape
    largest = np.empty(n_columns, dtype=logits.dtype)
    total = np.zeros(n_columns, dtype=logits.dtype)
    for column in range(n_columns):
        largest[column] = logits[0, column]
        expert_index[column] = 0
    for expert in range(1, n_experts):  # the first maximum wins, as torch.argmax
        for column in range(n_columns):
            if logits[expert, column] > largest[column]:
                largest[column] = logits[expert, column]
                expert_index[column] = expert
    for expert in range(n_experts):
        for column in range(n_columns):
            probs[expert, column] = np.exp(logits[expert, column] - largest[column])
            total[column] += probs[expert, column]
    balance = 0.0
    for expert in range(n_experts):
        mean_probability, routed = 0.0, 0
        for column in range(n_columns):
            probs[expert, column] /= total[column]
            mean_probability += probs[expert, column]
            selected[expert, column] = expert_index[column] == expert
            routed += selected[expert, column]
            combine[expert, column] = (1.0 if selected[expert, column] else 0.0) if straight_through \
                else probs[expert, column]
        dispatch_fraction[expert] = routed / n_columns
        balance += dispatch_fraction[expert] * mean_probability / n_columns
    code[:] = 0.0
    for expert in range(n_experts):
        for row in range(code_dim):
            for column in range(n_columns):
                code[row, column] += combine[expert, column] * codes[expert, row, column]
    return n_experts * balance


def _reconstruction_error_py(residual, xt, combine, error):
    """``residual -= x`` (``D_e z_e`` on entry), ``error = |residual|^2`` per column; returns the
    combine-weighted mean error. residual (E, d, N), xt (d, N), combine and error (E, N)."""
    n_experts, input_dim, n_columns = residual.shape
    error[:] = 0.0
    for expert in range(n_experts):
        for row in range(input_dim):
            for column in range(n_columns):
                value = residual[expert, row, column] - xt[row, column]
                residual[expert, row, column] = value
                error[expert, column] += value * value
    loss = 0.0
    for expert in range(n_experts):
        for column in range(n_columns):
            loss += combine[expert, column] * error[expert, column]
    return loss / n_columns


def _contrastive_pairs_py(gram, positive, margin, min_squared_distance, slope, slope_sum):
    """Pair losses of the margin contrastive loss from the Gram matrix ``e e^T``; returns their sum
    over off-diagonal pairs and writes ``slope`` = dl/d(d^2) (N, N) and its row sums (N,)."""
    n = gram.shape[0]
    loss = 0.0
    for row in range(n):
        row_sum = 0.0
        for column in range(n):
            squared = max(gram[row, row] + gram[column, column] - 2.0 * gram[row, column], 0.0)
            value = 0.0
            if row == column:
                value = 0.0
            elif positive[row, column]:
                loss += squared
                value = 1.0
            else:
                distance = np.sqrt(max(squared, min_squared_distance))
                shortfall = max(margin - distance, 0.0)
                loss += shortfall * shortfall
                if squared >= min_squared_distance:
                    value = -shortfall / distance
            slope[row, column] = value
            row_sum += value
        slope_sum[row] = row_sum
    return loss


def _route_backward_py(codes, grad_code, combine, probs, error, dispatch_fraction, residual,
                       reconstruction, balance, logit_scale, grad_codes, grad_logits):
    """From dL/dcode (m, N) and the loss weights to dL/dcodes (E, m, N), dL/dlogits (E, N), and
    ``residual`` (E, d, N) scaled in place into dL/dresidual. See ``head_backward``."""
    n_experts, code_dim, n_columns = codes.shape
    input_dim = residual.shape[1]
    grad_probs = np.empty((n_experts, n_columns), dtype=probs.dtype)
    weighted = np.zeros(n_columns, dtype=probs.dtype)  # sum_e g_e p_e
    for expert in range(n_experts):
        from_balance = dispatch_fraction[expert] * balance * n_experts / n_columns
        for column in range(n_columns):
            grad_probs[expert, column] = error[expert, column] * reconstruction / n_columns + from_balance
        for row in range(code_dim):
            for column in range(n_columns):
                grad_probs[expert, column] += codes[expert, row, column] * grad_code[row, column]
                grad_codes[expert, row, column] = combine[expert, column] * grad_code[row, column]
        for row in range(input_dim):
            for column in range(n_columns):
                residual[expert, row, column] *= combine[expert, column] * (2.0 * reconstruction / n_columns)
        for column in range(n_columns):
            weighted[column] += grad_probs[expert, column] * probs[expert, column]
    for expert in range(n_experts):  # softmax backward
        for column in range(n_columns):
            grad_logits[expert, column] = (probs[expert, column] * (grad_probs[expert, column] - weighted[column])
                                           * logit_scale)


def _compile(function):
    return numba.njit(cache=True, nogil=True, boundscheck=False)(function) if HAVE_NUMBA else None


_keep_largest_network = _compile(_keep_largest_network_py)
route = _compile(_route_py)
reconstruction_error = _compile(_reconstruction_error_py)
contrastive_pairs = _compile(_contrastive_pairs_py)
route_backward = _compile(_route_backward_py)
