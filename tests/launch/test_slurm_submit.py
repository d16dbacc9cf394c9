"""Submitting without a scheduler: the dry run (golden), partial failures, the requeue wrapper, the snapshot."""

from __future__ import annotations

import pickle

import pytest

from moespec import artifacts
from moespec.errors import ClusterError
from moespec.launch import slurm
from moespec.launch.records import load_records
from moespec.launch.slurm import TaskJob, print_dry_run, snapshot_package, submit
from tests.launch.test_sbatch import assert_golden, golden_submission


def test_dry_run_prints_submitit_scripts(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "git_commit", lambda: "0123abc")
    submission = golden_submission(tmp_path)
    lines: list[str] = []
    print_dry_run(submission, lines.append)
    text = "\n".join(lines) + "\n"
    assert_golden("submitit_dry_run.txt", text)
    assert "#SBATCH --dependency='afterok:<job id of embed.0>'" in text
    assert "#SBATCH --kill-on-invalid-dep=yes" in text
    assert "export PYTHONPATH=/scratch/me/results/sw/.submissions/20250101-120000-abcdef/code" in text
    assert not (tmp_path / "sw").exists()


def test_sbatch_refusal_cancels_what_this_submission_queued(tmp_path, monkeypatch):
    submission = golden_submission(tmp_path)
    experiment = submission.plan.experiment
    experiment.root = tmp_path / "results"
    for array in submission.arrays:  # tasks carry their root; re-point them at tmp_path
        object.__setattr__(array, "tasks", tuple(_moved(t, experiment.root) for t in array.tasks))
    submitted, cancelled = [], []

    def fake_submit_array(sub, array, dependency):
        if array.name == "reduce.1":
            raise ClusterError("sbatch refused it: Batch job submission failed: Invalid qos specification")
        submitted.append((array.name, tuple(dependency)))
        return str(100 + len(submitted))

    monkeypatch.setattr(slurm, "_submit_array", fake_submit_array)
    monkeypatch.setattr(slurm.scheduler, "cancel", cancelled.extend)
    messages: list[str] = []
    with pytest.raises(ClusterError) as error:
        submit(submission, messages.append)
    text = str(error.value)
    assert "stopped at array reduce.1" in text and "Invalid qos specification" in text
    assert "cancelled the 2 array(s) it had already queued (101, 102)" in text
    assert submitted == [("embed.0", ()), ("reduce.0", ("101",))]
    assert cancelled == ["101", "102"]
    (record,) = load_records(experiment.root, "sw")
    assert record["state"] == "aborted" and record["cancelled"] == ["101", "102"]
    assert (submission.snapshot_dir / "moespec" / "launch" / "slurm.py").exists()


def _moved(task, root):
    from dataclasses import replace

    return replace(task, root=root)


def test_task_job_requeues_the_same_task():
    job = TaskJob()
    delayed = job.checkpoint("TASK", "cached", 2)
    assert delayed.function is job and delayed.args == ("TASK", "cached", 2)
    assert pickle.loads(pickle.dumps(job)).__class__ is TaskJob


def test_snapshot_copies_the_package_without_caches(tmp_path):
    snapshot_package(tmp_path)
    assert (tmp_path / "moespec" / "launch" / "runner.py").exists()
    assert not list(tmp_path.rglob("__pycache__"))


def test_cli_plan_dry_run_and_usage_errors(tmp_path, capsys):
    import yaml

    from moespec.cli import main
    from tests.launch.test_slurm_plan import sweep_experiment

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(sweep_experiment(tmp_path / "results")))
    assert main(["plan", str(path), "--cluster", "localhost"]) == 0
    out = capsys.readouterr().out
    assert "reduce: 6 tasks [indices 0-5] after embed" in out
    assert "reduce.0" in out and "after: embed.0" in out
    assert main(["submit", str(path), "--executor", "slurm", "--cluster", "localhost", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nothing is submitted" in out and "#SBATCH --partition=debug" in out
    assert not (tmp_path / "results" / "sw" / ".submissions").exists()
    assert main(["submit", str(path), "--retry-failed"]) == 2
    assert "need --executor slurm" in capsys.readouterr().err
    assert main(["submit", str(path), "--executor", "slurm", "--cluster", "nowhere"]) == 1
    assert "--cluster: unknown cluster profile 'nowhere'" in capsys.readouterr().err
