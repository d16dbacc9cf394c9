"""CPU kernels of the dictionary MoE, compiled with numba when it is installed: the hard top-k
shrinkage (used by every CPU pass) and the training step of ``DictionaryMoE.accumulate_gradients``
(second half of this module). Without numba, torch operations (and NumPy's sort) stand in.

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

import contextlib
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
    return HAVE_NUMBA and tensor.device.type == "cpu" and tensor.dtype in _KERNEL_DTYPES


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


def network_for(code_dim: int) -> np.ndarray:
    """The sorting network the top-k kernels use for ``code_dim`` entries (padded to a power of two)."""
    return sorting_network(1 << max(code_dim - 1, 0).bit_length())


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
        _keep_largest_network(codes, keep, network_for(codes.shape[1]))
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


# ---------------------------------------------------------------- the dictionary MoE's training step
#
# ``DictionaryMoE.accumulate_gradients`` on CPU: the LISTA recursion and everything after the
# experts' codes (gate, routing, projection head, reconstruction, contrastive loss, and all their
# gradients) as three compiled calls, in place of some 150 torch operations whose dispatch (2 to
# 4 us each on this project's 2-core machine) cost as much as their arithmetic at training batch
# sizes. Small matrix products go to BLAS through ``np.dot``; the two large ones (the experts'
# input drives and the encoder gradient) stay in torch. The kernels follow the torch functions
# of ``moespec.models.lista`` and ``moespec.models.dictionary`` line for line (layout: samples are
# columns) and are tested against autograd of the op-by-op model.


def _lista_steps_py(codes, lateral, keep, network):
    """The hard top-k LISTA recursion in place: ``codes[t] = H_k(codes[t] + S_t codes[t-1])``.

    codes (L, E, m, N) holds the drives W_t x on entry; lateral (L, E, m, m); keep (E,) k_e.
    """
    n_layers, n_experts, code_dim, n_columns = codes.shape
    product = np.empty((code_dim, n_columns), dtype=codes.dtype)
    for t in range(n_layers):
        if t > 0:  # z_0 = 0: the first step is W_0 x alone
            for expert in range(n_experts):
                np.dot(lateral[t, expert], codes[t - 1, expert], product)
                codes[t, expert] += product
        _keep_largest_network(codes[t], keep, network)


def _lista_backward_steps_py(grad_pre, lateral):
    """``h_{t-1} = S_t^T h_t`` (straight-through top-k: shrink' = 1), in place; grad_pre (L, E, m, N)
    holds dL/dz_L in its last step on entry."""
    n_layers, n_experts = grad_pre.shape[:2]
    for t in range(n_layers - 1, 0, -1):
        for expert in range(n_experts):
            np.dot(lateral[t, expert].T, grad_pre[t, expert], grad_pre[t - 1, expert])


def _route_py(logits, codes, straight_through, probs, combine, selected, expert_index, code, dispatch_fraction):
    """Softmax over experts, arg-max selection, combine weights and the mixed code, per column.

    logits, probs, combine (E, N); selected (E, N) bool; expert_index (N,); codes (E, m, N);
    code (m, N); dispatch_fraction (E,). Returns the Switch balance loss.
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
            combine[expert, column] = (
                (1.0 if selected[expert, column] else 0.0) if straight_through else probs[expert, column]
            )
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
    """Pair losses of the margin contrastive loss from the Gram matrix ``e^T e`` (N, N); returns
    their sum over off-diagonal pairs and writes slope = dl/d(d^2) (N, N) and its row sums (N,)."""
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


def _route_backward_py(
    codes,
    grad_code,
    combine,
    probs,
    error,
    dispatch_fraction,
    residual,
    reconstruction,
    balance,
    logit_scale,
    grad_codes,
    grad_logits,
):
    """From dL/dcode (m, N) and the loss weights to dL/dcodes (E, m, N), dL/dlogits (E, N), and
    ``residual`` (E, d, N) scaled in place into dL/dresidual (``_route_backward`` in dictionary.py)."""
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
            grad_logits[expert, column] = (
                probs[expert, column] * (grad_probs[expert, column] - weighted[column]) * logit_scale
            )


def _add_bias_py(values, bias):
    """values (R, N) += bias (R,) per column."""
    for row in range(values.shape[0]):
        for column in range(values.shape[1]):
            values[row, column] += bias[row]


def _add_product_py(into, a, b):
    """into += a @ b."""
    product = np.dot(a, b)
    for row in range(into.shape[0]):
        for column in range(into.shape[1]):
            into[row, column] += product[row, column]


def _add_row_sums_py(into, values):
    """into (R,) += values (R, N) summed over columns."""
    for row in range(values.shape[0]):
        total = 0.0
        for column in range(values.shape[1]):
            total += values[row, column]
        into[row] += total


def _head_step_py(
    x,
    codes,
    positive,
    query_weight,
    query_bias,
    keys,
    dictionary,
    w1,
    b1,
    w2,
    b2,
    straight_through,
    margin,
    min_squared_distance,
    loss_weights,
    objective_weights,
    grad_query_weight,
    grad_query_bias,
    grad_keys,
    grad_dictionary,
    grad_w1,
    grad_b1,
    grad_w2,
    grad_b2,
    grad_codes,
    losses,
):
    """Forward and backward of everything after the experts' codes, for ``accumulate_gradients``.

    ``head_forward`` + ``contrastive_forward`` + ``contrastive_backward`` + ``head_backward`` of the
    torch path, samples as columns: x (N, d); codes (E, m, N); positive (N, N); the weights as in
    ``HeadWeights``; loss_weights (3,) = dL/d(contrastive, reconstruction, balance), the weights
    of the objective times the gradient scale. Gradients are added to the ``grad_*`` buffers, dL/dcodes
    written to grad_codes (E, m, N), and to losses (4,) the three losses and their sum weighted by
    objective_weights (3,).
    """
    n_experts, code_dim, n_columns = codes.shape
    dtype = codes.dtype
    xt = np.ascontiguousarray(x.T)  # (d, N)
    # Gate and routing.
    query = np.dot(query_weight, xt)  # (q, N)
    _add_bias(query, query_bias)
    logit_scale = 1.0 / np.sqrt(keys.shape[1])
    logits = np.dot(keys, query)  # (E, N)
    for expert in range(n_experts):  # in place: an array times a float64 scalar would be float64
        for column in range(n_columns):
            logits[expert, column] *= logit_scale
    probs, combine = np.empty_like(logits), np.empty_like(logits)
    selected, expert_index = np.empty(logits.shape, dtype=np.bool_), np.empty(n_columns, dtype=np.int64)
    code, dispatch_fraction = np.empty((code_dim, n_columns), dtype=dtype), np.empty(n_experts, dtype=dtype)
    losses[2] = _route(logits, codes, straight_through, probs, combine, selected, expert_index, code, dispatch_fraction)
    # Projection head.
    hidden = np.dot(w1, code)  # (H, N)
    _add_bias(hidden, b1)
    for row in range(hidden.shape[0]):  # ReLU
        for column in range(n_columns):
            hidden[row, column] = max(hidden[row, column], 0.0)
    embedding = np.dot(w2, hidden)  # (P, N)
    _add_bias(embedding, b2)
    # Reconstruction.
    residual = np.empty((n_experts, xt.shape[0], n_columns), dtype=dtype)  # D_e z_e, then minus x
    for expert in range(n_experts):
        np.dot(dictionary[expert], codes[expert], residual[expert])
    error = np.empty_like(logits)
    losses[1] = _reconstruction_error(residual, xt, combine, error)
    # Contrastive loss over the ordered off-diagonal pairs.
    slope, slope_sum = np.empty((n_columns, n_columns), dtype=dtype), np.empty(n_columns, dtype=dtype)
    pairs = n_columns * (n_columns - 1)
    losses[0] = (
        _contrastive_pairs(np.dot(embedding.T, embedding), positive, margin, min_squared_distance, slope, slope_sum)
        / pairs
    )
    losses[3] = objective_weights[0] * losses[0] + objective_weights[1] * losses[1] + objective_weights[2] * losses[2]
    # Backward: the contrastive gradient 4 c (rowsum(C) e - C e), column i for sample i (C symmetric).
    grad_embedding = np.dot(embedding, slope)  # (P, N)
    coefficient = -4.0 * loss_weights[0] / pairs
    for row in range(grad_embedding.shape[0]):
        for column in range(n_columns):
            grad_embedding[row, column] = coefficient * (
                grad_embedding[row, column] - slope_sum[column] * embedding[row, column]
            )
    _add_product(grad_w2, grad_embedding, hidden.T)
    _add_row_sums(grad_b2, grad_embedding)
    grad_hidden = np.dot(w2.T, grad_embedding)  # (H, N)
    for row in range(grad_hidden.shape[0]):
        for column in range(n_columns):
            if hidden[row, column] <= 0.0:
                grad_hidden[row, column] = 0.0
    _add_product(grad_w1, grad_hidden, code.T)
    _add_row_sums(grad_b1, grad_hidden)
    grad_code = np.dot(w1.T, grad_hidden)  # (m, N)
    grad_logits = np.empty_like(logits)
    _route_backward(
        codes,
        grad_code,
        combine,
        probs,
        error,
        dispatch_fraction,
        residual,
        loss_weights[1],
        loss_weights[2],
        logit_scale,
        grad_codes,
        grad_logits,
    )
    for expert in range(n_experts):  # residual is dL/dresidual now
        _add_product(grad_dictionary[expert], residual[expert], codes[expert].T)
        _add_product(grad_codes[expert], dictionary[expert].T, residual[expert])
    _add_product(grad_keys, grad_logits, query.T)
    grad_query = np.dot(keys.T, grad_logits)  # (q, N)
    _add_product(grad_query_weight, grad_query, x)
    _add_row_sums(grad_query_bias, grad_query)


def _compile(function):
    return numba.njit(cache=True, nogil=True, boundscheck=False)(function) if HAVE_NUMBA else None


# Helpers first: a kernel refers to the compiled helpers it calls by their global names.
_keep_largest_network = _compile(_keep_largest_network_py)
_route = _compile(_route_py)
_reconstruction_error = _compile(_reconstruction_error_py)
_contrastive_pairs = _compile(_contrastive_pairs_py)
_route_backward = _compile(_route_backward_py)
_add_bias = _compile(_add_bias_py)
_add_product = _compile(_add_product_py)
_add_row_sums = _compile(_add_row_sums_py)
_lista_steps = _compile(_lista_steps_py)
_lista_backward_steps = _compile(_lista_backward_steps_py)
_head_step = _compile(_head_step_py)


@functools.lru_cache(maxsize=1)
def _blas_libraries() -> tuple:
    """threadpoolctl controllers of the BLAS libraries loaded in this process (numba's ``np.dot`` calls
    SciPy's; torch's MKL is linked statically and invisible here, so it is never touched)."""
    import scipy.linalg.cython_blas  # noqa: F401 - the library numba's np.dot binds to, loaded now
    import threadpoolctl

    return tuple(threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers)


@contextlib.contextmanager
def _single_threaded_blas():
    """Run BLAS on one thread inside a kernel, restoring each library's setting afterwards.

    OpenBLAS's own threads spin against torch's OpenMP threads on the same cores: at batch 256 a
    training step of the default dictionary MoE took 7.4 ms with SciPy's OpenBLAS on 2 threads
    and 2.4 ms on one (2-core machine). The kernels' products are small; one thread is enough.
    """
    saved = [(library, library.get_num_threads()) for library in _blas_libraries()]
    for library, threads in saved:
        if threads != 1:
            library.set_num_threads(1)
    try:
        yield
    finally:
        for library, threads in saved:
            if threads != 1:
                library.set_num_threads(threads)


def lista_steps(codes: np.ndarray, lateral: np.ndarray, keep: np.ndarray, network: np.ndarray) -> None:
    """``_lista_steps_py``, compiled, with single-threaded BLAS."""
    with _single_threaded_blas():
        _lista_steps(codes, lateral, keep, network)


def lista_backward_steps(grad_pre: np.ndarray, lateral: np.ndarray) -> None:
    """``_lista_backward_steps_py``, compiled, with single-threaded BLAS."""
    with _single_threaded_blas():
        _lista_backward_steps(grad_pre, lateral)


def head_step(*arrays_and_scalars) -> None:
    """``_head_step_py``, compiled, with single-threaded BLAS."""
    with _single_threaded_blas():
        _head_step(*arrays_and_scalars)
