"""Plain sbatch scripts: rendering (golden files), emitting, and the array index -> task mapping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moespec.cli import main
from moespec.config import load_experiment
from moespec.errors import ConfigError
from moespec.launch.plan import make_plan
from moespec.launch.records import latest_entries, load_records
from moespec.launch.sbatch import render, render_array, render_submit
from tests.builders import assert_golden, golden_context, golden_submission, sweep_config


def test_render_fills_placeholders_and_refuses_unknown_ones():
    assert render("a {{x}}\n{{empty}}\nb {{ y }}\n", {"x": 1, "y": "z", "empty": ""}) == "a 1\nb z\n"
    with pytest.raises(ConfigError, match=r"no value for \{\{typo\}\}"):
        render("{{typo}}", {})


def test_array_scripts_match_golden_files(tmp_path):
    submission = golden_submission(tmp_path)
    context = golden_context(submission)
    names = [a.name for a in submission.arrays]
    assert names == ["embed.0", "reduce.0", "reduce.1"]
    for array in submission.arrays:
        assert_golden(f"{array.name}.sbatch", render_array(array, context))
    assert_golden("submit.sh", render_submit(submission.arrays, context))


def test_rendered_scripts_are_valid_bash(tmp_path):
    submission = golden_submission(tmp_path)
    context = golden_context(submission)
    for text in [render_array(a, context) for a in submission.arrays] + [render_submit(submission.arrays, context)]:
        script = tmp_path / "s.sh"
        script.write_text(text)
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, text


def test_emit_writes_scripts_config_and_record(tmp_path, capsys, monkeypatch):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(sweep_config("results")))
    out = tmp_path / "jobs" / "sw"
    monkeypatch.chdir(tmp_path)
    assert main(["submit", str(config), "--emit-sbatch", str(out), "--cluster", "localhost"]) == 0
    assert "submit them with: bash" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "experiment.yaml",
        "embed.0.sbatch",
        "reduce.0.sbatch",
        "submit.sh",
        "logs",
    }
    resolved = yaml.safe_load((out / "experiment.yaml").read_text())
    assert resolved["root"] == "results"  # relative to the project folder, where jobs start
    script = (out / "reduce.0.sbatch").read_text()
    assert "tasks=(0 1 2 3 4 5)" in script and '--task "${tasks[$SLURM_ARRAY_TASK_ID]}"' in script
    # nothing of this machine: the profile's Python, paths relative to the project folder
    assert ".venv/bin/python -m moespec.cli run reduce --config jobs/sw/experiment.yaml" in script
    assert "#SBATCH --output=jobs/sw/logs/reduce.0-%A_%a.out" in script and "--chdir" not in script
    submit_sh = (out / "submit.sh").read_text()
    assert str(tmp_path) not in script + submit_sh and sys.executable not in script
    assert 'cd "$here/"../.. ' in submit_sh and '--dependency="afterok:${job_embed_0}"' in submit_sh
    entries = latest_entries(load_records(tmp_path / "results", "sw"))
    assert len(entries) == 8 and all(e.job_id is None and e.executor == "sbatch" for e in entries.values())
    # status: scripts emitted, not submitted; once submit.sh has run, the job ids are known
    assert main(["status", str(config)]) == 0
    assert "8 not submitted" in capsys.readouterr().out
    (out / "job_ids.txt").write_text("embed.0 501\nreduce.0 502\n")
    entries = latest_entries(load_records(tmp_path / "results", "sw"))
    assert {e.job_id for e in entries.values() if e.key[0] == "embed"} == {"501_0", "501_1"}
    # submitted scripts are not overwritten, and submit.sh refuses to run twice
    assert main(["submit", str(config), "--emit-sbatch", str(out), "--cluster", "localhost"]) == 1
    assert "already submitted" in capsys.readouterr().err
    second = subprocess.run(["bash", str(out / "submit.sh")], capture_output=True, text=True)
    assert second.returncode == 1 and "submitted already" in second.stderr


def test_emit_needs_the_clusters_python(tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(sweep_config(tmp_path / "results")))
    profile = tmp_path / "nopython.yaml"
    profile.write_text("partition: debug\n")
    assert main(["submit", str(config), "--emit-sbatch", str(tmp_path / "jobs"), "--cluster", str(profile)]) == 1
    assert f"{profile}: python: not set" in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()


def test_array_task_runs_the_task_its_index_names(tmp_path, monkeypatch):
    """An emitted array script, run by bash as Slurm would: array task i runs the task at position i of its list."""
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(sweep_config("results")))
    profile = tmp_path / "small.yaml"
    profile.write_text(f"max_array_size: 1\npython: {sys.executable}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["submit", str(config), "--emit-sbatch", "jobs", "--cluster", str(profile)]) == 0
    script = (tmp_path / "jobs" / "embed.1.sbatch").read_text()
    assert "#SBATCH --array=0%1" in script and "tasks=(1)" in script
    env = {
        **os.environ,
        "SLURM_ARRAY_TASK_ID": "0",
        "SLURM_ARRAY_JOB_ID": "7",
        "SLURM_CPUS_PER_TASK": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"),
    }
    run = subprocess.run(["bash", "jobs/embed.1.sbatch"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    plan = make_plan(load_experiment(config))
    assert plan.tasks_for("embed")[1].is_done() and not plan.tasks_for("embed")[0].is_done()
