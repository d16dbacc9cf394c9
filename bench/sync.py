"""Benchmark of ``moespec sync --from-hpc`` against ``rsync -a`` over ssh, measured in the same run.

Everything runs on 127.0.0.1: a throw-away sshd (``moespec.sync.loopback``, private keys and
known_hosts, nothing under ``~/.ssh`` touched), the same remote tree for every method, a fresh
destination for every timed copy, and a byte-for-byte check of every result after its timing.

Three parts, with the goals of issue 7:

1. bulk: a mixed tree (many small JSON files in nested folders, some checkpoints, two large HDF5
   files) into an empty folder. Goal: within 1.5x of rsync's time;
2. no change: the same pull again into the complete copy. Goal: within 1.5x of rsync;
3. small files at 20 ms: the small-file part of the tree through a delay line that adds a 20 ms
   round trip (a separate process, so it does not share the client's GIL). Goal: within 3x.

moespec runs in-process (``session.run_sync``), as the engine costs; the no-change part also
times the whole ``moespec sync`` command in a new process (interpreter start-up and imports
included), which is what a user waits for. rsync runs over the same ssh config (a fresh ssh
connection per run, like moespec's fresh connection). Rows are medians over the repeats;
methods are interleaved so that load changes on a shared machine hit them alike.

Usage::

    python bench/sync.py --quick     # ~40 MiB tree, 1 repeat (a minute or two)
    python bench/sync.py             # 502 MiB tree as in shared/research/sync.md, 3 repeats

Needs: ``openssh-server`` and ``rsync`` (``tests/sync/ensure_sshd.sh``), paramiko.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test harness: tests/sync/loopback.py

from moespec.sync.engine import EngineSettings  # noqa: E402
from moespec.sync.session import SyncRequest, run_sync  # noqa: E402
from tests.sync.loopback import DelayLine, LoopbackSsh, missing_tools  # noqa: E402

MiB = 1 << 20
FULL = dict(n_small=200, small_kb=10, n_medium=20, medium_mb=5, n_large=2, large_mb=200,
            rtt_small=200, rtt_medium=2, rtt_medium_mb=5, repeats=3, rtt_repeats=3)
QUICK = dict(n_small=100, small_kb=10, n_medium=4, medium_mb=2, n_large=1, large_mb=32,
             rtt_small=100, rtt_medium=2, rtt_medium_mb=1, repeats=1, rtt_repeats=1)
GOALS = {"bulk": 1.5, "no change": 1.5, "small files, 20 ms RTT": 3.0}


# --------------------------------------------------------------------------------------------------
# trees


def _write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # incompressible, like compressed HDF5
        for start in range(0, size, 4 * MiB):
            fh.write(os.urandom(min(4 * MiB, size - start)))


def mixed_tree(root: Path, p: dict) -> Path:
    """Small summaries in ~60 nested folders, medium checkpoints, a few large arrays."""
    for i in range(p["n_small"]):
        _write(root / f"run_{i % 20:03d}" / "logs" / f"step_{i % 3}" / f"summary_{i:04d}.json", p["small_kb"] * 1024)
    for i in range(p["n_medium"]):
        _write(root / f"run_{i % 20:03d}" / "ckpt" / f"ckpt_{i:03d}.pt", p["medium_mb"] * MiB)
    for i in range(p["n_large"]):
        _write(root / "aggregate" / "h5" / f"fields_{i}.h5", p["large_mb"] * MiB)
    return root


def small_tree(root: Path, p: dict) -> Path:
    """The small-file part: summaries in ~100 folders plus two checkpoints."""
    for i in range(p["rtt_small"]):
        _write(root / f"run_{i % 50:03d}" / f"step_{i % 2}" / f"summary_{i:04d}.json", p["small_kb"] * 1024)
    for i in range(p["rtt_medium"]):
        _write(root / "ckpt" / f"ckpt_{i}.pt", p["rtt_medium_mb"] * MiB)
    return root


def tree_size(root: Path) -> tuple[int, int]:
    sizes = [f.stat().st_size for f in root.rglob("*") if f.is_file()]
    return len(sizes), sum(sizes)


def verify(source: Path, copy: Path) -> None:
    """Byte-for-byte and whole-second-mtime equality of two trees (untimed)."""
    files = [p for p in source.rglob("*") if p.is_file()]
    copied = [p for p in copy.rglob("*") if p.is_file()]
    if len(files) != len(copied):
        raise AssertionError(f"{copy}: {len(copied)} files, expected {len(files)}")
    for path in files:
        other = copy / path.relative_to(source)
        if not filecmp.cmp(path, other, shallow=False) or int(path.stat().st_mtime) != int(other.stat().st_mtime):
            raise AssertionError(f"{other} differs from {path}")


# --------------------------------------------------------------------------------------------------
# methods


class Bench:
    def __init__(self, work: Path, config: Path):
        self.work = work
        self.config = config
        self.env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}

    def rsync(self, host: str, remote: Path, dest: Path) -> None:
        subprocess.run(["rsync", "-a", "-e", f"ssh -F {self.config}", f"{host}:{remote}/", f"{dest}/"],
                       check=True, env=self.env, stdout=subprocess.DEVNULL)

    def moespec(self, host: str, remote: Path, dest: Path, transport: str) -> None:
        request = SyncRequest("pull", host, str(remote), dest, transport=transport, ssh_config=self.config,
                              retries=0, engine=EngineSettings())
        report = run_sync(request)
        if not report.ok:
            raise RuntimeError(f"moespec sync failed: {report.failed[:3]} {report.problems}")

    def moespec_cli(self, host: str, remote: Path, dest: Path) -> None:
        subprocess.run([sys.executable, "-m", "moespec.cli", "sync", "--from-hpc", "--host", host, "--remote-root",
                        str(remote), "--local-root", str(dest), "--ssh-config", str(self.config), "--batch",
                        "--no-progress"],
                       check=True, env=self.env, stdout=subprocess.DEVNULL, cwd=self.work)


def measure(part: str, methods: list[tuple[str, str, object]], source: Path, work: Path, repeats: int,
            results: dict) -> None:
    """Run each (key, setup, fn) ``repeats`` times, interleaved; setup is 'empty' or 'populated'."""
    for rep in range(repeats):
        for key, setup, run in methods:
            dest = work / f"dst-{key}"
            if setup == "empty":
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
            elif not dest.exists():
                raise RuntimeError(f"{key}: no populated destination")
            os.sync()
            started = time.perf_counter()
            run(dest)
            elapsed = time.perf_counter() - started
            verify(source, dest)
            results.setdefault((part, key), []).append(elapsed)
            print(f"  [{part}, rep {rep + 1}/{repeats}] {key:28s} {elapsed:7.2f} s", file=sys.stderr, flush=True)


def table(results: dict, sizes: dict) -> None:
    """Print the results with ratios against rsync of the same part."""
    print()
    header = f"| {'part':24s} | {'method':38s} | {'median s':>8s} | {'min-max s':>11s} | {'MiB/s':>7s} " \
             f"| {'x rsync':>7s} | {'goal':>8s} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for (part, key), times in results.items():
        base = statistics.median(results[(part, "rsync -a")])
        median = statistics.median(times)
        ratio = median / base
        nbytes = sizes[part]
        rate = f"{nbytes / MiB / median:7.1f}" if part != "no change" else "    n/a"
        goal = ""
        if key.startswith("moespec") and "CLI" not in key and part in GOALS:
            goal = ("ok" if ratio <= GOALS[part] else "MISS") + f" {GOALS[part]}"
        print(f"| {part:24s} | {key:38s} | {median:8.2f} | {min(times):5.2f}-{max(times):<5.2f} | {rate} "
              f"| {ratio:7.2f} | {goal:>8s} |")
    print("(x rsync: median wall time / rsync's median in the same part; goal: the issue's bound on that ratio)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tree, one repeat")
    parser.add_argument("--repeats", type=int, help="override the number of repeats")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round trip added in part 3 (0: skip)")
    parser.add_argument("--transports", default="paramiko,openssh", help="moespec transports to measure")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    missing = missing_tools() + ([] if shutil.which("rsync") else ["rsync (apt-get install rsync)"])
    if missing:
        print("bench/sync.py needs: " + ", ".join(missing), file=sys.stderr)
        return 2
    p = dict(QUICK if args.quick else FULL)
    if args.repeats:
        p["repeats"] = p["rtt_repeats"] = args.repeats
    transports = [t for t in args.transports.split(",") if t]
    work = Path(tempfile.mkdtemp(prefix="moespec-syncbench-"))
    lab = LoopbackSsh(work / "ssh")
    delay = None
    try:
        server = lab.add_server("main")
        config = lab.write_config([lab.host_block("bench", server.port)])
        bench = Bench(work, config)
        tree = mixed_tree(work / "remote" / "results", p)
        n_files, n_bytes = tree_size(tree)
        print(f"host: {os.cpu_count()} CPUs, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"{subprocess.run(['ssh', '-V'], capture_output=True, text=True).stderr.strip()}; "
              f"{subprocess.run(['rsync', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}")
        print(f"mixed tree: {n_files} files, {n_bytes / MiB:.1f} MiB; repeats {p['repeats']}", flush=True)
        results: dict = {}
        bulk = [("rsync -a", "empty", lambda d: bench.rsync("bench", tree, d))]
        bulk += [(f"moespec ({t})", "empty", lambda d, t=t: bench.moespec("bench", tree, d, t)) for t in transports]
        measure("bulk", bulk, tree, work, p["repeats"], results)
        # the bulk destinations are complete copies now: re-sync them
        nochange = [("rsync -a", "populated", lambda d: bench.rsync("bench", tree, d))]
        nochange += [(f"moespec ({t})", "populated", lambda d, t=t: bench.moespec("bench", tree, d, t))
                     for t in transports]
        nochange.append(("moespec CLI process (paramiko)", "populated", lambda d: bench.moespec_cli("bench", tree, d)))
        _populate(work, "moespec CLI process (paramiko)", "rsync -a")
        measure("no change", nochange, tree, work, p["repeats"], results)
        sizes = {"bulk": n_bytes, "no change": n_bytes}
        if args.rtt_ms > 0:
            small = small_tree(work / "remote" / "small", p)
            n_small, small_bytes = tree_size(small)
            delay = DelayLine(server.port, args.rtt_ms)
            lab.write_config([lab.host_block("bench-rtt", delay.port, HostKeyAlias=f"[127.0.0.1]:{server.port}"),
                              lab.host_block("bench", server.port)])
            print(f"small tree: {n_small} files, {small_bytes / MiB:.1f} MiB through a {args.rtt_ms:.0f} ms "
                  f"delay line; repeats {p['rtt_repeats']}", flush=True)
            part = f"small files, {args.rtt_ms:.0f} ms RTT"
            rtt = [("rsync -a", "empty", lambda d: bench.rsync("bench-rtt", small, d))]
            rtt += [(f"moespec ({t})", "empty", lambda d, t=t: bench.moespec("bench-rtt", small, d, t))
                    for t in transports]
            GOALS.setdefault(part, 3.0)
            measure(part, rtt, small, work, p["rtt_repeats"], results)
            sizes[part] = small_bytes
        table(results, sizes)
        print(f"load at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if delay is not None:
            delay.close()
        lab.stop()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _populate(work: Path, key: str, from_key: str) -> None:
    """Give a method of the no-change part a complete copy made by another one (same size and mtime)."""
    dest = work / f"dst-{key}"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(work / f"dst-{from_key}", dest, symlinks=True, copy_function=shutil.copy2)


if __name__ == "__main__":
    sys.exit(main())
