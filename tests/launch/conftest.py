"""Fixtures of the launch tests (builders are plain functions in ``helpers.py``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from moespec.launch import scheduler
from moespec.launch.records import latest_entries, load_records
from tests.builders import localhost_profile


@pytest.fixture
def profile_file(tmp_path):
    """A small GPU cluster profile in its own folder (for ``$MOESPEC_CLUSTERS``)."""
    path = tmp_path / "clusters" / "tiny.yaml"
    path.parent.mkdir()
    path.write_text(
        yaml.safe_dump(
            {
                "partition": "debug",
                "account": "proj",
                "gpus_per_node": 1,
                "cpus_per_node": 8,
                "mem_gb_per_node": 16,
                "max_timeout_min": 120,
                "max_array_size": 4,
                "array_parallelism": 3,
                "setup": ["module load python"],
                "defaults": {"timeout_min": 20, "mem_gb": 2},
                "stages": {"reduce": {"cpus_per_task": 4, "slurm_qos": "short"}},
            }
        )
    )
    return path


@pytest.fixture
def slurm():
    """Skip without Slurm on a developer machine; fail in CI, where Slurm must be there."""
    problem = None
    if shutil.which("sbatch") is None:
        problem = "sbatch is not on PATH (start one with: bash hpc/slurm_localhost.sh start)"
    elif subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0:
        problem = "slurmctld does not answer `scontrol ping` (bash hpc/slurm_localhost.sh start)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"cluster tests must run in CI: {problem}")
        pytest.skip(problem)


@pytest.fixture
def cluster_profile(tmp_path):
    """The localhost profile (hpc/slurm_localhost.sh's Slurm), its jobs run by this interpreter."""
    return str(localhost_profile(tmp_path))


@pytest.fixture
def cleanup():
    """Cancel whatever the test's submissions left queued (job ids from their records)."""
    roots: list[tuple[Path, str]] = []
    yield roots.append
    ids = {
        entry.array_job_id
        for root, name in roots
        for entry in latest_entries(load_records(root, name)).values()
        if entry.array_job_id
    }
    scheduler.cancel(sorted(ids))
