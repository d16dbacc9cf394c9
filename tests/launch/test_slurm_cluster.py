"""A real Slurm: sweeps through submitit arrays and emitted sbatch scripts (run from a copied project
with the profile's Python), afterok and aftercorr dependencies, failures and partial re-submissions,
cancellation of pending and running tasks, refused submissions (time limit within the signal
delay), the threads jobs compute with, and a training task preempted, requeued and resumed.

Needs the single-node Slurm of ``hpc/slurm_localhost.sh`` (``bash hpc/slurm_localhost.sh start``).
Skipped where ``sbatch`` is missing, except in CI (``$CI`` set), where a skip would hide a broken
setup and so fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moespec.artifacts import open_artifact
from moespec.cli import main
from moespec.errors import ClusterError
from moespec.launch import scheduler
from moespec.launch.records import load_records
from moespec.launch.runner import execute_task
from moespec.launch.slurm import load_plan, prepare, submit, submit_command
from moespec.launch.status import collect_status
from tests.builders import (
    TINY_DICTIONARY,
    demo_sweep,
    one_torch_thread,
    sacct_times,
    tiny_experiment,
    wait_final,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("slurm")]
SRC = str(Path(__file__).resolve().parents[2] / "src")


# --------------------------------------------------------------------------------------------------


def test_sweep_runs_as_dependent_job_arrays(tmp_path, cluster_profile, cleanup):
    path = write_config(tmp_path, demo_sweep(tmp_path))
    plan, cluster = load_plan(str(path), cluster=cluster_profile)
    cleanup((plan.experiment.root, plan.experiment.name))
    messages: list[str] = []
    record = submit_command(plan, cluster, mode="cached", echo=messages.append)
    embed_array, reduce_array = record["arrays"]
    assert (embed_array["name"], reduce_array["name"]) == ("embed.0", "reduce.0")
    assert reduce_array["after"] == [0] and len(reduce_array["tasks"]) == 4
    final = wait_final(plan)
    assert {s.state for s in final.values()} == {"done"}, [s.detail for s in final.values()]
    # afterok: every reduce task started after the last embed task ended
    times = sacct_times(
        [embed_array["job_id"], reduce_array["job_id"]], expect=len(embed_array["tasks"]) + len(reduce_array["tasks"])
    )
    embed_end = max(end for job, (state, start, end) in times.items() if job.startswith(embed_array["job_id"] + "_"))
    reduce_starts = [
        start for job, (state, start, end) in times.items() if job.startswith(reduce_array["job_id"] + "_")
    ]
    assert len(reduce_starts) == 4 and min(reduce_starts) >= embed_end
    # artifacts carry the array job ids; jobs ran the submission's code snapshot
    task = plan.tasks_for("reduce")[3]
    with open_artifact(task.dir) as reader:
        assert reader.attrs["slurm_array_job_id"] == reduce_array["job_id"]
        assert reader["reduced"].shape[1] == 3
        recorded_threads = reader.attrs["threads"]
    log = final[("reduce", 3)].scheduler_log
    assert log is not None and f"{record['snapshot']}/moespec" in log.read_text()
    # cpus_per_task 1: the job's BLAS started with one thread (set before numpy loaded), torch computed with one
    started = json.loads(log.read_text().split("threads at start: ", 1)[1].splitlines()[0])
    assert started and set(started.values()) == {1}, started
    assert set(json.loads(recorded_threads).values()) == {1}
    # submitting again finds nothing to do; status says done with the job ids
    assert submit_command(plan, cluster, mode="cached", echo=messages.append)["arrays"] == []
    assert main(["status", str(path), "--cluster", cluster_profile]) == 0


def test_emitted_scripts_run_from_a_copied_project_with_the_profiles_python(
    tmp_path, cluster_profile, cleanup, capsys, monkeypatch
):
    laptop, cluster_copy = tmp_path / "laptop", tmp_path / "cluster"
    laptop.mkdir()
    config = demo_sweep(laptop, poolings=("mean",), sizes=(2, 4))
    config["root"] = "results"  # relative to the project folder
    write_config(laptop, config)
    monkeypatch.chdir(laptop)
    assert main(["submit", "exp.yaml", "--emit-sbatch", "jobs/demo", "--cluster", cluster_profile]) == 0
    # the project (scripts, results folder with the record) moves to the cluster: nothing points back
    shutil.move(laptop, cluster_copy)
    monkeypatch.chdir(cluster_copy)
    plan, _ = load_plan("exp.yaml", cluster=cluster_profile)
    cleanup((plan.experiment.root, plan.experiment.name))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    submit_sh = cluster_copy / "jobs" / "demo" / "submit.sh"
    result = subprocess.run(["bash", str(submit_sh)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    ids = dict(line.split() for line in (submit_sh.parent / "job_ids.txt").read_text().splitlines())
    assert set(ids) == {"embed.0", "reduce.0"}
    again = subprocess.run(["bash", str(submit_sh)], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "submitted already" in again.stderr
    final = wait_final(plan)
    assert {s.state for s in final.values()} == {"done"}, [s.detail for s in final.values()]
    assert final[("reduce", 1)].job_id == f"{ids['reduce.0']}_1"
    with open_artifact(plan.tasks_for("reduce")[1].dir) as reader:
        assert reader["reduced"].shape[1] == 4 and reader.attrs["slurm_array_task_id"] == "1"
    assert (cluster_copy / "jobs" / "demo" / "logs").is_dir() and not laptop.exists()
    capsys.readouterr()
    assert main(["status", "exp.yaml", "--cluster", cluster_profile]) == 0
    assert "3 done" in capsys.readouterr().out


def texts_source(path: Path) -> list[dict]:
    return [{"kind": "files", "paths": [str(path)], "text_field": "text", "domain": "mine"}]


def write_texts(path: Path) -> None:
    from moespec.data.corpus import tokenizer_training_texts

    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in tokenizer_training_texts(2)[:12]))


def test_a_failure_cancels_only_its_own_dependants_and_retries_are_tracked(tmp_path, cluster_profile, cleanup, capsys):
    texts = [tmp_path / f"texts{i}.jsonl" for i in range(3)]
    write_texts(texts[0])  # texts1 and texts2 are missing at first: those two embed tasks fail
    config = demo_sweep(tmp_path, poolings=("mean",), sizes=(2,))
    config["reduce"]["mle_k"] = 3
    config["sweep"] = {"grid": {"embed.data": [texts_source(p) for p in texts]}}
    path = write_config(tmp_path, config)
    plan, cluster = load_plan(str(path), cluster=cluster_profile)
    cleanup((plan.experiment.root, plan.experiment.name))
    record = submit_command(plan, cluster, mode="cached", echo=lambda line: None)
    assert record["arrays"][1]["after_corresponding"] == [0] and record["arrays"][1]["after"] == []  # aftercorr
    final = wait_final(plan)
    assert final[("embed", 0)].state == "done" and final[("reduce", 0)].state == "done"  # its own embed succeeded
    for i in (1, 2):
        assert final[("embed", i)].state == "failed" and final[("embed", i)].detail.startswith("FAILED")
        assert final[("reduce", i)].state == "failed" and final[("reduce", i)].detail.startswith("CANCELLED")
    assert main(["status", str(path), "--cluster", cluster_profile]) == 1  # tasks failed: non-zero
    out = capsys.readouterr().out
    assert "2 done, 4 failed" in out and "texts1.jsonl" in out and "scheduler log:" in out
    # fixing a task by changing its config gives it a new uid: --retry-failed says so
    write_texts(tmp_path / "elsewhere.jsonl")
    config["sweep"]["grid"]["embed.data"][1] = texts_source(tmp_path / "elsewhere.jsonl")
    write_config(tmp_path, config)
    assert main(["submit", str(path), "--cluster", cluster_profile, "--retry-failed", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "2 task(s) were never submitted (embed 1, reduce 1) and are left out; 2 task(s) of earlier submissions "
        "(embed, reduce) are no longer in the plan"
        in out
        and "(without --retry-failed)" in out
    )
    # the fix in place instead: only tasks 1 and 2 of each stage are resubmitted, as arrays numbered 0..1
    config["sweep"]["grid"]["embed.data"][1] = texts_source(texts[1])
    write_config(tmp_path, config)
    write_texts(texts[1])
    write_texts(texts[2])
    assert main(["submit", str(path), "--cluster", cluster_profile, "--retry-failed"]) == 0
    assert "4 to submit" in capsys.readouterr().out
    embed_retry, reduce_retry = load_records(plan.experiment.root, plan.experiment.name)[-1]["arrays"]
    assert [task[2:] for task in embed_retry["tasks"]] == [[1, 0], [2, 1]]  # [task index, array index]
    waiting = {(s.task.stage, s.index): s for s in collect_status(plan)}
    assert waiting[("embed", 2)].job_id == f"{embed_retry['job_id']}_1"
    assert waiting[("embed", 2)].state in ("pending", "running", "done"), waiting[("embed", 2)].detail
    final = wait_final(plan)
    assert {s.state for s in final.values()} == {"done"}, [s.detail for s in final.values()]
    assert final[("reduce", 1)].job_id == f"{reduce_retry['job_id']}_0"


def test_cancelling_pending_and_running_tasks(tmp_path, cluster_profile, cleanup, capsys):
    # embed waits 5 minutes before it may start, so there is time to cancel it
    config = demo_sweep(tmp_path, resources={"embed": {"slurm_additional_parameters": {"begin": "now+300"}}})
    path = write_config(tmp_path, config)
    plan, cluster = load_plan(str(path), cluster=cluster_profile)
    cleanup((plan.experiment.root, plan.experiment.name))
    record = submit_command(plan, cluster, mode="cached", echo=lambda line: None)
    embed_id, reduce_id = (a["job_id"] for a in record["arrays"])
    subprocess.run(["scancel", f"{embed_id}_0"], check=True)
    # at once, although sacct may still say PENDING for seconds
    statuses = {(s.task.stage, s.index): s for s in collect_status(plan)}
    assert statuses[("embed", 0)].state == "failed", statuses[("embed", 0)].detail
    # a running task cancelled: submitit's job ignores SIGTERM until KillWait ends it, COMPLETING meanwhile
    subprocess.run(["scontrol", "update", f"JobId={embed_id}_1", "StartTime=now"], check=True)
    log = wait_for(
        lambda: {(s.task.stage, s.index): s for s in collect_status(plan)}[("embed", 1)].scheduler_log,
        "embed task 1 to be submitted",
    )
    wait_for(lambda: log.exists() and "attempt 1" in log.read_text(), "embed task 1 to run its task", 60, 0.2)
    subprocess.run(["scancel", f"{embed_id}_1"], check=True)
    seen = []  # running (sacct may lag behind the cancellation), then cancelling; never failed meanwhile

    def cancelling():
        seen.append({(s.task.stage, s.index): s for s in collect_status(plan)}[("embed", 1)].state)
        return seen[-1] == "cancelling"

    wait_for(cancelling, "embed task 1 to be cancelling", 8, 0.2)
    assert set(seen) <= {"running", "cancelling"}, seen
    assert main(["status", str(path), "--cluster", cluster_profile]) == 1
    assert "CANCELLING embed" in capsys.readouterr().out
    final = wait_final(plan)
    # task 1 may finish its artifact during KillWait (it was already computing); its job is CANCELLED
    assert final[("embed", 0)].state == "failed" and final[("embed", 1)].state in ("failed", "done")
    assert all(final[("reduce", i)].state == "failed" and "CANCELLED" in final[("reduce", i)].detail for i in range(4))


def test_time_limit_within_the_signal_delay_is_refused_at_submit(tmp_path, cluster_profile, capsys):
    config = demo_sweep(
        tmp_path, poolings=("mean",), sizes=(2,), resources={"reduce": {"timeout_min": 1, "slurm_signal_delay_s": 60}}
    )
    path = write_config(tmp_path, config)
    assert main(["submit", str(path), "--cluster", cluster_profile]) == 1
    err = capsys.readouterr().err
    assert "infra.resources.reduce.timeout_min: 1 min leaves 0 s of work before the checkpoint signal" in err
    assert "set timeout_min >= 2" in err
    assert not (tmp_path / "results" / "clu" / ".submissions").exists()


def test_unknown_partition_and_refused_sbatch_leave_nothing_queued(tmp_path, cluster_profile, cleanup):
    config = demo_sweep(tmp_path, resources={"reduce": {"slurm_partition": "nosuchpartition"}})
    plan, cluster = load_plan(str(write_config(tmp_path, config)), cluster=cluster_profile)
    cleanup((plan.experiment.root, plan.experiment.name))
    with pytest.raises(ClusterError, match="partition 'nosuchpartition'.*partitions: debug"):
        prepare(plan, cluster)
    assert load_records(plan.experiment.root, plan.experiment.name) == []
    # sbatch accepts embed, then refuses reduce (a GPU on a cluster without GPUs): embed is cancelled
    config = demo_sweep(tmp_path, resources={"reduce": {"slurm_additional_parameters": {"gres": "gpu:1"}}})
    plan, cluster = load_plan(str(write_config(tmp_path, config)), cluster=cluster_profile)
    submission = prepare(plan, cluster)
    with pytest.raises(ClusterError, match=r"(?s)stopped at array reduce.0: sbatch refused it.*cancelled the 1 array"):
        submit(submission, echo=lambda line: None)
    (record,) = load_records(plan.experiment.root, plan.experiment.name)
    assert record["state"] == "aborted"
    embed_id = record["cancelled"][0]
    deadline = time.monotonic() + 30
    while {s.state for s in (scheduler.job_states([embed_id]) or {}).values()} - {"CANCELLED", "COMPLETED"}:
        assert time.monotonic() < deadline
        time.sleep(1.0)


# --------------------------------------------------------------------------------------------------
# preemption and requeue


def test_preempted_training_is_requeued_and_resumes_to_the_uninterrupted_result(tmp_path, cluster_profile, cleanup):
    import submitit
    import torch

    config = tiny_experiment("req", n_per_domain=6)
    config["embed"]["max_length"] = 32
    # Long enough (hundreds of steps) that the interrupt below lands before training ends on a
    # quiet machine; with 12 epochs it sometimes finished first and nothing was requeued.
    config["train"] = {
        "input": "embed",
        "epochs": 150,
        "batch_size": 8,
        "checkpoint_every": 2,
        "patience": None,
        "lr": 1e-2,
        "model": TINY_DICTIONARY,
    }
    config["root"] = str(tmp_path / "results")
    plan, cluster = load_plan(str(write_config(tmp_path, config)), cluster=cluster_profile, executor="slurm")
    cleanup((plan.experiment.root, plan.experiment.name))
    record = submit_command(plan, cluster, mode="cached", echo=lambda line: None)
    (task,) = plan.tasks_for("train")
    train_job = record["arrays"][1]["job_id"]  # one task: submitted as a plain job
    checkpoint = task.dir / "work" / "checkpoint.pt"
    deadline = time.monotonic() + 180
    while not checkpoint.exists():
        assert time.monotonic() < deadline, "training did not write a checkpoint"
        time.sleep(0.2)
    folder = plan.experiment.root / plan.experiment.name / ".slurm" / "%j"
    submitit.SlurmJob(folder=folder, job_id=train_job)._interrupt()  # preemption: SIGTERM, then USR2
    final = wait_final(plan)
    assert final[("train", 0)].state == "done", final[("train", 0)].detail
    assert "resumed from" in task.log_path.read_text()
    assert "attempt 2" in final[("train", 0)].scheduler_log.read_text()
    # the same task, uninterrupted, in this process (one thread, like the job) on the same embeddings
    reference = replace(task, root=tmp_path / "reference")
    embed = plan.tasks_for("embed")[0]
    shutil.copytree(embed.dir, reference.root / embed.experiment / "embed" / embed.uid)
    with one_torch_thread():
        execute_task(reference)
    with open_artifact(task.dir) as resumed, open_artifact(reference.dir) as uninterrupted:
        np.testing.assert_array_equal(resumed.read("curves/val/total"), uninterrupted.read("curves/val/total"))
    resumed_weights = torch.load(task.dir / "final.pt", weights_only=True)["model"]
    reference_weights = torch.load(reference.dir / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(value, reference_weights[key]) for key, value in resumed_weights.items())
