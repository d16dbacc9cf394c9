"""Config loading: all problems at once with file and dotted key, sweeps, uids."""

from __future__ import annotations

import textwrap

import pytest
import yaml

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
    path = _write(
        tmp_path,
        """
        experiment: t
        colour: blue
        embed:
          model: {name: builtin:tiny-bert, flavour: x}
          data: [{kind: builtin, n_per_domain: 5}]
          batch_size: lots
          pooling: median
        infra: {executor: cloud}
    """,
    )
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
    path = _write(
        tmp_path,
        """
        embed:
          data: [{kind: builtin, n_per_domain: 5}, {kind: hf, split: train}]
    """,
    )
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
    cfg = {
        **BASE,
        "sweep": {
            "grid": {"embed.pooling": ["mean", "cls"], "embed.max_length": [32, 64, 128]},
            "zip": {
                "embed.batch_size": [8, 16],
                "embed.data": [[{"kind": "builtin", "n_per_domain": 5}], [{"kind": "builtin", "n_per_domain": 6}]],
            },
        },
    }
    experiment = load_experiment(cfg, root=tmp_path)
    assert len(experiment.points) == 2 * 3 * 2
    pairs = {(p["embed.batch_size"], p["embed.data"][0]["n_per_domain"]) for p in experiment.points}
    assert pairs == {(8, 5), (16, 6)}
    assert {c.embed.pooling for c in experiment.configs} == {"mean", "cls"}
    assert len(make_plan(experiment).tasks) == 12


def test_zip_length_mismatch_and_bad_keys_are_config_errors(tmp_path):
    cfg = {
        **BASE,
        "sweep": {
            "zip": {"embed.batch_size": [8, 16], "embed.max_length": [32]},
            "grid": {"infra.mode": ["force"], "embed.pooling": []},
        },
    }
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
    explicit = {
        **BASE,
        "embed": {**BASE["embed"], "pooling": plan_a.tasks[0].config.pooling},
        "infra": {"local": {"max_parallel": 2}},
    }
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


# --------------------------------------------------------------------------------------------------
# issue #17: strict types, every problem at once, messages that name keys and choices


def _problems(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_experiment(data)
    return info.value.problems


def test_a_boolean_is_not_an_integer_and_a_string_is_not_a_number():
    problems = _problems({**BASE, "reduce": {"n_components": "16"}, "train": {"input": "embed", "epochs": True}})
    assert "<dict>: train.epochs: Input should be a valid integer, got true" in problems
    assert any(
        p.startswith("<dict>: reduce.n_components:") and "'16'" in p and "without quotes" in p for p in problems
    ), problems
    # what JSON needs stays accepted: an integer for a float, a list for a tuple
    fiber = {"input": "embed", "vol_max": 60, "window": 10, "strata": {"method": "kmeans", "k_range": [2, 4]}}
    experiment = load_experiment({**BASE, "reduce": {"n_components": 4, "id_threshold": 1}, "fiber": fiber})
    assert experiment.base.reduce.intrinsic_dimension.threshold == 1.0 and experiment.base.fiber.strata.k_range == [
        2,
        4,
    ]


def test_sweep_problems_do_not_hide_the_other_problems():
    problems = _problems(
        {
            **BASE,
            "embed": {**BASE["embed"], "batch_size": 0},
            "sweep": {"grid": {"colour.hue": [1, 2], "embed.pooling": ["mean"]}},
        }
    )
    text = "\n".join(problems)
    assert "embed.batch_size: Input should be greater than or equal to 1, got 0" in text
    assert "sweep.grid.colour.hue: a sweep key must start with a stage section" in text


def test_a_bad_sweep_value_is_reported_beside_the_base_problems_once():
    problems = _problems(
        {**BASE, "embed": {**BASE["embed"], "batch_size": 0}, "sweep": {"grid": {"embed.pooling": ["mean", "median"]}}}
    )
    assert sum("embed.batch_size" in p for p in problems) == 1, problems
    assert any(
        "embed.pooling: Input should be 'mean', 'cls' or 'last', got 'median' (sweep point 1;" in p for p in problems
    ), problems


def test_sweeping_inside_a_union_without_kind_names_the_kinds():
    problems = _problems({**BASE, "train": {"input": "embed"}, "sweep": {"grid": {"train.model.n_experts": [2, 4]}}})
    assert len(problems) == 1 and "Unable to extract tag" not in problems[0]
    assert "train.model: 'kind' is missing: set train.model.kind (one of dictionary, topk)" in problems[0]


def test_sweeping_a_stage_the_file_does_not_run_is_refused():
    problems = _problems({**BASE, "sweep": {"grid": {"fiber.window": [5, 10]}}})
    assert problems == [
        "<dict>: sweep.grid.fiber.window: the experiment has no fiber section; add 'fiber:' to "
        "the file to run that stage, or remove this sweep key"
    ]


def test_unknown_resource_key_lists_the_allowed_keys():
    problems = _problems({**BASE, "infra": {"resources": {"embed": {"timeout_mins": 5}}}})
    assert problems[0].startswith("<dict>: infra.resources.embed.timeout_mins: unknown key (allowed: ")
    assert problems[0].endswith(" timeout_min)")


def test_a_section_that_is_not_a_mapping_names_its_keys():
    problems = _problems({**BASE, "reduce": 5})
    assert problems[0].startswith("<dict>: reduce: must be a mapping of settings (keys: ")
    assert "n_components" in problems[0] and problems[0].endswith("got 5")
    assert "instance of" not in problems[0] and "Input should be an object" not in problems[0]


def test_fiber_parameter_problems_come_one_per_line_with_their_keys():
    problems = _problems({**BASE, "fiber": {"input": "embed", "vol_max": 0, "alpha": 2}})
    assert problems == [
        "<dict>: fiber.vol_max: must exceed vol_min (10), got 0",
        "<dict>: fiber.alpha: must be in (0, 1), got 2.0",
    ]


def test_the_value_is_named_once():
    from pydantic import BaseModel, ValidationError, field_validator

    from moespec.config import format_validation_error

    class Section(BaseModel):
        paths: list[str]

        @field_validator("paths")
        @classmethod
        def _check(cls, value):
            raise ValueError(f"paths must be absolute, got {value}")

    with pytest.raises(ValidationError) as info:
        Section(paths=["a"])
    lines = format_validation_error(info.value, {"paths": ["a"]}, "x.yaml", Section)
    assert lines == ["x.yaml: paths: paths must be absolute, got ['a']"]


def test_relative_files_paths_are_taken_from_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = _write(
        folder,
        """
        experiment: t
        embed:
          model: {name: ./models/mine}
          data: [{kind: files, paths: [data/notes.jsonl, ../shared.jsonl]}]
    """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    embed = load_experiment(path).base.embed
    assert embed.data[0].paths == [str(folder / "data" / "notes.jsonl"), str(tmp_path / "shared.jsonl")]
    assert embed.model.name == str(folder / "models" / "mine")


def test_relative_paths_in_sweep_values_and_copies_elsewhere_keep_their_meaning(tmp_path):
    from moespec.config import read_yaml, resolve_relative_paths

    folder = tmp_path / "configs"
    folder.mkdir()
    path = _write(
        folder,
        """
        experiment: t
        embed:
          data: [{kind: builtin, n_per_domain: 2}]
        sweep:
          grid:
            embed.data: [[{kind: files, paths: a.jsonl}], [{kind: files, paths: [$SCRATCH/b.jsonl]}]]
    """,
    )
    experiment = load_experiment(path)
    assert [c.embed.data[0].paths for c in experiment.configs] == [[str(folder / "a.jsonl")], ["$SCRATCH/b.jsonl"]]
    copy = tmp_path / "elsewhere" / "experiment.yaml"  # what --emit-sbatch writes
    copy.parent.mkdir()
    copy.write_text(yaml.safe_dump(resolve_relative_paths(read_yaml(path), folder)))
    assert [c.embed.data[0].paths for c in load_experiment(copy).configs] == [
        [str(folder / "a.jsonl")],
        ["$SCRATCH/b.jsonl"],
    ]


def test_sweep_points_are_described_as_yaml():
    from moespec.launch.plan import describe_point

    experiment = load_experiment(
        {
            **BASE,
            "reduce": {"n_components": 4},
            "train": {},
            "sweep": {"grid": {"train.model": [{"kind": "topk", "target": "label"}]}},
        }
    )
    assert describe_point(experiment, (0,)) == "#0 model={kind: topk, target: label}"
