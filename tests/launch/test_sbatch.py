"""Plain sbatch scripts: rendering (golden files), emitting, and the array index -> task mapping."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from moespec.cli import main
from moespec.config import load_experiment
from moespec.errors import ConfigError
from moespec.launch.plan import make_plan
from moespec.launch.profiles import load_profile
from moespec.launch.records import latest_entries, load_records
from moespec.launch.sbatch import ScriptContext, render, render_array, render_submit
from moespec.launch.slurm import Submission, prepare
from tests.launch.test_slurm_plan import sweep_experiment

GOLDEN = Path(__file__).parent / "golden"


def assert_golden(name: str, text: str) -> None:
    """Compare with ``golden/<name>``; ``MOESPEC_UPDATE_GOLDEN=1`` rewrites it (review the diff)."""
    path = GOLDEN / name
    if os.environ.get("MOESPEC_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with MOESPEC_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from {path} (MOESPEC_UPDATE_GOLDEN=1 to accept)"


def golden_profile(tmp_path: Path) -> Path:
    path = tmp_path / "gold.yaml"
    path.write_text(yaml.safe_dump({
        "partition": "gpu", "account": "proj", "max_array_size": 4, "array_parallelism": 3, "gpus_per_node": 4,
        "python": "python", "setup": ["module load python/3.11", "source $WORK/venv/bin/activate"],
        "defaults": {"timeout_min": 30, "mem_gb": 8},
        "stages": {"embed": {"gpus_per_node": 1, "slurm_additional_parameters": {"mail-type": "FAIL"}},
                   "reduce": {"cpus_per_task": 4, "mem_gb": 1.5, "slurm_qos": "short", "slurm_signal_delay_s": 120}},
    }))
    return path


def golden_submission(tmp_path: Path) -> Submission:
    experiment = load_experiment(sweep_experiment("/scratch/me/results"))
    submission = prepare(make_plan(experiment), load_profile(str(golden_profile(tmp_path))), ask_scheduler=False)
    submission.id = "20250101-120000-abcdef"
    return submission


def golden_context(submission: Submission) -> ScriptContext:
    return ScriptContext("sw", "gold", Path("/scratch/me/jobs/experiment.yaml"), Path("/scratch/me/jobs"),
                         Path("/home/me/project"), "python -m moespec.cli",
                         tuple(submission.cluster.profile.setup), "cached")


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
    config.write_text(yaml.safe_dump(sweep_experiment("results")))
    out = tmp_path / "jobs"
    monkeypatch.chdir(tmp_path)
    assert main(["submit", str(config), "--emit-sbatch", str(out), "--cluster", "localhost"]) == 0
    assert "submit them with: bash" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"experiment.yaml", "embed.0.sbatch", "reduce.0.sbatch", "submit.sh", "logs"}
    resolved = yaml.safe_load((out / "experiment.yaml").read_text())
    assert resolved["root"] == str(tmp_path / "results")  # made absolute
    assert "--task $((SLURM_ARRAY_TASK_ID + 0))" in (out / "reduce.0.sbatch").read_text()
    assert '--dependency="afterok:${job_embed_0}"' in (out / "submit.sh").read_text()
    entries = latest_entries(load_records(tmp_path / "results", "sw"))
    assert len(entries) == 8 and all(e.job_id is None and e.executor == "sbatch" for e in entries.values())
    # status: scripts emitted, not submitted; once submit.sh has run, the job ids are known
    assert main(["status", str(config)]) == 0
    assert "8 not submitted" in capsys.readouterr().out
    (out / "job_ids.txt").write_text("embed.0 501\nreduce.0 502\n")
    entries = latest_entries(load_records(tmp_path / "results", "sw"))
    assert {e.job_id for e in entries.values() if e.key[0] == "embed"} == {"501_0", "501_1"}


def test_array_task_runs_the_task_its_index_names(tmp_path, monkeypatch):
    """What an emitted array task runs: chunk offset + SLURM_ARRAY_TASK_ID = index in plan.tasks_for."""
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(sweep_experiment(tmp_path / "results")))
    profile = tmp_path / "small.yaml"
    profile.write_text("max_array_size: 1\n")
    out = tmp_path / "jobs"
    assert main(["submit", str(config), "--emit-sbatch", str(out), "--cluster", str(profile)]) == 0
    script = (out / "embed.1.sbatch").read_text()
    assert "#SBATCH --array=0%1" in script and "--task $((SLURM_ARRAY_TASK_ID + 1))" in script
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # what `--task $((0 + 1))` resolves to
    assert main(["run", "embed", "--config", str(out / "experiment.yaml")]) == 0
    plan = make_plan(load_experiment(config))
    assert plan.tasks_for("embed")[1].is_done() and not plan.tasks_for("embed")[0].is_done()
