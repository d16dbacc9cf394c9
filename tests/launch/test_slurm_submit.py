"""Submitting without a scheduler: the dry run (golden), partial failures, the requeue wrapper, the snapshot."""

from __future__ import annotations

import pickle

import pytest
import yaml

from moespec import artifacts
from moespec.errors import ClusterError
from moespec.launch import slurm
from moespec.launch.records import load_records
from moespec.launch.slurm import TaskJob, print_dry_run, snapshot_package, submit
from tests.builders import assert_golden, golden_submission, sweep_config


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
        submitted.append((array.name, dependency))
        return str(100 + len(submitted))

    monkeypatch.setattr(slurm, "_submit_array", fake_submit_array)
    monkeypatch.setattr(slurm.scheduler, "cancel", cancelled.extend)
    messages: list[str] = []
    with pytest.raises(ClusterError) as error:
        submit(submission, messages.append)
    text = str(error.value)
    assert "stopped at array reduce.1" in text and "Invalid qos specification" in text
    assert "cancelled the 2 array(s) it had already queued (101, 102)" in text
    assert submitted == [("embed.0", ""), ("reduce.0", "afterok:101")]
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
    from tests.builders import sweep_config

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(sweep_config(tmp_path / "results")))
    assert main(["plan", str(path), "--cluster", "localhost"]) == 0
    out = capsys.readouterr().out
    assert "reduce: 6 tasks [indices 0-5] after embed" in out
    assert "reduce.0" in out and "after: afterok embed.0" in out
    assert main(["submit", str(path), "--executor", "slurm", "--cluster", "localhost", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nothing is submitted" in out and "#SBATCH --partition=debug" in out
    assert not (tmp_path / "results" / "sw" / ".submissions").exists()
    assert main(["submit", str(path), "--retry-failed"]) == 2
    assert "need --executor slurm" in capsys.readouterr().err
    assert main(["submit", str(path), "--executor", "slurm", "--cluster", "nowhere"]) == 1
    assert "--cluster: unknown cluster profile 'nowhere'" in capsys.readouterr().err


def test_dry_run_without_a_controller_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    import subprocess

    from moespec.cli import main
    from moespec.launch import scheduler

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(sweep_config(tmp_path / "results")))
    dns_error = (
        "scontrol: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host\n"
        "scontrol: error: fetch_config: DNS SRV lookup failed\n"
        "scontrol: error: _establish_config_source: failed to fetch config\n"
        "scontrol: fatal: Could not establish a configuration source\n"
    )

    class Done:
        returncode, stdout, stderr = 1, "", dns_error

    calls = []
    monkeypatch.setattr(scheduler, "available", lambda: True)
    monkeypatch.setattr(scheduler.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: calls.append(args) or Done())
    assert main(["submit", str(path), "--executor", "slurm", "--cluster", "localhost", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert (
        "note: the Slurm controller does not answer (`scontrol ping...` failed: scontrol: error: "
        "resolve_ctls_from_dns_srv: res_nsearch error: Unknown host (+3 more line(s)))" in captured.out
    )
    assert "fetch_config" not in captured.out + captured.err and "retrying" not in captured.err
    assert len(calls) == 1 and "#SBATCH --array=0-5%2" in captured.out
    # a real submission retries, then refuses, naming the problem in one line
    monkeypatch.setattr(scheduler.time, "sleep", lambda s: None)
    assert main(["submit", str(path), "--executor", "slurm", "--cluster", "localhost"]) == 1
    captured = capsys.readouterr()
    assert "the Slurm controller does not answer" in captured.err and len(calls) == 1 + 3
    assert captured.err.count("fetch_config") == 0


def test_plan_for_a_cluster_whose_scratch_is_not_here(tmp_path, capsys, monkeypatch):
    from moespec.cli import main

    monkeypatch.delenv("SCRATCH", raising=False)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(sweep_config("results")))
    assert main(["plan", str(path), "--cluster", "example"]) == 0
    out = capsys.readouterr().out
    assert (
        "uses $SCRATCH, which is not set in this environment: artifacts are on the cluster, under "
        "$SCRATCH/moespec/results; their states are not checked" in out
    )
    assert "not checked here" in out and "embed.0" in out
