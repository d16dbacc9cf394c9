"""Blocked exact k-nearest-neighbour distances (torch matmul + top-k; never an N x N matrix).

Candidates are ranked in float32 on centred, rescaled data (``||x||^2 - 2 q.x`` per query block, one
fused ``addmm`` into a reused buffer, then ``topk``), and the final radii are recomputed in float64
as ``||x - q||`` from the input rows themselves. The float32 ranking is what makes the search fast;
the direct float64 recomputation is what makes the radii exact: in float32 the expanded form loses
about ``1e-7 * ||x||^2`` to cancellation, which turns exact duplicates into small positive radii and
can swap near-ties (docs/performance.md, "Nearest neighbours"). A few extra candidates per query absorb those
swaps; exact duplicates come out exactly 0. The recomputation gathers the candidates' input rows in
the input's dtype (float32 for embeddings: half the memory traffic of a float64 copy) into a small
buffer, widens it to float64 in cache, and takes differences and norms there: about 23 us per query
at 112 candidates in 768-D, where one batched matrix-vector product per chunk took about 55.
Memory beyond the input: the data once more in float32 (centred, for the ranking: float32 products
of uncentred embeddings, whose common offset is often larger than their spread, would lose the
ranking), one query block of ranking scores (at most 64 MiB and half the points), 16 MiB of float64
temporaries, two 4 MiB gather buffers, and the (n_queries, k) output.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moespec.errors import ConfigError, DataError

#: Bytes of the (query block x N) float32 ranking buffer.
_RANK_BUFFER_BYTES = 64 << 20
#: Bytes of the float64 (queries x candidates x D) chunk used to recompute exact radii (in cache).
_REFINE_BUFFER_BYTES = 4 << 20
#: Columns per group of the two-stage candidate selection (``_smallest``).
_GROUP = 16


def default_device() -> str:
    """``"cuda"`` when a GPU is visible to torch, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_finite_rows(X: np.ndarray, what: str = "X") -> None:
    """Raise :class:`DataError` naming the first rows that hold NaN or inf."""
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(str(r) for r in rows[:5])
        raise DataError(
            f"{what} has {rows.size} row(s) with NaN or inf values (rows {shown}"
            f"{', ...' if rows.size > 5 else ''}); remove or repair them first"
        )


def _row_chunk(X: np.ndarray) -> int:
    """Rows per float64 working chunk: at most 16 MiB of temporaries whatever the width."""
    return max(1, (16 << 20) // (8 * max(X.shape[1], 1)))


def rms_radius(X: np.ndarray) -> float:
    """Root-mean-square distance of the rows of ``X`` to their mean (the data's natural length scale)."""
    X = np.asarray(X)
    mean = X.mean(axis=0, dtype=np.float64)
    total = 0.0
    chunk = _row_chunk(X)
    for start in range(0, X.shape[0], chunk):
        block = X[start : start + chunk].astype(np.float64) - mean
        total += float(np.einsum("ij,ij->", block, block))
    return math.sqrt(total / max(X.shape[0], 1))


def knn_distances(
    X, k: int, *, queries=None, exclude_self: bool = True, device: str | None = None, block_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
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
    source, ranked = _prepared(X, device)
    ranked_norms = (ranked * ranked).sum(dim=1).unsqueeze(0)  # (1, N) float32
    block = block_size or max(1, min(_RANK_BUFFER_BYTES // (4 * n_samples), -(-n_samples // 2)))
    block = min(block, len(query_rows))
    distances = np.empty((len(query_rows), k), dtype=np.float64)
    indices = np.empty((len(query_rows), k), dtype=np.int64)
    groups = -(-n_samples // _GROUP)
    grouped = groups >= 4 * n_candidates  # two-stage selection pays off when groups outnumber candidates
    width = groups * _GROUP if grouped else n_samples
    buffer = torch.full((block, width), torch.inf, dtype=torch.float32, device=device)  # padding stays inf
    step = max(1, min(block, _REFINE_BUFFER_BYTES // (n_candidates * X.shape[1] * 8)))
    gathered = torch.empty((step * n_candidates, X.shape[1]), dtype=source.dtype, device=device)
    widened = gathered if source.dtype == torch.float64 else torch.empty_like(gathered, dtype=torch.float64)
    for start in range(0, len(query_rows), block):
        rows = torch.from_numpy(query_rows[start : start + block]).to(device)
        scores = buffer[: len(rows)]
        # ||x||^2 - 2 q.x ranks x by distance to q (||q||^2 is constant per row): one fused pass.
        torch.addmm(ranked_norms, ranked[rows], ranked.T, beta=1.0, alpha=-2.0, out=scores[:, :n_samples])
        if grouped:
            candidates = _smallest(scores, n_candidates)
        else:
            candidates = torch.topk(scores, n_candidates, dim=1, largest=False, sorted=False).indices
        dist, idx = _refine(source, rows, candidates, k, exclude_self, gathered, widened)
        distances[start : start + len(rows)] = dist.cpu().numpy()
        indices[start : start + len(rows)] = idx.cpu().numpy()
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
    """The input rows on ``device`` in their own dtype (exact radii; no copy for a CPU array) and
    float32 ``X - mean`` scaled to unit RMS radius (ranking: no overflow, best float32 precision)."""
    mean = X.mean(axis=0, dtype=np.float64)
    scale = rms_radius(X) or 1.0
    source = torch.from_numpy(X).to(device)
    ranked = torch.empty(X.shape, dtype=torch.float32, device=device)
    chunk = _row_chunk(X)
    for start in range(0, X.shape[0], chunk):
        block = torch.from_numpy(X[start : start + chunk].astype(np.float64) - mean).to(device)
        ranked[start : start + chunk] = block.div_(scale)
    return source, ranked


def _smallest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Column indices of the ``n`` smallest scores of each row, in two cheap stages.

    The columns are split into ``_GROUP`` interleaved slices of ``G = width / _GROUP`` columns, so
    that group ``j`` is the columns ``j, j + G, j + 2G, ...`` and its minimum is one vectorised
    reduction over contiguous memory. The ``n`` smallest scores lie in the ``n`` groups with the
    smallest minima (a group holding one of them has a minimum at most the n-th smallest score,
    and at most ``n`` groups can), so a top-k over the group minima and one over those groups'
    members replace the top-k over the whole row: about 20 ms against 33 for 838 x 20,000 scores
    and n = 112 (2 CPU threads), the largest cost of the search in 64-D.

    Parameters
    ----------
    scores : Tensor of shape (rows, width), width a multiple of ``_GROUP`` (padding columns +inf)
    n : int

    Returns
    -------
    LongTensor of shape (rows, n)
    """
    rows, width = scores.shape
    per_group = width // _GROUP
    by_group = scores.view(rows, _GROUP, per_group)  # column g * per_group + j is in group j
    best = torch.topk(by_group.amin(dim=1), n, dim=1, largest=False, sorted=False).indices  # (rows, n)
    members = by_group.gather(2, best.unsqueeze(1).expand(rows, _GROUP, n))  # (rows, _GROUP, n)
    pick = torch.topk(members.view(rows, -1), n, dim=1, largest=False, sorted=False).indices
    return (pick // n) * per_group + best.gather(1, pick % n)


def _refine(
    source: torch.Tensor,
    rows: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    exclude_self: bool,
    gathered: torch.Tensor,
    widened: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 distances ``||x - q||`` to the candidates; drop self; keep the k nearest, sorted.

    Per chunk of queries: gather the candidates' rows in the input dtype into ``gathered``, widen
    them to float64 in ``widened`` (the same buffer for float64 input), subtract the query in place
    and take the norms. Both buffers are reused and small enough to stay in cache: fresh multi-MB
    tensors and advanced indexing each cost several times the arithmetic on CPU, and a batched
    matrix-vector product is slower than these two element-wise passes.
    """
    n_rows, n_cand = candidates.shape
    step = gathered.shape[0] // n_cand
    queries = torch.index_select(source, 0, rows).to(torch.float64).unsqueeze(1)  # (n_rows, 1, D)
    radii = torch.empty((n_rows, n_cand), dtype=torch.float64, device=source.device)
    for s in range(0, n_rows, step):
        cand = candidates[s : s + step]
        x = torch.index_select(source, 0, cand.reshape(-1), out=gathered[: cand.numel()])
        if widened is not gathered:
            x = widened[: cand.numel()].copy_(x)
        difference = torch.sub(x.view(len(cand), n_cand, -1), queries[s : s + step], out=x.view(len(cand), n_cand, -1))
        torch.linalg.vector_norm(difference, dim=-1, out=radii[s : s + step])
    if exclude_self:
        radii.masked_fill_(candidates == rows.unsqueeze(1), torch.inf)
    nearest, position = torch.topk(radii, k, dim=1, largest=False, sorted=True)
    return nearest, candidates.gather(1, position)
