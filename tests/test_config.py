"""Config loading: all problems at once with file and dotted key, sweeps, uids."""

from __future__ import annotations

import textwrap

import pytest

from moespec.config import load_experiment
from moespec.errors import ConfigError
from moespec.launch.plan import make_plan


def _write(tmp_path, text: str, name: str = "exp.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


BASE = {
    "experiment": "t",
    "root": "results",
    "embed": {"model": {"name": "builtin:tiny-bert"}, "data": [{"kind": "builtin", "n_per_domain": 5}]},
}


def test_every_problem_is_reported_at_once_with_file_and_key(tmp_path):
    path = _write(tmp_path, """
        experiment: t
        colour: blue
        embed:
          model: {name: builtin:tiny-bert, flavour: x}
          data: [{kind: builtin, n_per_domain: 5}]
          batch_size: lots
          pooling: median
        infra: {executor: cloud}
    """)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    problems = info.value.problems
    text = "\n".join(problems)
    assert len(problems) >= 5, text
    assert all(p.startswith(str(path)) for p in problems)
    assert f"{path}: colour: unknown key (allowed: " in text
    assert "embed.model.flavour: unknown key" in text
    assert "embed.batch_size:" in text and "'lots'" in text
    assert "embed.pooling:" in text and "'median'" in text
    assert "infra.executor:" in text and "'cloud'" in text


def test_missing_required_key_and_list_index_in_key(tmp_path):
    path = _write(tmp_path, """
        embed:
          data: [{kind: builtin, n_per_domain: 5}, {kind: hf, split: train}]
    """)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    text = "\n".join(info.value.problems)
    assert f"{path}: experiment: required key is missing" in text
    assert "embed.data[1].name: required key is missing" in text


def test_yaml_syntax_error_names_line(tmp_path):
    path = _write(tmp_path, "experiment: t\nembed: [unclosed\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: line \d+, column \d+: invalid YAML"):
        load_experiment(path)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read file"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_experiment(_write(tmp_path, ""))


def test_grid_is_a_cartesian_product_and_zip_pairs(tmp_path):
    cfg = {**BASE, "sweep": {"grid": {"embed.pooling": ["mean", "cls"], "embed.max_length": [32, 64, 128]},
                             "zip": {"embed.batch_size": [8, 16], "embed.data": [
                                 [{"kind": "builtin", "n_per_domain": 5}], [{"kind": "builtin", "n_per_domain": 6}]]}}}
    experiment = load_experiment(cfg, root=tmp_path)
    assert len(experiment.points) == 2 * 3 * 2
    pairs = {(p["embed.batch_size"], p["embed.data"][0]["n_per_domain"]) for p in experiment.points}
    assert pairs == {(8, 5), (16, 6)}
    assert {c.embed.pooling for c in experiment.configs} == {"mean", "cls"}
    assert len(make_plan(experiment).tasks) == 12


def test_zip_length_mismatch_and_bad_keys_are_config_errors(tmp_path):
    cfg = {**BASE, "sweep": {"zip": {"embed.batch_size": [8, 16], "embed.max_length": [32]},
                             "grid": {"infra.mode": ["force"], "embed.pooling": []}}}
    with pytest.raises(ConfigError) as info:
        load_experiment(cfg)
    text = "\n".join(info.value.problems)
    assert "sweep.zip: lists must have equal lengths" in text
    assert "sweep.grid.infra.mode: a sweep key must start with a stage section" in text
    assert "sweep.grid.embed.pooling: must list at least one value" in text


def test_invalid_sweep_value_names_the_point(tmp_path):
    cfg = {**BASE, "sweep": {"grid": {"embed.batch_size": [8, 0, -1]}}}
    with pytest.raises(ConfigError) as info:
        load_experiment(cfg)
    text = "\n".join(info.value.problems)
    assert "embed.batch_size:" in text and "sweep point" in text and "embed.batch_size=0" in text


def test_uid_is_content_addressed(tmp_path):
    plan_a = make_plan(load_experiment(BASE, root=tmp_path))
    explicit = {**BASE, "embed": {**BASE["embed"], "pooling": plan_a.tasks[0].config.pooling},
                "infra": {"local": {"max_parallel": 2}}}
    plan_b = make_plan(load_experiment(explicit, root=tmp_path))
    assert plan_a.tasks[0].uid == plan_b.tasks[0].uid  # defaults resolved; infra not hashed
    other = {**BASE, "embed": {**BASE["embed"], "max_length": 17}}
    assert make_plan(load_experiment(other, root=tmp_path)).tasks[0].uid != plan_a.tasks[0].uid


def test_identical_sweep_points_share_one_task(tmp_path):
    cfg = {**BASE, "sweep": {"grid": {"embed.pooling": ["mean", "mean"]}}}
    plan = make_plan(load_experiment(cfg, root=tmp_path))
    assert len(plan.tasks) == 1 and plan.tasks[0].points == (0, 1)


def test_relative_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment = load_experiment(BASE)
    assert experiment.root == tmp_path / "results"
    assert experiment.root.is_absolute()


def test_unknown_key_in_a_tagged_union_lists_the_keys_of_the_chosen_member(tmp_path):
    cfg = {**BASE, "embed": {**BASE["embed"], "data": [{"kind": "hf", "name": "x", "zzz": 2}]}}
    with pytest.raises(ConfigError) as info:
        load_experiment(cfg)
    (problem,) = info.value.problems
    assert "embed.data[0].zzz: unknown key (allowed: " in problem
    assert "text_field" in problem and "n_per_domain" not in problem
