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

ROWS = [
    {"text": f"review number {i} " + "word " * (i % 7), "stars": ["bad", "good", "ok"][i % 3], "id": i}
    for i in range(100)
]


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
    with pytest.raises(
        DataError,
        match=r"reviews\.jsonl line 1: no field\(s\) \['body'\] in the first record; "
        r"its fields are \['text', 'stars', 'id'\]",
    ):
        FilesSource(paths=[path], text_field="body").load()
    with pytest.raises(DataError, match=r"reviews\.csv line 1: no field\(s\) \['rating'\] in the header"):
        FilesSource(paths=[_write(tmp_path, "csv")], label_field="rating").load()
    with pytest.raises(DataError, match=r"reviews\.parquet: no column\(s\) \['rating'\]"):
        FilesSource(paths=[_write(tmp_path, "parquet")], label_field="rating").load()
    with pytest.raises(DataError, match=r"text field 'id' holds .*int64.*, not strings"):
        FilesSource(paths=[path], text_field="id").load()
    empty = tmp_path / "empty.parquet"
    import pandas as pd

    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(empty)
    with pytest.raises(DataError, match="empty.parquet: has no rows"):
        FilesSource(paths=[str(empty)]).load()
    with pytest.raises(DataError, match="gone.jsonl: file not found"):
        FilesSource(paths=[str(tmp_path / "gone.jsonl")]).load()


def test_float_labels_are_refused(tmp_path):
    path = _write(tmp_path, "jsonl", [{"text": "x", "score": 0.5}, {"text": "y", "score": 1.5}], "sts")
    with pytest.raises(DataError, match="label field 'score' holds .*float.*expected class labels"):
        FilesSource(paths=[path], label_field="score").load()


def _labelled_dataset():
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    return datasets.Dataset.from_dict(
        {"sentence": ["bad", "good", "fine", "meh"], "label": [0, 1, -1, 0]}, features=features
    )


def test_classlabel_names_and_unlabelled_rows():
    texts = texts_from_dataset(
        _labelled_dataset(),
        where="test",
        domain="sst",
        text_fields=["sentence"],
        separator="\n",
        label_field="label",
        n=None,
        seed=0,
        provenance={},
    )
    assert texts.label_names == ["sst/negative", "sst/positive"]
    assert texts.label.tolist() == [0, 1, -1, 0]


def test_hf_source_reads_a_local_dataset_folder_without_network(tmp_path):
    folder = tmp_path / "my_dataset"
    (folder / "data").mkdir(parents=True)
    _labelled_dataset().to_parquet(str(folder / "data" / "train-00000.parquet"))
    texts = HFSource(
        name=str(folder), split="train", text_field="sentence", label_field="label", domain="sst", n=3, seed=0
    ).load()
    assert len(texts) == 3 and texts.label_names == ["sst/negative", "sst/positive"]
    assert texts.sources[0]["kind"] == "hf" and texts.sources[0]["fingerprint"]


def test_unknown_hf_dataset_is_a_data_error_naming_it():
    with pytest.raises(
        DataError,
        match=r"source hf:nobody/no-such-dataset \(split train\): dataset "
        r"'nobody/no-such-dataset' is not in the cache .*HF_HUB_OFFLINE is set",
    ):
        HFSource(name="nobody/no-such-dataset").load()


def test_labels_of_different_sources_never_share_codes(tmp_path):
    a = _write(tmp_path, "jsonl", [{"text": "x", "y": "pos"}, {"text": "z", "y": "neg"}], "a")
    b = _write(tmp_path, "csv", [{"text": "u", "y": "pos"}, {"text": "v", "y": "neg"}], "b")
    texts = load_texts(
        [
            FilesSource(paths=[a], label_field="y"),
            FilesSource(paths=[b], label_field="y"),
            BuiltinSource(n_per_domain=1, domains=["news"]),
        ]
    )
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
    relative = {"kind": "files", "paths": ["data/x.jsonl"]}  # built in Python: the current folder
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


# --------------------------------------------------------------------------------------------------
# issue #17: files checked before reading, named by file and line; several domains in one file


def test_unusable_files_are_named_with_file_and_line_before_datasets_reads_them(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text("{text: 1}\n")
    cases = {
        empty: "empty.jsonl: the file is empty",
        blank: "blank.jsonl: has no records (only blank lines)",
        latin: "latin.jsonl line 2: not UTF-8 text (byte 0xe9 at column 14); save the file as UTF-8",
        header_only: "header.csv: has no records, only a header",
        not_json: "broken.jsonl line 1: not JSON (",
    }
    for path, message in cases.items():
        with pytest.raises(DataError) as info:
            FilesSource(paths=[str(path)]).load()
        assert message in str(info.value) and str(path) in str(info.value)
        assert FilesSource(paths=[str(path)]).check()[0][0] == "paths[0]"


def test_check_reads_only_the_head_of_a_file_and_names_missing_fields(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"body": "x"}\n' * 10 + b'{"body": "\xff"}\n')
    assert FilesSource(paths=[str(path)], text_field="body").check(max_bytes=40) == []
    assert "line 11: not UTF-8" in FilesSource(paths=[str(path)], text_field="body").check(max_bytes=None)[0][1]
    problems = FilesSource(paths=[str(path)], text_field="body", domain_field="topic").check(max_bytes=40)
    assert problems == [
        ("paths[0]", f"{path} line 1: no field(s) ['topic'] in the first record; its fields are ['body']")
    ]


def test_a_gzipped_jsonl_is_checked_through_gzip(tmp_path):
    import gzip

    path = tmp_path / "notes.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        stream.write('{"text": "a"}\n')
    assert FilesSource(paths=[str(path)]).check() == []
    assert "no field(s) ['body']" in FilesSource(paths=[str(path)], text_field="body").check()[0][1]


def test_one_file_holds_several_domains_through_domain_field(tmp_path):
    rows = [
        {"text": f"text {i}", "topic": ["news", "law", "news"][i % 3], "stars": ["bad", "good"][i % 2]}
        for i in range(12)
    ]
    path = _write(tmp_path, "jsonl", rows, "mixed")
    texts = FilesSource(paths=[path], domain_field="topic", label_field="stars").load()
    assert texts.domain_names == ["law", "news"]  # sorted by name
    law = [i for i, r in enumerate(rows) if r["topic"] == "law"]
    assert [texts.text_id[i] for i in np.flatnonzero(texts.domain == 0)] == [f"law/{i}" for i in law]
    assert texts.label_names == ["law/bad", "law/good", "news/bad", "news/good"]
    for text, domain, label in zip(texts.texts, texts.domain, texts.label):
        row = rows[int(text.split()[1])]
        assert texts.domain_names[domain] == row["topic"]
        assert texts.label_names[label] == f"{row['topic']}/{row['stars']}"
        assert texts.label_domain[label] == domain
    drawn = FilesSource(paths=[path], domain_field="topic", n=6, seed=3).load()
    assert len(drawn) == 6 and set(drawn.domain_names) <= {"law", "news"}


def test_domain_field_is_not_given_with_domain_and_must_be_filled(tmp_path):
    with pytest.raises(ValidationError, match="domain_field: give domain .* or domain_field .*, not both"):
        FilesSource(paths=["/a.jsonl"], domain="x", domain_field="topic")
    path = _write(tmp_path, "jsonl", [{"text": "a", "topic": "x"}, {"text": "b", "topic": ""}], "gaps")
    with pytest.raises(DataError, match=r"domain field 'topic' is empty in 1 row\(s\), e.g. row\(s\) \[1\]"):
        FilesSource(paths=[path], domain_field="topic").load()
