"""Benchmark of the geometry library against scikit-learn baselines measured in the same run.

Three parts, each method in a fresh subprocess (peak memory = growth of ``ru_maxrss`` after imports,
so numbers are not polluted by earlier work):

1. PCA: ``StreamingPCA`` reading row chunks from an HDF5 file against
   ``sklearn.decomposition.PCA(svd_solver="covariance_eigh")`` on the same data held in memory
   (default 100,000 x 1,024 float32 -> 64). Goal: time within 1.5x of sklearn, at most half its
   peak memory.
2. Neighbour radii: ``knn_distances`` (blocked torch matmul + top-k, float64 radii) against
   ``sklearn.neighbors.NearestNeighbors(algorithm="brute")`` at N = 20,000 and 50,000 in 64-D and
   N = 20,000 in 768-D, k = 100 neighbours (the default ``vol_max``). Goal: at least as fast.
3. The whole fiber-bundle test (neighbours + test) on 50,000 points in 768-D with the default
   parameters (vol 10-100, window 10). Goal: under 15 minutes on a 2-core CPU.

Usage::

    python bench/geometry.py --quick          # small sizes, best of 3 runs, a few minutes
    python bench/geometry.py                  # the full sizes above (about 10-20 minutes on 2 cores)
    python bench/geometry.py --parts knn --repeats 3

Nothing is asserted: the script prints times, memory and ratios; read ratios, not absolute seconds,
on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(
    pca_n=100_000,
    pca_d=1024,
    pca_k=64,
    knn=[(20_000, 64), (50_000, 64), (20_000, 768)],
    k=100,
    fiber_n=50_000,
    fiber_d=768,
)
QUICK = dict(
    pca_n=50_000, pca_d=512, pca_k=32, knn=[(5_000, 64), (10_000, 64), (5_000, 768)], k=100, fiber_n=5_000, fiber_d=768
)


# --------------------------------------------------------------------------------------------------
# data (written once by the parent, read by every child)


def embedding_like(n: int, d: int, seed: int, block: int = 8192):
    """Rows with a 1/i spectrum, a random rotation, a large common mean and 32 cluster centres."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rotation = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    scales = (1.0 / np.sqrt(np.arange(1, d + 1))).astype(np.float32)
    centres = rng.standard_normal((32, d)).astype(np.float32) * 0.5
    mean = rng.standard_normal(d).astype(np.float32) * 2.0
    for start in range(0, n, block):
        rows = min(block, n - start)
        z = rng.standard_normal((rows, d), dtype=np.float32) * scales
        yield start, z @ rotation + centres[rng.integers(0, 32, rows)] + mean


def write_h5(path: Path, n: int, d: int, seed: int) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        data = f.create_dataset("x", (n, d), "float32", chunks=(max(1, (1 << 20) // (4 * d)), d))
        for start, rows in embedding_like(n, d, seed):
            data[start : start + len(rows)] = rows


def write_npy(path: Path, n: int, d: int, seed: int) -> None:
    import numpy as np

    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for start, rows in embedding_like(n, d, seed):
        out[start : start + len(rows)] = rows
    out.flush()


# --------------------------------------------------------------------------------------------------
# child tasks: each prints one JSON line


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(task: str, args: dict) -> dict:
    import h5py
    import numpy as np
    import sklearn.decomposition  # noqa: F401  (import before the baseline, for every child alike)
    import sklearn.neighbors  # noqa: F401
    import torch  # noqa: F401

    import moespec.geometry as geometry

    baseline = _peak_mb()
    started = time.perf_counter()
    result: dict = {}
    if task == "pca_streaming":
        with h5py.File(args["path"], "r") as f:
            started = time.perf_counter()
            pca = geometry.StreamingPCA(args["k"], chunk_rows=8192).fit(f["x"])
        result["evr"] = pca.explained_variance_ratio_.tolist()
    elif task == "pca_sklearn":
        with h5py.File(args["path"], "r") as f:
            X = f["x"][()]  # the baseline needs the data in memory
        started = time.perf_counter()
        pca = sklearn.decomposition.PCA(args["k"], svd_solver="covariance_eigh").fit(X)
        result["evr"] = pca.explained_variance_ratio_.tolist()
    elif task == "knn_torch":
        X = np.load(args["path"])
        started = time.perf_counter()
        distances, _ = geometry.knn_distances(X, args["k"])
        result["checksum"] = distances[:, -1].astype(float).tolist()[:2000]
    elif task == "knn_sklearn":
        X = np.load(args["path"])
        started = time.perf_counter()
        nn = sklearn.neighbors.NearestNeighbors(n_neighbors=args["k"] + 1, algorithm="brute").fit(X)
        distances, _ = nn.kneighbors(X)
        result["checksum"] = distances[:, -1].astype(float).tolist()[:2000]
    elif task == "fiber":
        X = np.load(args["path"])
        started = time.perf_counter()
        test = geometry.fiber_bundle_test(X, vol_min=10, vol_max=args["k"], window=10, alpha=1e-3, max_strata=2)
        result["summary"] = test.summary()
    else:
        raise SystemExit(f"unknown task {task}")
    result.update(seconds=time.perf_counter() - started, peak_mb=_peak_mb() - baseline)
    return result


REPEATS = 1


def run_child(task: str, args: dict) -> dict:
    """Best (shortest) of ``REPEATS`` runs, each in a fresh process; peak memory is the largest seen."""
    runs = []
    for _ in range(REPEATS):
        command = [sys.executable, __file__, "--child", task, json.dumps(args)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{task} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda run: run["seconds"])
    return {**best, "peak_mb": max(run["peak_mb"] for run in runs)}


# --------------------------------------------------------------------------------------------------
# the three parts


def bench_pca(sizes: dict, workdir: Path) -> None:
    import numpy as np

    n, d, k = sizes["pca_n"], sizes["pca_d"], sizes["pca_k"]
    path = workdir / f"pca_{n}x{d}.h5"
    print(f"\n== PCA {n:,} x {d:,} float32 -> {k} (streaming from HDF5 vs sklearn covariance_eigh in memory)")
    write_h5(path, n, d, seed=0)
    ours = run_child("pca_streaming", {"path": str(path), "k": k})
    base = run_child("pca_sklearn", {"path": str(path), "k": k})
    deviation = float(np.max(np.abs(np.subtract(ours["evr"], base["evr"]))))
    _row("sklearn covariance_eigh (in memory)", base)
    _row("StreamingPCA (HDF5 chunks)", ours)
    print(
        f"   time ratio ours/sklearn {ours['seconds'] / base['seconds']:.2f} (goal <= 1.5); peak-memory ratio "
        f"{ours['peak_mb'] / max(base['peak_mb'], 1e-9):.2f} (goal <= 0.5); max |dEVR| {deviation:.1e}"
    )
    path.unlink()


def bench_knn(sizes: dict, workdir: Path) -> None:
    import numpy as np

    k = sizes["k"]
    print(f"\n== exact neighbour radii, k = {k} (torch blocked matmul + top-k vs sklearn brute)")
    for n, d in sizes["knn"]:
        path = workdir / f"knn_{n}x{d}.npy"
        write_npy(path, n, d, seed=1)
        ours = run_child("knn_torch", {"path": str(path), "k": k})
        base = run_child("knn_sklearn", {"path": str(path), "k": k})
        agree = float(np.max(np.abs(np.subtract(ours["checksum"], base["checksum"])) / np.asarray(base["checksum"])))
        print(f"  N = {n:,}, D = {d}")
        _row("sklearn NearestNeighbors brute", base)
        _row("knn_distances", ours)
        print(
            f"   time ratio ours/sklearn {ours['seconds'] / base['seconds']:.2f} (goal <= 1); memory "
            f"{ours['peak_mb']:.0f} MB vs N*k*16 B = {n * k * 16 / 2**20:.0f} MB of output; "
            f"max rel. diff of k-th radius {agree:.1e}"
        )
        path.unlink()


def bench_fiber(sizes: dict, workdir: Path) -> None:
    n, d, k = sizes["fiber_n"], sizes["fiber_d"], sizes["k"]
    path = workdir / f"fiber_{n}x{d}.npy"
    print(f"\n== whole fiber-bundle test, {n:,} points in {d}-D (vol 10-{k}, window 10)")
    write_npy(path, n, d, seed=2)
    ours = run_child("fiber", {"path": str(path), "k": k})
    _row("fiber_bundle_test", ours)
    summary = ours["summary"]
    print(
        f"   {ours['seconds'] / 60:.1f} min (goal < 15 min at 50,000 x 768 on 2 cores); manifold rejection "
        f"{summary['rejection_rate']:.4f}, fiber {summary['fiber_rejection_rate']:.4f}, median local dimension "
        f"{summary['dimension_small_median']:.1f}"
    )
    path.unlink()


def _row(name: str, result: dict) -> None:
    print(f"   {name:<38} {result['seconds']:9.2f} s   peak +{result['peak_mb']:8.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--parts", default="pca,knn,fiber", help="comma-separated subset of pca,knn,fiber")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per method, best time kept (default: 3 with --quick, else 1)"
    )
    parser.add_argument("--child", nargs=2, metavar=("TASK", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return
    sizes = QUICK if args.quick else FULL
    global REPEATS
    REPEATS = args.repeats or (3 if args.quick else 1)
    import torch

    print(
        f"geometry bench ({'quick' if args.quick else 'full'}): {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
        f"load average {os.getloadavg()[0]:.1f}, best of {REPEATS} run(s) per method"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        parts = {"pca": bench_pca, "knn": bench_knn, "fiber": bench_fiber}
        for part in args.parts.split(","):
            parts[part.strip()](sizes, Path(tmp))


if __name__ == "__main__":
    main()
