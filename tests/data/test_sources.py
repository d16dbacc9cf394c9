"""Text sources: local jsonl/csv/parquet files and HF datasets, seeded sampling, clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from moespec.data import BuiltinSource, FilesSource, HFSource, Source, concat, load_texts, shard_bounds
from moespec.data.sources import texts_from_dataset
from moespec.errors import DataError

ROWS = [{"text": f"review number {i} " + "word " * (i % 7), "stars": ["bad", "good", "ok"][i % 3], "id": i}
        for i in range(100)]


def _write(tmp_path, fmt, rows=ROWS, name="reviews"):
    import pandas as pd

    frame = pd.DataFrame(rows)
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    else:
        frame.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_local_files_of_every_format(tmp_path, fmt):
    texts = FilesSource(paths=[_write(tmp_path, fmt)], text_field="text", label_field="stars").load()
    assert len(texts) == 100 and texts.texts[3] == ROWS[3]["text"]
    assert texts.domain_names == ["reviews"]  # default domain: the file name
    assert texts.text_id[:2] == ["reviews/0", "reviews/1"]
    assert texts.label_names == ["reviews/bad", "reviews/good", "reviews/ok"]
    assert texts.label[:4].tolist() == [0, 1, 2, 0]
    assert texts.sources[0]["format"] == {"tsv": "csv"}.get(fmt, fmt)


def test_seeded_sample_is_random_not_a_head_slice(tmp_path):
    path = _write(tmp_path, "jsonl")
    draw = FilesSource(paths=[path], n=10, seed=1).load()
    rows = [int(i.split("/")[1]) for i in draw.text_id]
    assert rows == sorted(rows) and rows != list(range(10))
    assert draw.texts == [ROWS[r]["text"] for r in rows]
    assert FilesSource(paths=[path], n=10, seed=1).load().text_id == draw.text_id
    assert FilesSource(paths=[path], n=10, seed=2).load().text_id != draw.text_id


def test_several_text_fields_are_joined(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}"} for i in range(3)]
    path = _write(tmp_path, "jsonl", rows, "nli")
    texts = FilesSource(paths=[path], text_field=["premise", "hypothesis"], separator=" || ").load()
    assert texts.texts == ["p0 || h0", "p1 || h1", "p2 || h2"]


def test_empty_texts_are_skipped_and_logged_and_n_must_be_available(tmp_path, caplog):
    rows = [{"text": t} for t in ["a", "", "b", "   ", None, "c"]]
    path = _write(tmp_path, "jsonl", rows, "sparse")
    texts = FilesSource(paths=[path]).load()
    assert texts.texts == ["a", "b", "c"] and texts.text_id == ["sparse/0", "sparse/2", "sparse/5"]
    assert "skipped 3 empty text(s)" in caplog.text
    assert len(FilesSource(paths=[path], n=3, seed=5).load()) == 3
    with pytest.raises(DataError, match=r"asks for n=4 texts but the dataset has only 3 non-empty"):
        FilesSource(paths=[path], n=4).load()


def test_missing_fields_and_empty_data_are_data_errors_naming_source_and_field(tmp_path):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(DataError, match=r"files:.*reviews\.jsonl: text field 'body' not found; the columns are"):
        FilesSource(paths=[path], text_field="body").load()
    with pytest.raises(DataError, match=r"label field 'rating' not found"):
        FilesSource(paths=[path], label_field="rating").load()
    with pytest.raises(DataError, match=r"text field 'id' holds .*int64.*, not strings"):
        FilesSource(paths=[path], text_field="id").load()
    empty = tmp_path / "empty.parquet"
    import pandas as pd

    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(empty)
    with pytest.raises(DataError, match="empty"):
        FilesSource(paths=[str(empty)]).load()
    with pytest.raises(DataError, match="file\\(s\\) not found"):
        FilesSource(paths=[str(tmp_path / "gone.jsonl")]).load()


def test_float_labels_are_refused(tmp_path):
    path = _write(tmp_path, "jsonl", [{"text": "x", "score": 0.5}, {"text": "y", "score": 1.5}], "sts")
    with pytest.raises(DataError, match="label field 'score' holds .*float.*expected class labels"):
        FilesSource(paths=[path], label_field="score").load()


def _labelled_dataset():
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    return datasets.Dataset.from_dict({"sentence": ["bad", "good", "fine", "meh"], "label": [0, 1, -1, 0]},
                                      features=features)


def test_classlabel_names_and_unlabelled_rows():
    texts = texts_from_dataset(_labelled_dataset(), where="test", domain="sst", text_fields=["sentence"],
                               separator="\n", label_field="label", n=None, seed=0, provenance={})
    assert texts.label_names == ["sst/negative", "sst/positive"]
    assert texts.label.tolist() == [0, 1, -1, 0]


def test_hf_source_reads_a_local_dataset_folder_without_network(tmp_path):
    folder = tmp_path / "my_dataset"
    (folder / "data").mkdir(parents=True)
    _labelled_dataset().to_parquet(str(folder / "data" / "train-00000.parquet"))
    texts = HFSource(name=str(folder), split="train", text_field="sentence", label_field="label",
                     domain="sst", n=3, seed=0).load()
    assert len(texts) == 3 and texts.label_names == ["sst/negative", "sst/positive"]
    assert texts.sources[0]["kind"] == "hf" and texts.sources[0]["fingerprint"]


def test_unknown_hf_dataset_is_a_data_error_naming_it():
    with pytest.raises(DataError, match=r"source hf:nobody/no-such-dataset \(split train\): cannot load dataset"):
        HFSource(name="nobody/no-such-dataset").load()


def test_labels_of_different_sources_never_share_codes(tmp_path):
    a = _write(tmp_path, "jsonl", [{"text": "x", "y": "pos"}, {"text": "z", "y": "neg"}], "a")
    b = _write(tmp_path, "csv", [{"text": "u", "y": "pos"}, {"text": "v", "y": "neg"}], "b")
    texts = load_texts([FilesSource(paths=[a], label_field="y"), FilesSource(paths=[b], label_field="y"),
                        BuiltinSource(n_per_domain=1, domains=["news"])])
    assert texts.domain_names == ["a", "b", "news"] and texts.domain.tolist() == [0, 0, 1, 1, 2]
    assert texts.label_names[:4] == ["a/neg", "a/pos", "b/neg", "b/pos"]
    assert texts.label[:4].tolist() == [1, 0, 3, 2]
    with pytest.raises(DataError, match="come from more than one source"):
        concat([texts, texts])


def test_source_configs_are_a_tagged_union_and_validate_paths():
    adapter = TypeAdapter(Source)
    assert isinstance(adapter.validate_python({"kind": "hf", "name": "imdb"}), HFSource)
    assert adapter.validate_python({"kind": "files", "paths": "/d/x.jsonl.gz"}).resolved_format() == "jsonl"
    assert adapter.validate_python({"kind": "files", "paths": ["$SCRATCH/x.csv"]}).domain_name() == "x"
    relative = {"kind": "files", "paths": ["data/x.jsonl", "../y.jsonl"]}
    assert adapter.validate_python(relative, context={"config_dir": "/exp/configs"}).paths == [
        "/exp/configs/data/x.jsonl", "/exp/y.jsonl"]
    assert adapter.validate_python(relative).paths[0] == os.path.join(os.getcwd(), "data", "x.jsonl")
    with pytest.raises(ValidationError, match="mix formats"):
        adapter.validate_python({"kind": "files", "paths": ["/a.csv", "/b.parquet"]})
    with pytest.raises(ValidationError, match="cannot tell the format"):
        adapter.validate_python({"kind": "files", "paths": ["/a.txt"]})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        adapter.validate_python({"kind": "builtin", "n": 3})


def test_shard_bounds_are_contiguous_and_balanced():
    for n, shards in [(10, 3), (7, 7), (100, 6)]:
        bounds = [shard_bounds(n, i, shards) for i in range(shards)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [stop - start for start, stop in bounds]
        assert max(sizes) - min(sizes) <= 1
    assert np.array_equal(shard_bounds(2, 2, 3), (2, 2))  # more shards than rows: an empty slice
