"""Cluster planning without a scheduler: profiles, layered resources, limits, arrays, chunks, dependencies."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from moespec.config import Resources, load_experiment
from moespec.errors import ClusterError, ConfigError
from moespec.launch.arrays import compress_indices, plan_arrays, task_key
from moespec.launch.plan import make_plan
from moespec.launch.profiles import (
    apply_scratch_root,
    builtin_profiles_dir,
    check_resources,
    load_profile,
    stage_resources,
)
from moespec.launch.slurm import load_plan, planned_arrays, prepare
from tests.builders import tiny_experiment
from tests.builders import sweep_config

REPO_PROFILES = Path(__file__).resolve().parents[2] / "hpc" / "clusters"


# ---------------------------------------------------------------------------------------- profiles


def test_every_profile_in_the_repository_is_valid():
    folder = builtin_profiles_dir()
    names = sorted(p.stem for p in folder.glob("*.yaml")) + sorted(p.stem for p in REPO_PROFILES.glob("*.yaml"))
    assert {"localhost", "example"} <= set(names)
    for name in names:
        assert load_profile(str(folder / f"{name}.yaml")).name == name
    assert load_profile("localhost").profile.partition == "debug"


def test_unknown_profile_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESPEC_CLUSTERS", str(tmp_path))
    with pytest.raises(ConfigError, match=r"unknown cluster profile 'nowhere'.*localhost"):
        load_profile("nowhere")
    with pytest.raises(ConfigError, match="no cluster profile file"):
        load_profile(str(tmp_path / "missing.yaml"))


def test_bad_profile_reports_every_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"partiton": "gpu", "gpus_per_node": -1, "stages": {"trian": {}}}))
    with pytest.raises(ConfigError) as error:
        load_profile(str(path))
    text = str(error.value)
    assert f"{path}: partiton: unknown key" in text
    assert "gpus_per_node" in text and "trian" in text


def test_profile_found_through_env(profile_file, monkeypatch):
    monkeypatch.setenv("MOESPEC_CLUSTERS", str(profile_file.parent))
    assert load_profile("tiny").profile.account == "proj"


def test_resources_are_layered(tmp_path, profile_file):
    experiment = load_experiment(sweep_config(tmp_path, resources={"reduce": {"mem_gb": 3}}))
    cluster = load_profile(str(profile_file))
    embed = stage_resources(cluster, experiment, "embed")
    reduce = stage_resources(cluster, experiment, "reduce")
    assert (embed.timeout_min, embed.mem_gb, embed.cpus_per_task) == (20, 2, 1)  # profile defaults
    assert (reduce.cpus_per_task, reduce.slurm_qos) == (4, "short")  # profile stage
    assert reduce.mem_gb == 3 and reduce.timeout_min == 20  # experiment over profile
    assert embed.slurm_partition == "debug" and embed.slurm_account == "proj"
    assert embed.slurm_array_parallelism == 3
    assert stage_resources(None, experiment, "embed") == Resources()


def test_resources_above_limits_are_refused_before_submission(tmp_path, profile_file):
    experiment = load_experiment(
        sweep_config(tmp_path, resources={"embed": {"gpus_per_node": 2, "timeout_min": 500}, "reduce": {"mem_gb": 64}})
    )
    with pytest.raises(ConfigError) as error:
        check_resources(load_profile(str(profile_file)), experiment, ["embed", "reduce"])
    problems = error.value.problems
    assert len(problems) == 3
    assert any("infra.resources.embed.gpus_per_node: asks for 2" in p and "gpus_per_node: 1" in p for p in problems)
    assert any("infra.resources.embed.timeout_min: asks for 500" in p for p in problems)
    assert any("infra.resources.reduce.mem_gb: asks for 64" in p and "tiny" in p for p in problems)
    assert not (tmp_path / "sw").exists()


def test_unknown_resource_key_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match="infra.resources.embed.slurm_partiton: unknown key"):
        load_experiment(sweep_config(tmp_path, resources={"embed": {"slurm_partiton": "x"}}))


def test_scratch_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MYSCRATCH", str(tmp_path / "scratch"))
    cluster_path = tmp_path / "c.yaml"
    cluster_path.write_text("scratch_root: $MYSCRATCH/moespec\n")
    config = sweep_config("results")
    cluster = load_profile(str(cluster_path))
    experiment = load_experiment(config)
    assert apply_scratch_root(experiment, cluster, None) == ""
    assert experiment.root == tmp_path / "scratch" / "moespec" / "results"
    absolute = load_experiment(sweep_config(tmp_path / "abs"))
    apply_scratch_root(absolute, cluster, None)
    assert absolute.root == tmp_path / "abs"
    monkeypatch.delenv("MYSCRATCH")
    with pytest.raises(ConfigError, match=r"uses \$MYSCRATCH, which is not set"):
        apply_scratch_root(load_experiment(config), cluster, None)
    away = load_experiment(config)
    assert "their states are not checked" in apply_scratch_root(away, cluster, None, unset_ok=True)
    assert str(away.root) == "$MYSCRATCH/moespec/results"


def test_load_plan_selects_cluster_only_for_slurm(tmp_path, profile_file):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(sweep_config(tmp_path / "r", cluster=str(profile_file))))
    _, cluster = load_plan(str(path))
    assert cluster is None  # executor local: the profile is not in use
    _, cluster = load_plan(str(path), executor="slurm")
    assert cluster.name == "tiny"
    path.write_text(yaml.safe_dump(sweep_config(tmp_path / "r", cluster="no-such-cluster")))
    with pytest.raises(ConfigError, match=f"{path}: infra.cluster: unknown cluster profile 'no-such-cluster'"):
        load_plan(str(path), executor="slurm")
    with pytest.raises(ConfigError, match="--cluster: unknown cluster profile 'other'"):
        load_plan(str(path), cluster="other")


# ------------------------------------------------------------------------------------------ arrays


def test_compress_indices():
    assert compress_indices([]) == ""
    assert compress_indices([3]) == "3"
    assert compress_indices([5, 0, 1, 2, 7, 8, 8]) == "0-2,5,7-8"


def test_one_array_per_stage_with_dependencies(tmp_path):
    plan = make_plan(load_experiment(sweep_config(tmp_path)))
    resources = {s: Resources(slurm_array_parallelism=2) for s in plan.stages()}
    arrays = plan_arrays(plan, plan.tasks, resources=resources, max_array_size=1001)
    assert [(a.name, len(a.tasks)) for a in arrays] == [("embed.0", 2), ("reduce.0", 6)]
    assert arrays[0].after == () and arrays[1].after == (0,)
    assert arrays[0].array_spec() == "0-1%2" and arrays[1].array_spec() == "0-5%2"
    assert [t.uid for t in arrays[1].tasks] == [t.uid for t in plan.tasks_for("reduce")]


def test_chunks_respect_max_array_size_and_index_mapping(tmp_path):
    plan = make_plan(load_experiment(sweep_config(tmp_path)))
    resources = {s: Resources() for s in plan.stages()}
    reduce_tasks = plan.tasks_for("reduce")
    missing = [reduce_tasks[i] for i in (0, 2, 3, 5)]
    arrays = plan_arrays(
        plan, missing, resources=resources, max_array_size=2, done={task_key(t) for t in plan.tasks_for("embed")}
    )
    assert [a.name for a in arrays] == ["reduce.0", "reduce.1"]
    for array in arrays:
        assert array.array_indices == tuple(range(len(array.tasks)))  # positions, below MaxArraySize
        for task, index in zip(array.tasks, array.task_indices):
            assert reduce_tasks[index] is task
        assert array.after == ()  # upstream is done
    assert [a.task_indices for a in arrays] == [(0, 2), (3, 5)]
    assert [a.array_spec() for a in arrays] == ["0-1%2", "0-1%2"]


def test_chunk_depends_only_on_chunks_it_reads(tmp_path):
    plan = make_plan(load_experiment(sweep_config(tmp_path)))
    resources = {s: Resources() for s in plan.stages()}
    arrays = plan_arrays(plan, plan.tasks, resources=resources, max_array_size=1)
    embeds = [a for a in arrays if a.stage == "embed"]
    assert len(embeds) == 2
    for array in arrays:
        if array.stage == "reduce":
            (upstream,) = array.after
            assert arrays[upstream].tasks[0].uid == array.tasks[0].inputs["embed"].uid


def test_active_upstream_jobs_become_dependencies_and_missing_upstream_is_an_error(tmp_path):
    plan = make_plan(load_experiment(sweep_config(tmp_path)))
    resources = {s: Resources() for s in plan.stages()}
    embed0, embed1 = plan.tasks_for("embed")
    reduce_tasks = plan.tasks_for("reduce")
    arrays = plan_arrays(
        plan,
        reduce_tasks,
        resources=resources,
        max_array_size=1001,
        done={task_key(embed1)},
        active_jobs={task_key(embed0): "77_0"},
    )
    assert [a.name for a in arrays] == ["reduce.0"] and arrays[0].after_jobs == ("77_0",)
    with pytest.raises(ClusterError, match=r"(?s)could never start.*not done and not submitted; 3 task\(s\) read it"):
        plan_arrays(plan, reduce_tasks, resources=resources, max_array_size=1001)


def test_prepare_without_scheduler(tmp_path, profile_file):
    plan = make_plan(load_experiment(sweep_config(tmp_path)))
    cluster = load_profile(str(profile_file))
    submission = prepare(plan, cluster, ask_scheduler=False)
    assert submission.max_array_size == 4
    assert [(a.name, len(a.tasks)) for a in submission.arrays] == [("embed.0", 2), ("reduce.0", 4), ("reduce.1", 2)]
    with pytest.raises(ClusterError, match="could never start"):
        prepare(plan, cluster, stages=["reduce"], ask_scheduler=False)
    with pytest.raises(ConfigError, match="--stages: fiber"):
        prepare(plan, cluster, stages=["fiber"], ask_scheduler=False)
    with pytest.raises(ConfigError, match="read-only"):
        prepare(plan, cluster, mode="read-only", ask_scheduler=False)
    assert prepare(plan, cluster, retry_failed=True, ask_scheduler=False).arrays == []


def test_planned_arrays_skip_done_tasks(tmp_path):
    from moespec.launch.runner import execute_task

    plan = make_plan(load_experiment(sweep_config(tmp_path)))
    execute_task(plan.tasks_for("embed")[1])
    why, arrays = planned_arrays(plan, None)
    assert {key for key, reason in why.items() if reason == "done"} == {task_key(plan.tasks_for("embed")[1])}
    assert [(a.name, a.task_indices) for a in arrays] == [("embed.0", (0,)), ("reduce.0", (0, 1, 2, 3, 4, 5))]


def test_planning_a_large_sweep_is_cheap(tmp_path):
    config = tiny_experiment("big", n_per_domain=3, reduce={"n_components": 2, "mle_k": 5})
    config["root"] = str(tmp_path)
    config["sweep"] = {"grid": {"embed.pooling": ["mean", "cls"], "reduce.seed": list(range(250))}}
    started = time.perf_counter()
    plan = make_plan(load_experiment(config))
    _, arrays = planned_arrays(plan, load_profile("localhost"))
    elapsed = time.perf_counter() - started
    assert len(plan.tasks) == 502 and [len(a.tasks) for a in arrays] == [2, 500]
    assert elapsed < 20, f"planning 500 points took {elapsed:.1f} s"


def test_one_to_one_stages_wait_per_task_with_aftercorr(tmp_path):
    from moespec.launch.sbatch import ScriptContext, render_submit

    config = sweep_config(tmp_path)
    config["sweep"] = {"zip": {"embed.pooling": ["mean", "cls", "last"], "reduce.n_components": [2, 3, 4]}}
    plan = make_plan(load_experiment(config))
    resources = {s: Resources() for s in plan.stages()}
    embed_array, reduce_array = plan_arrays(plan, plan.tasks, resources=resources, max_array_size=1001)
    assert reduce_array.after_corresponding == (0,) and reduce_array.after == ()
    # reduce task i reads embed task i of the upstream array, position for position
    assert [t.inputs["embed"].uid for t in reduce_array.tasks] == [t.uid for t in embed_array.tasks]
    assert reduce_array.dependency(["11", "12"]) == "aftercorr:11"
    assert reduce_array.waits_for([embed_array, reduce_array]) == "aftercorr embed.0"
    context = ScriptContext(
        "sw", "c", Path("jobs/experiment.yaml"), Path("jobs"), "python -m moespec.cli", (), "cached"
    )
    submit_sh = render_submit([embed_array, reduce_array], context)
    assert 'submit reduce.0 --dependency="aftercorr:${job_embed_0}"' in submit_sh
    # a partial re-submission: embed task 1 is done, so reduce task 1 has nothing to correspond to
    embed_tasks, reduce_tasks = plan.tasks_for("embed"), plan.tasks_for("reduce")
    todo = [embed_tasks[0], embed_tasks[2], *reduce_tasks]
    embeds, reduces = plan_arrays(plan, todo, resources=resources, max_array_size=1001, done={task_key(embed_tasks[1])})
    assert embeds.task_indices == (0, 2) and reduces.after == (0,) and reduces.after_corresponding == ()
    assert reduces.dependency(["11", "12"]) == "afterok:11"
    # the two that do correspond, alone: aftercorr, ordered like their upstream array
    embeds, reduces = plan_arrays(
        plan,
        [embed_tasks[2], embed_tasks[0], reduce_tasks[2], reduce_tasks[0]],
        resources=resources,
        max_array_size=1001,
        done={task_key(embed_tasks[1])},
    )
    assert reduces.after_corresponding == (0,) and reduces.task_indices == (0, 2) == embeds.task_indices


def test_a_time_limit_within_the_signal_delay_is_refused(tmp_path, profile_file):
    config = sweep_config(
        tmp_path, resources={"embed": {"timeout_min": 1}, "reduce": {"timeout_min": 2, "slurm_signal_delay_s": 90}}
    )
    experiment = load_experiment(config)
    with pytest.raises(ConfigError) as error:
        check_resources(load_profile(str(profile_file)), experiment, ["embed", "reduce"])
    embed_problem, reduce_problem = error.value.problems
    assert "infra.resources.embed.timeout_min: 1 min leaves 0 s of work" in embed_problem
    assert embed_problem.endswith("set timeout_min >= 3")  # submitit's default delay: 90 s
    assert "2 min leaves 30 s" in reduce_problem
    assert reduce_problem.endswith("set timeout_min >= 3 or slurm_signal_delay_s <= 60")
