"""A real Slurm: sweeps through submitit arrays and emitted sbatch scripts, dependencies, failures,
cancellation, refused submissions, and a training task preempted, requeued and resumed.

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
import yaml

from moespec.artifacts import open_artifact
from moespec.cli import main
from moespec.errors import ClusterError
from moespec.launch import scheduler
from moespec.launch.plan import Plan
from moespec.launch.records import load_records
from moespec.launch.runner import execute_task
from moespec.launch.slurm import load_plan, prepare, submit, submit_command
from moespec.launch.status import collect_status
from tests.conftest import one_torch_thread, tiny_experiment

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
FINAL_WAIT_S = 240


@pytest.fixture(scope="module", autouse=True)
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
def cluster_profile():
    """The profile of the local Slurm (hpc/clusters/localhost.yaml)."""
    return str(REPO / "hpc" / "clusters" / "localhost.yaml")


@pytest.fixture
def cleanup():
    """Cancel whatever the test's submissions left queued (job ids from their records)."""
    roots: list[tuple[Path, str]] = []
    yield roots.append
    ids = [a["job_id"] for root, name in roots for r in load_records(root, name) for a in r.get("arrays", [])
           if a.get("job_id")]
    scheduler.cancel(ids)


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def demo_sweep(tmp_path: Path, poolings=("mean", "cls"), sizes=(2, 3), **infra) -> dict:
    """The demo pipeline, tiny: embed on builtin:tiny-bert (3 texts per domain) -> reduce."""
    config = tiny_experiment("clu", n_per_domain=3, reduce={"n_components": 2, "mle_k": 5})
    config["embed"]["max_length"] = 32
    config["root"] = str(tmp_path / "results")
    config["sweep"] = {"grid": {"embed.pooling": list(poolings), "reduce.n_components": list(sizes)}}
    config["infra"] = {"executor": "slurm", **infra}
    return config


def wait_final(plan: Plan, timeout_s: float = FINAL_WAIT_S) -> dict:
    """Poll until no task is pending, running or unknown; returns {(stage, index): TaskStatus}."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = collect_status(plan)
        if all(s.state not in ("pending", "running", "unknown") for s in statuses):
            return {(s.task.stage, s.index): s for s in statuses}
        if time.monotonic() > deadline:
            raise AssertionError("still waiting: " + ", ".join(f"{s.task.label} {s.state} {s.detail}" for s in statuses))
        time.sleep(1.0)


def sacct_times(job_ids: list[str], expect: int = 0, timeout_s: float = 60.0) -> dict[str, tuple[str, str, str]]:
    """JobID -> (state, start, end) from sacct, polled until ``expect`` finished tasks are recorded.

    slurmdbd stores records asynchronously: right after the artifacts appear, sacct can still miss
    the last task of an array (seen right after a fresh `slurm_localhost.sh start`).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        text = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Start,End", "-j", ",".join(job_ids)],
                              capture_output=True, text=True, check=True).stdout
        times = {line.split("|")[0]: tuple(line.split("|")[1:]) for line in text.splitlines() if line}
        finished = sum(1 for state, start, end in times.values() if end not in ("", "Unknown"))
        if finished >= expect or time.monotonic() > deadline:
            return times
        time.sleep(1.0)


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
    times = sacct_times([embed_array["job_id"], reduce_array["job_id"]],
                        expect=len(embed_array["tasks"]) + len(reduce_array["tasks"]))
    embed_end = max(end for job, (state, start, end) in times.items() if job.startswith(embed_array["job_id"] + "_"))
    reduce_starts = [start for job, (state, start, end) in times.items() if job.startswith(reduce_array["job_id"] + "_")]
    assert len(reduce_starts) == 4 and min(reduce_starts) >= embed_end
    # artifacts carry the array job ids; jobs ran the submission's code snapshot
    task = plan.tasks_for("reduce")[3]
    with open_artifact(task.dir) as reader:
        assert reader.attrs["slurm_array_job_id"] == reduce_array["job_id"]
        assert reader["reduced"].shape[1] == 3
    log = final[("reduce", 3)].scheduler_log
    assert log is not None and f"{record['snapshot']}/moespec" in log.read_text()
    # submitting again finds nothing to do; status says done with the job ids
    assert submit_command(plan, cluster, mode="cached", echo=messages.append)["arrays"] == []
    assert main(["status", str(path), "--cluster", cluster_profile]) == 0


def test_emitted_sbatch_scripts_run_the_same_tasks(tmp_path, cluster_profile, cleanup, capsys):
    path = write_config(tmp_path, demo_sweep(tmp_path, poolings=("mean",), sizes=(2, 4)))
    out = tmp_path / "jobs"
    assert main(["submit", str(path), "--emit-sbatch", str(out), "--cluster", cluster_profile]) == 0
    plan, _ = load_plan(str(path), cluster=cluster_profile)
    cleanup((plan.experiment.root, plan.experiment.name))
    result = subprocess.run(["bash", str(out / "submit.sh")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    ids = dict(line.split() for line in (out / "job_ids.txt").read_text().splitlines())
    assert set(ids) == {"embed.0", "reduce.0"}
    final = wait_final(plan)
    assert {s.state for s in final.values()} == {"done"}, [s.detail for s in final.values()]
    assert final[("reduce", 1)].job_id == f"{ids['reduce.0']}_1"
    with open_artifact(plan.tasks_for("reduce")[1].dir) as reader:
        assert reader["reduced"].shape[1] == 4 and reader.attrs["slurm_array_task_id"] == "1"
    capsys.readouterr()
    assert main(["status", str(path), "--cluster", cluster_profile]) == 0
    assert "3 done" in capsys.readouterr().out


def test_failure_cancels_dependants_and_retry_failed_resubmits_them(tmp_path, cluster_profile, cleanup, capsys):
    texts = tmp_path / "texts.jsonl"   # missing at first: the embed task fails
    config = demo_sweep(tmp_path, poolings=("mean",), sizes=(2,))
    config["embed"]["data"] = [{"kind": "files", "paths": [str(texts)], "text_field": "text", "domain": "mine"}]
    config["reduce"]["mle_k"] = 3
    path = write_config(tmp_path, config)
    plan, cluster = load_plan(str(path), cluster=cluster_profile)
    cleanup((plan.experiment.root, plan.experiment.name))
    submit_command(plan, cluster, mode="cached", echo=lambda line: None)
    final = wait_final(plan)
    assert final[("embed", 0)].state == "failed" and final[("embed", 0)].detail.startswith("FAILED")
    assert final[("reduce", 0)].state == "failed" and final[("reduce", 0)].detail.startswith("CANCELLED")
    assert main(["status", str(path), "--cluster", cluster_profile]) == 0
    out = capsys.readouterr().out
    assert "1 failed" not in out and "2 failed" in out
    assert "texts.jsonl" in out and "scheduler log:" in out   # the last lines of the error
    from moespec.data.corpus import tokenizer_training_texts

    texts.write_text("".join(json.dumps({"text": text}) + "\n" for text in tokenizer_training_texts(2)[:12]))
    assert main(["submit", str(path), "--cluster", cluster_profile, "--retry-failed"]) == 0
    assert "2 to submit" in capsys.readouterr().out
    final = wait_final(plan)
    assert {s.state for s in final.values()} == {"done"}, [s.detail for s in final.values()]


def test_cancelling_a_task_cancels_its_dependants(tmp_path, cluster_profile, cleanup):
    # embed waits 5 minutes before it may start, so there is time to cancel it
    config = demo_sweep(tmp_path, resources={"embed": {"slurm_additional_parameters": {"begin": "now+300"}}})
    path = write_config(tmp_path, config)
    plan, cluster = load_plan(str(path), cluster=cluster_profile)
    cleanup((plan.experiment.root, plan.experiment.name))
    record = submit_command(plan, cluster, mode="cached", echo=lambda line: None)
    embed_id, reduce_id = (a["job_id"] for a in record["arrays"])
    subprocess.run(["scancel", f"{embed_id}_0"], check=True)
    # afterok on an array is decided when the whole array has ended: let the other embed task run.
    subprocess.run(["scontrol", "update", f"JobId={embed_id}_1", "StartTime=now"], check=True)
    deadline = time.monotonic() + 90
    while True:
        states = scheduler.job_states([reduce_id]) or {}
        if states and all(s.state == "CANCELLED" for s in states.values()):
            break
        assert time.monotonic() < deadline, f"dependants not cancelled: {states}"
        time.sleep(1.0)
    statuses = wait_final(plan)
    assert statuses[("embed", 0)].state == "failed", statuses[("embed", 0)].detail
    assert statuses[("embed", 1)].state == "done"
    assert all(statuses[("reduce", i)].state == "failed" for i in range(4))


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
    config["train"] = {"input": "embed", "epochs": 150, "batch_size": 8, "checkpoint_every": 2, "patience": None,
                       "lr": 1e-2, "model": {"kind": "dictionary", "n_experts": 3, "query_dim": 8, "code_dim": 6,
                                             "n_layers": 2, "projection_hidden": 8, "projection_dim": 4}}
    config["root"] = str(tmp_path / "results")
    plan, cluster = load_plan(str(write_config(tmp_path, config)), cluster=cluster_profile, executor="slurm")
    cleanup((plan.experiment.root, plan.experiment.name))
    record = submit_command(plan, cluster, mode="cached", echo=lambda line: None)
    (task,) = plan.tasks_for("train")
    train_job = record["arrays"][1]["job_id"]    # one task: submitted as a plain job
    checkpoint = task.dir / "work" / "checkpoint.pt"
    deadline = time.monotonic() + 180
    while not checkpoint.exists():
        assert time.monotonic() < deadline, "training did not write a checkpoint"
        time.sleep(0.2)
    folder = plan.experiment.root / plan.experiment.name / ".slurm" / "%j"
    submitit.SlurmJob(folder=folder, job_id=train_job)._interrupt()   # preemption: SIGTERM, then USR2
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
