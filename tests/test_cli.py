"""The command line, end to end in this process (``main(argv)``) and once as a real console script."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import yaml

from moespec.cli import main
from tests.conftest import tiny_experiment


def _config(tmp_path, data=None):
    path = tmp_path / "exp.yaml"
    data = data or {**tiny_experiment(n_per_domain=2), "root": str(tmp_path / "results")}
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_ok_and_invalid(tmp_path, capsys):
    good = _config(tmp_path)
    assert main(["validate", str(good)]) == 0
    assert "ok (1 sweep point, 1 tasks: embed 1)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent(f"""
        experiment: t
        root: {tmp_path / 'never'}
        embed: {{model: {{name: builtin:tiny-bert}}, data: [], batch_size: 0, typo: 1}}
    """))
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
    assert "to run" in out and "embed: 1 task(s) [indices 0]" in out
    assert main(["run", "embed", "--config", str(path), "--task", "5"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["run", "embed", "--config", str(path), "--task", "0"]) == 0
    assert main(["status", str(path)]) == 0
    assert "done" in capsys.readouterr().out
    assert main(["plan", str(path)]) == 0
    assert "embed: 0 task(s) (all done)" in capsys.readouterr().out


def test_console_script_submit(tmp_path):
    path = _config(tmp_path)
    result = subprocess.run([sys.executable, "-m", "moespec.cli", "submit", str(path), "--executor", "inline"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "1 ran" in result.stdout and f"results: {tmp_path / 'results' / 't'}" in result.stdout
