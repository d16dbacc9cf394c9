"""Builders shared by the launch tests: experiments, the golden submission, files and waits.

Plain functions (fixtures are in ``conftest.py``); test modules import from here, never from
each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from moespec.config import load_experiment
from moespec.launch.plan import Plan, make_plan
from moespec.launch.profiles import builtin_profiles_dir, load_profile
from moespec.launch.sbatch import ScriptContext
from moespec.launch.slurm import Submission, prepare
from moespec.launch.status import collect_status
from tests.conftest import tiny_experiment

GOLDEN = Path(__file__).parent / "golden"
FINAL_WAIT_S = 240


def sweep_experiment(root, **infra) -> dict:
    """embed (2 poolings) -> reduce (3 sizes): 2 embed tasks shared by 6 reduce tasks."""
    config = tiny_experiment("sw", n_per_domain=3, reduce={"n_components": 2, "mle_k": 5})
    config["root"] = str(root)
    config["sweep"] = {"grid": {"embed.pooling": ["mean", "cls"], "reduce.n_components": [2, 3, 4]}}
    if infra:
        config["infra"] = infra
    return config


def write_config(folder: Path, config: dict, name: str = "exp.yaml") -> Path:
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(config))
    return path


def localhost_profile(folder: Path) -> Path:
    """The built-in localhost profile with ``python:`` set to this interpreter (the tests' venv)."""
    raw = yaml.safe_load((builtin_profiles_dir() / "localhost.yaml").read_text())
    raw["python"] = sys.executable
    return write_config(folder, raw, "localhost.yaml")


def assert_golden(name: str, text: str) -> None:
    """Compare with ``golden/<name>``; ``MOESPEC_UPDATE_GOLDEN=1`` rewrites it (review the diff)."""
    path = GOLDEN / name
    if os.environ.get("MOESPEC_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with MOESPEC_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from {path} (MOESPEC_UPDATE_GOLDEN=1 to accept)"


def golden_profile(folder: Path) -> Path:
    return write_config(
        folder,
        {
            "partition": "gpu",
            "account": "proj",
            "max_array_size": 4,
            "array_parallelism": 3,
            "gpus_per_node": 4,
            "python": "python",
            "setup": ["module load python/3.11", "source $WORK/venv/bin/activate"],
            "defaults": {"timeout_min": 30, "mem_gb": 8},
            "stages": {
                "embed": {"gpus_per_node": 1, "slurm_additional_parameters": {"mail-type": "FAIL"}},
                "reduce": {"cpus_per_task": 4, "mem_gb": 1.5, "slurm_qos": "short", "slurm_signal_delay_s": 120},
            },
        },
        "gold.yaml",
    )


def golden_submission(folder: Path) -> Submission:
    experiment = load_experiment(sweep_experiment("/scratch/me/results"))
    submission = prepare(make_plan(experiment), load_profile(str(golden_profile(folder))), ask_scheduler=False)
    submission.id = "20250101-120000-abcdef"
    return submission


def golden_context(submission: Submission) -> ScriptContext:
    return ScriptContext(
        "sw",
        "gold",
        Path("jobs/sw/experiment.yaml"),
        Path("jobs/sw"),
        "python -m moespec.cli",
        tuple(submission.cluster.profile.setup),
        "cached",
    )


def demo_sweep(folder: Path, poolings=("mean", "cls"), sizes=(2, 3), **infra) -> dict:
    """The demo pipeline, tiny: embed on builtin:tiny-bert (3 texts per domain) -> reduce."""
    config = tiny_experiment("clu", n_per_domain=3, reduce={"n_components": 2, "mle_k": 5})
    config["embed"]["max_length"] = 32
    config["root"] = str(Path(folder) / "results")
    config["sweep"] = {"grid": {"embed.pooling": list(poolings), "reduce.n_components": list(sizes)}}
    config["infra"] = {"executor": "slurm", **infra}
    return config


def wait_final(plan: Plan, timeout_s: float = FINAL_WAIT_S) -> dict:
    """Poll until no task is pending, running, cancelling or unknown; returns {(stage, index): TaskStatus}."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = collect_status(plan)
        if all(s.state not in ("pending", "running", "cancelling", "unknown") for s in statuses):
            return {(s.task.stage, s.index): s for s in statuses}
        if time.monotonic() > deadline:
            waiting = ", ".join(f"{s.task.label} {s.state} {s.detail}" for s in statuses)
            raise AssertionError(f"still waiting: {waiting}")
        time.sleep(1.0)


def wait_for(condition, what: str, timeout_s: float = 120.0, every_s: float = 0.5):
    """Poll ``condition()`` until it returns something true; that value is returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def sacct_times(job_ids: list[str], expect: int = 0, timeout_s: float = 60.0) -> dict[str, tuple[str, str, str]]:
    """JobID -> (state, start, end) from sacct, polled until ``expect`` finished tasks are recorded.

    slurmdbd stores records asynchronously: right after the artifacts appear, sacct can still miss
    the last task of an array (seen right after a fresh `slurm_localhost.sh start`).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        text = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobID,State,Start,End", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        times = {line.split("|")[0]: tuple(line.split("|")[1:]) for line in text.splitlines() if line}
        finished = sum(1 for state, start, end in times.values() if end not in ("", "Unknown"))
        if finished >= expect or time.monotonic() > deadline:
            return times
        time.sleep(1.0)
