"""Benchmark of ``moespec sync --from-hpc`` as a user runs it against ``rsync -a`` over the same ssh.

Every timed run is a fresh process: ``python -m moespec.cli sync --from-hpc --remote bench ...``
started in a project folder with a ``sync/remotes.yaml`` (so interpreter start-up, imports and
reading the remotes file count, as they do for a user), and ``rsync -a -e "ssh -F CONFIG"`` with
the same ssh config, keys and server. Everything runs on 127.0.0.1: a throw-away sshd from the
test harness (``tests/sync/loopback.py``; this script puts the repository root on ``sys.path``
to import it), private keys and known_hosts, nothing under ``~/.ssh`` touched.

Three parts, each with the goal of issue 16 (at most 1.3x rsync's wall time, start-up included):

1. first pull: a mixed tree (small JSON summaries in nested folders, checkpoints, large HDF5
   files) into an empty folder;
2. no change: the same pull again into the complete copy;
3. incremental: a tenth of the small files and one checkpoint rewritten on the cluster, a few
   files added; pulled into a copy of the tree as it was before.

Optionally (``--rtt-ms``), the first pull of the small-file part through a delay line (a
separate process) that adds a round trip. Rows are medians over the repeats; the methods are
interleaved so that load changes on a shared machine hit them alike; every copy is compared
byte for byte (and whole-second mtime) with its source after its timing.

Usage::

    python bench/sync.py --quick     # ~40 MiB tree, 3 repeats (a few minutes)
    python bench/sync.py             # ~500 MiB tree, 3 repeats

Needs: ``openssh-server`` and ``rsync`` (``tests/sync/ensure_sshd.sh``), paramiko.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the ssh harness lives with the tests: tests/sync/loopback.py

from tests.sync.loopback import DelayLine, LoopbackSsh, missing_tools  # noqa: E402

MiB = 1 << 20
FULL = dict(n_small=400, small_kb=10, n_medium=20, medium_mb=5, n_large=2, large_mb=200, repeats=3)
QUICK = dict(n_small=200, small_kb=10, n_medium=4, medium_mb=2, n_large=1, large_mb=32, repeats=3)
GOAL = 1.3


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


def changed_tree(source: Path, target: Path, p: dict) -> Path:
    """A copy of ``source`` as the cluster has it later: every tenth summary and one checkpoint rewritten
    (new content and mtime), five new summaries."""
    shutil.copytree(source, target, copy_function=shutil.copy2)
    later = time.time() + 100
    changed = [f for f in sorted(target.rglob("summary_*.json"))[::10]] + sorted(target.rglob("ckpt_*.pt"))[:1]
    for path in changed:
        _write(path, path.stat().st_size)
        os.utime(path, (later, later))
    for i in range(5):
        _write(target / "run_000" / "logs" / "new" / f"summary_new_{i}.json", p["small_kb"] * 1024)
    return target


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
# methods: each a fresh process


class Methods:
    """``rsync -a`` and ``moespec sync`` (both transports) over one ssh config."""

    def __init__(self, project: Path, config: Path, transports: list[str]):
        self.project = project
        self.config = config
        # as a user runs it: no agent, and bytecode cached as an installed package has it
        self.env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "PYTHONDONTWRITEBYTECODE")}
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.names = ["rsync -a", *(f"moespec ({t})" for t in transports)]

    def write_remotes(self, host: str, root: Path) -> None:
        """The user's ``sync/remotes.yaml``: one remote per transport, all reading ``root`` on ``host``."""
        (self.project / "sync").mkdir(parents=True, exist_ok=True)
        lines = ["remotes:"]
        for transport in ("paramiko", "openssh"):
            lines += [
                f"  {transport}:",
                f"    host: {host}",
                f"    root: {root}",
                f"    transport: {transport}",
                f"    ssh_config: {self.config}",
            ]
        (self.project / "sync" / "remotes.yaml").write_text("\n".join(lines) + "\n")

    def run(self, name: str, host: str, remote: Path, dest: Path) -> None:
        if name == "rsync -a":
            argv = ["rsync", "-a", "-e", f"ssh -F {self.config}", f"{host}:{remote}/", f"{dest}/"]
        else:
            transport = name.split("(")[1].rstrip(")")
            argv = [
                sys.executable,
                "-m",
                "moespec.cli",
                "sync",
                "--from-hpc",
                "--remote",
                transport,
                "--local-root",
                str(dest),
                "--batch",
                "--no-progress",
            ]
        subprocess.run(argv, check=True, env=self.env, cwd=self.project, stdout=subprocess.DEVNULL)


def measure(
    part: str,
    methods: Methods,
    host: str,
    source: Path,
    work: Path,
    repeats: int,
    results: dict,
    start_from: Path | None,
) -> None:
    """Time every method ``repeats`` times, interleaved; each starts from ``start_from`` (None: empty)
    or, for the no-change part, from its own complete copy."""
    methods.write_remotes(host, source)
    for rep in range(repeats):
        for name in methods.names:
            dest = work / "dst" / name.replace(" ", "_").replace("(", "").replace(")", "")
            if part != "no change":
                shutil.rmtree(dest, ignore_errors=True)
                if start_from is None:
                    dest.mkdir(parents=True)
                else:
                    shutil.copytree(start_from, dest, copy_function=shutil.copy2)
            os.sync()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            methods.run(name, host, source, dest)
            elapsed = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            verify(source, dest)
            results.setdefault((part, name), []).append((elapsed, cpu))
            print(
                f"  [{part}, rep {rep + 1}/{repeats}] {name:20s} {elapsed:7.2f} s, client CPU {cpu:5.2f} s",
                file=sys.stderr,
                flush=True,
            )


def table(results: dict, goal: float) -> None:
    """Print the medians with their ratio to rsync's median in the same part."""
    print()
    header = (
        f"| {'part':22s} | {'method':20s} | {'median s':>8s} | {'min-max s':>11s} | {'x rsync':>7s} "
        f"| {'goal':>8s} | {'client CPU s':>12s} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for (part, name), runs in results.items():
        times = [wall for wall, _ in runs]
        base = statistics.median(wall for wall, _ in results[(part, "rsync -a")])
        median = statistics.median(times)
        ratio = median / base
        verdict = "" if name == "rsync -a" else ("ok" if ratio <= goal else "MISS") + f" {goal}"
        cpu = statistics.median(cpu for _, cpu in runs)
        print(
            f"| {part:22s} | {name:20s} | {median:8.2f} | {min(times):5.2f}-{max(times):<5.2f} | {ratio:7.2f} "
            f"| {verdict:>8s} | {cpu:12.2f} |"
        )
    print(
        "(x rsync: median wall time of the whole command, a fresh process, over rsync's median in the same part;\n"
        " client CPU: user + system time of the command and its children, e.g. ssh; the server's is not counted)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tree")
    parser.add_argument("--repeats", type=int, help="override the number of repeats")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="also a first pull through a delay line (0: skip)")
    parser.add_argument("--transports", default="paramiko,openssh", help="moespec transports to measure")
    args = parser.parse_args()
    missing = missing_tools() + ([] if shutil.which("rsync") else ["rsync (apt-get install rsync)"])
    if missing:
        print("bench/sync.py needs: " + ", ".join(missing), file=sys.stderr)
        return 2
    p = dict(QUICK if args.quick else FULL)
    repeats = args.repeats or p["repeats"]
    work = Path(tempfile.mkdtemp(prefix="moespec-syncbench-"))
    lab = LoopbackSsh(work / "ssh")
    delay = None
    try:
        server = lab.add_server("main")
        config = lab.write_config([lab.host_block("bench", server.port)])
        methods = Methods(work / "project", config, [t for t in args.transports.split(",") if t])
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(REPO / "src" / "moespec")], check=True, env=methods.env
        )  # what pip does on install; untimed
        before = mixed_tree(work / "remote" / "v1", p)
        after = changed_tree(before, work / "remote" / "v2", p)
        n_files, n_bytes = tree_size(before)
        print(
            f"host: {os.cpu_count()} CPUs, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
            f"{subprocess.run(['ssh', '-V'], capture_output=True, text=True).stderr.strip()}; "
            f"{subprocess.run(['rsync', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}"
        )
        print(
            f"tree: {n_files} files, {n_bytes / MiB:.1f} MiB; incremental: {tree_size(after)[0] - n_files} new "
            f"and {len(sorted(before.rglob('summary_*.json'))[::10]) + 1} rewritten files; repeats {repeats}",
            flush=True,
        )
        results: dict = {}
        measure("first pull", methods, "bench", before, work, repeats, results, start_from=None)
        measure("no change", methods, "bench", before, work, repeats, results, start_from=None)
        measure("incremental", methods, "bench", after, work, repeats, results, start_from=before)
        if args.rtt_ms > 0:
            delay = DelayLine(server.port, args.rtt_ms)
            lab.write_config(
                [
                    lab.host_block("bench-rtt", delay.port, HostKeyAlias=f"[127.0.0.1]:{server.port}"),
                    lab.host_block("bench", server.port),
                ]
            )
            measure(
                f"first pull, {args.rtt_ms:.0f} ms RTT",
                methods,
                "bench-rtt",
                before,
                work,
                repeats,
                results,
                start_from=None,
            )
        table(results, GOAL)
        print(f"load at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if delay is not None:
            delay.close()
        lab.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
