"""Blocked exact k-nearest-neighbour distances (torch matmul + top-k; never an N x N matrix).

Candidates are ranked in float32 on centred, rescaled data (``||x||^2 - 2 q.x`` per query block, one
fused ``addmm`` into a reused buffer, then ``topk``), and the final radii are recomputed in float64
on the centred data. The float32 ranking is what makes the search fast; the float64 recomputation
is what makes the radii exact: in float32 the expanded form loses about ``1e-7 * ||x||^2`` to
cancellation, which turns exact duplicates into small positive radii and can swap near-ties
(geometry_perf.md section 3). A few extra candidates per query absorb those swaps. Pairs closer than
about ``1e-4 * sqrt(||x||^2 + ||q||^2)`` (centred), where even float64 cancellation would show, are
recomputed as ``||x - q||`` directly, so exact duplicates are exactly 0. Memory: the data in float32
and float64, one query block of ranking scores (at most 64 MiB and half the points), a 32 MiB
gather buffer, and the (n_queries, k) output.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moespec.errors import ConfigError, DataError

#: Bytes of the (query block x N) float32 ranking buffer.
_RANK_BUFFER_BYTES = 64 << 20
#: Bytes of the (query block x candidates x D) float64 gather used to recompute exact radii.
_REFINE_BUFFER_BYTES = 32 << 20
#: Squared distances below this fraction of ~||x||^2 + ||q||^2 (centred) are recomputed directly.
_CANCELLATION = 1e-8


def default_device() -> str:
    """``"cuda"`` when a GPU is visible to torch, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_finite_rows(X: np.ndarray, what: str = "X") -> None:
    """Raise :class:`DataError` naming the first rows that hold NaN or inf."""
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(str(r) for r in rows[:5])
        raise DataError(f"{what} has {rows.size} row(s) with NaN or inf values (rows {shown}"
                        f"{', ...' if rows.size > 5 else ''}); remove or repair them first")


def rms_radius(X: np.ndarray) -> float:
    """Root-mean-square distance of the rows of ``X`` to their mean (the data's natural length scale)."""
    X = np.asarray(X)
    mean = X.mean(axis=0, dtype=np.float64)
    total = 0.0
    for start in range(0, X.shape[0], 65536):
        block = X[start:start + 65536].astype(np.float64) - mean
        total += float(np.einsum("ij,ij->", block, block))
    return math.sqrt(total / max(X.shape[0], 1))


def knn_distances(X, k: int, *, queries=None, exclude_self: bool = True, device: str | None = None,
                  block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean distances from each query point to its ``k`` nearest points of ``X``.

    Parameters
    ----------
    X : array_like of shape (n_samples, n_features)
        The point cloud (float32 or float64; not modified).
    k : int
        Number of neighbours per query, ``1 <= k <= n_samples - 1`` when excluding self.
    queries : array_like of int of shape (n_queries,), optional
        Row indices of ``X`` to query (default: every row).
    exclude_self : bool, default=True
        Drop each query's own row from its neighbours. Exact duplicates of the query are kept
        (at radius 0): the caller decides how to treat them.
    device : str, optional
        Torch device for the search (default: ``"cuda"`` when available, else ``"cpu"``).
    block_size : int, optional
        Queries per block; default: the block's ranking buffer stays within 64 MiB and half the points.

    Returns
    -------
    distances : ndarray of shape (n_queries, k), float64
        Sorted ascending along each row.
    indices : ndarray of shape (n_queries, k), int64
        Row indices into ``X`` of the neighbours, in the same order.
    """
    X = np.ascontiguousarray(X)
    n_samples = _validate(X, k, exclude_self)
    query_rows = np.arange(n_samples) if queries is None else np.asarray(queries, dtype=np.int64)
    device = device or default_device()
    n_candidates = min(n_samples, k + int(exclude_self) + _margin(k))
    augmented, ranked = _prepared(X, device)
    ranked_norms = (ranked * ranked).sum(dim=1).unsqueeze(0)  # (1, N) float32
    block = block_size or max(1, min(_RANK_BUFFER_BYTES // (4 * n_samples), -(-n_samples // 2)))
    block = min(block, len(query_rows))
    distances = np.empty((len(query_rows), k), dtype=np.float64)
    indices = np.empty((len(query_rows), k), dtype=np.int64)
    buffer = torch.empty((block, n_samples), dtype=torch.float32, device=device)
    step = max(1, min(block, _REFINE_BUFFER_BYTES // (n_candidates * (X.shape[1] + 1) * 8)))
    gathered = torch.empty((step * n_candidates, X.shape[1] + 1), dtype=torch.float64, device=device)
    for start in range(0, len(query_rows), block):
        rows = torch.from_numpy(query_rows[start:start + block]).to(device)
        scores = buffer[: len(rows)]
        # ||x||^2 - 2 q.x ranks x by distance to q (||q||^2 is constant per row): one fused pass.
        torch.addmm(ranked_norms, ranked[rows], ranked.T, beta=1.0, alpha=-2.0, out=scores)
        candidates = torch.topk(scores, n_candidates, dim=1, largest=False, sorted=False).indices
        dist, idx = _refine(augmented, rows, candidates, k, exclude_self, gathered)
        distances[start:start + len(rows)] = dist.cpu().numpy()
        indices[start:start + len(rows)] = idx.cpu().numpy()
    return distances, indices


def _validate(X: np.ndarray, k: int, exclude_self: bool) -> int:
    if X.ndim != 2:
        raise DataError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
    if X.dtype.kind != "f":
        raise DataError(f"X must hold floats, got dtype {X.dtype}")
    check_finite_rows(X)
    n_samples = X.shape[0]
    limit = n_samples - 1 if exclude_self else n_samples
    if not 1 <= k <= limit:
        raise ConfigError(f"k: need 1 <= k <= {limit} for {n_samples} points, got {k}")
    return n_samples


def _margin(k: int) -> int:
    # Extra float32 candidates re-ranked in float64: swaps at the k-th neighbour need several points
    # within ~1e-7 relative of each other, so a small margin makes the result exact in practice.
    return 8 + k // 32


def _prepared(X: np.ndarray, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``[X - mean, ||X - mean||^2]`` (exact radii) and float32 ``X - mean`` scaled to unit
    RMS radius (ranking: no overflow, best float32 precision)."""
    mean = X.mean(axis=0, dtype=np.float64)
    scale = rms_radius(X) or 1.0
    n_samples, dim = X.shape
    augmented = torch.empty((n_samples, dim + 1), dtype=torch.float64, device=device)
    ranked = torch.empty((n_samples, dim), dtype=torch.float32, device=device)
    for start in range(0, n_samples, 65536):
        block = torch.from_numpy(X[start:start + 65536].astype(np.float64) - mean).to(device)
        augmented[start:start + 65536, :dim] = block
        augmented[start:start + 65536, dim] = (block * block).sum(dim=1)
        ranked[start:start + 65536] = block / scale
    return augmented, ranked


def _refine(augmented: torch.Tensor, rows: torch.Tensor, candidates: torch.Tensor, k: int, exclude_self: bool,
            gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 distances to the candidates; drop self; keep the k nearest, sorted.

    One batched product per step gives ``||x||^2 - 2 x.q`` from the augmented rows
    ``[x, ||x||^2] . [-2 q, 1]``. ``gathered`` is a reused (step * n_candidates, D + 1) buffer:
    fresh multi-MB tensors and advanced indexing each cost several times the arithmetic on CPU.
    """
    n_rows, n_cand = candidates.shape
    dim = augmented.shape[1] - 1
    step = gathered.shape[0] // n_cand
    queries = torch.index_select(augmented, 0, rows)  # (n_rows, D + 1)
    query_norms = queries[:, dim:].clone()  # (n_rows, 1): ||q||^2
    queries[:, :dim] *= -2.0
    queries[:, dim] = 1.0
    squared = torch.empty((n_rows, n_cand), dtype=torch.float64, device=augmented.device)
    for s in range(0, n_rows, step):
        cand = candidates[s:s + step]
        x = torch.index_select(augmented, 0, cand.reshape(-1), out=gathered[: cand.numel()])
        torch.bmm(x.view(len(cand), n_cand, dim + 1), queries[s:s + step].unsqueeze(2),
                  out=squared[s:s + step].unsqueeze(2))
    squared += query_norms
    if exclude_self:
        squared.masked_fill_(candidates == rows.unsqueeze(1), torch.inf)
    # ||x||^2 + ||q||^2 - 2 x.q cancels for close pairs (||x|| ~ ||q||): recompute those directly.
    close = squared <= _CANCELLATION * (2.0 * query_norms + augmented[:, dim].mean())
    if bool(close.any()):
        _recompute(augmented[:, :dim], rows, candidates, squared, close)
    nearest, position = torch.topk(squared, k, dim=1, largest=False, sorted=True)
    return nearest.clamp_min_(0.0).sqrt_(), candidates.gather(1, position)


def _recompute(centred: torch.Tensor, rows, candidates, squared, close) -> None:
    """``||x - q||^2`` directly for the ``close`` pairs (exactly 0 for duplicates)."""
    r, c = close.nonzero(as_tuple=True)
    diff = centred[candidates[r, c]] - centred[rows[r]]
    squared[r, c] = (diff * diff).sum(dim=1)
