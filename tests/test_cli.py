"""The command line, end to end in this process (``main(argv)``) and once as a real console script."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from moespec.cli import main
from tests.builders import tiny_experiment


def _config(tmp_path, data=None):
    path = tmp_path / "exp.yaml"
    data = data or {**tiny_experiment(n_per_domain=2), "root": str(tmp_path / "results")}
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_ok_and_invalid(tmp_path, capsys):
    good = _config(tmp_path)
    assert main(["validate", str(good)]) == 0
    assert "ok (1 sweep point, 1 task: embed 1; data files and models found)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(f"""
        experiment: t
        root: {tmp_path / "never"}
        embed: {{model: {{name: builtin:tiny-bert}}, data: [], batch_size: 0, typo: 1}}
    """)
    )
    assert main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: INVALID" in err
    assert f"{bad}: embed.batch_size:" in err and f"{bad}: embed.typo: unknown key" in err
    assert main(["submit", str(bad)]) == 1  # nothing runs and nothing is written
    assert not (tmp_path / "never").exists()


def test_plan_run_status(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "to run" in out and "embed: 1 task [indices 0]" in out
    assert main(["run", "embed", "--config", str(path), "--task", "5"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["run", "embed", "--config", str(path), "--task", "0"]) == 0
    assert main(["status", str(path)]) == 0
    assert "done" in capsys.readouterr().out
    assert main(["plan", str(path)]) == 0
    assert "embed: 0 tasks (all done)" in capsys.readouterr().out


def test_console_script_submit(tmp_path):
    path = _config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "moespec.cli", "submit", str(path), "--executor", "inline"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "1 ran" in result.stdout and f"results: {tmp_path / 'results' / 't'}" in result.stdout


# --------------------------------------------------------------------------------------------------
# issue #17


def test_validate_checks_the_files_and_models_a_config_names(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "notes.jsonl").write_text('{"text": "a note"}\n')
    data = tiny_experiment(n_per_domain=2)
    data["embed"]["data"] += [
        {"kind": "files", "paths": ["missing.jsonl"], "domain": "m"},
        {"kind": "files", "paths": ["empty.jsonl"]},
        {"kind": "files", "paths": ["notes.jsonl"], "text_field": "body"},
    ]
    data["embed"]["model"] = {"name": "someone/uncached-model"}
    path = _config(tmp_path, {**data, "root": str(tmp_path / "results")})
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: INVALID (4 problems)" in err
    assert f"{path}: embed.data[1].paths[0]: {tmp_path / 'missing.jsonl'}: file not found" in err
    assert f"{path}: embed.data[2].paths[0]: {tmp_path / 'empty.jsonl'}: the file is empty" in err
    assert f"embed.data[3].paths[0]: {tmp_path / 'notes.jsonl'} line 1: no field(s) ['body'] in the first record" in err
    model_line = next(line for line in err.splitlines() if "embed.model.name:" in line)
    assert "'someone/uncached-model' is not in the cache" in model_line and "hpc/README.md" in model_line
    assert model_line.count("HF_HUB_OFFLINE") == 1  # it is set here: the fix is to fetch, not to set it
    assert main(["validate", "--schema-only", str(path)]) == 0
    assert main(["submit", str(path), "--executor", "inline"]) == 1  # refused before anything runs
    assert not (tmp_path / "results").exists()


def _readme_example() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Writing an experiment", 1)[1]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_validates_as_written(tmp_path, capsys, monkeypatch):
    """With the files it names beside it and the hub model and dataset in the cache, as a user would have them."""
    text = _readme_example()
    config = yaml.safe_load(text)
    folder = tmp_path / "study"
    (folder / "data").mkdir(parents=True)
    path = folder / "my-study.yaml"
    path.write_text(text)
    (folder / "data" / "notes.jsonl").write_text("".join(f'{{"body": "note {i}"}}\n' for i in range(3)))
    (folder / "data" / "forum.csv").write_text("post,board,tag\nhello,cooking,question\n")
    hf = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf))
    model = config["embed"]["model"]["name"]
    snapshot = hf / "hub" / ("models--" + model.replace("/", "--")) / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (hf / "hub" / ("models--" + model.replace("/", "--")) / "refs").mkdir()
    (hf / "hub" / ("models--" + model.replace("/", "--")) / "refs" / "main").write_text("0" * 40)
    for source in config["embed"]["data"]:
        if source["kind"] == "hf":
            (hf / "datasets" / source["name"].replace("/", "___")).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert "data files and models found" in capsys.readouterr().out
    (folder / "data" / "notes.jsonl").unlink()
    assert main(["validate", str(path)]) == 1
    assert f"{folder / 'data' / 'notes.jsonl'}: file not found" in capsys.readouterr().err


def test_plan_into_a_closed_pipe_prints_no_traceback(tmp_path):
    path = _config(tmp_path)
    result = subprocess.run(
        f"{sys.executable} -m moespec.cli plan {path} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.startswith("experiment t: 1 sweep point, 1 unique task")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_help_is_for_users_and_every_argument_has_help(capsys):
    import argparse

    from moespec.cli import build_parser

    parser = build_parser()
    text = parser.format_help()
    assert "thin shims" not in text and "typical session:" in text
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("validate", "plan", "status", "submit", "run", "report", "compare"):
        for action in sub.choices[name]._actions:
            assert action.help, f"moespec {name}: {action.dest} has no help text"


def test_a_stages_submit_keeps_the_other_tasks_in_the_experiment_summary(tmp_path, capsys):
    path = _config(
        tmp_path,
        {
            **tiny_experiment(n_per_domain=3),
            "reduce": {"n_components": 4, "mle_k": 5},
            "root": str(tmp_path / "results"),
        },
    )
    assert main(["submit", str(path), "--executor", "inline"]) == 0
    summary = tmp_path / "results" / "t" / "summary.json"
    first = json.loads(summary.read_text())["tasks"]
    assert [t["stage"] for t in first] == ["embed", "reduce"]
    assert main(["submit", str(path), "--executor", "inline", "--stages", "reduce", "--mode", "force"]) == 0
    second = json.loads(summary.read_text())["tasks"]
    assert [(t["stage"], t["status"]) for t in second] == [("embed", "ran"), ("reduce", "ran")]
    assert second[0] == first[0]
    out = capsys.readouterr().out
    assert "1 ran" in out and all(len(line) <= 120 for line in out.splitlines() if str(tmp_path) not in line)


def test_a_cached_run_prints_what_the_first_run_printed(tmp_path, capsys):
    path = _config(
        tmp_path,
        {
            **tiny_experiment(n_per_domain=3),
            "reduce": {"n_components": 4, "mle_k": 5},
            "root": str(tmp_path / "results"),
        },
    )
    assert main(["submit", str(path), "--executor", "inline"]) == 0
    first = capsys.readouterr().out
    assert main(["submit", str(path), "--executor", "inline"]) == 0
    second = capsys.readouterr().out
    headlines = [line for line in first.splitlines() if line.startswith(("  embed ", "  reduce "))]
    assert len(headlines) == 2 and first.replace("2 ran", "2 cached") == second
