"""The artifact store: atomic writes, provenance, schema checks, corrupt files, shard views."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from moespec import artifacts
from moespec.artifacts import ArtifactWriter, DatasetSpec, open_artifact, write_artifact
from moespec.errors import ArtifactError

SCHEMA = {
    "embeddings": DatasetSpec(("N", "D"), "float"),
    "label": DatasetSpec(("N",), "int"),
    "text_id": DatasetSpec(("N",), "str"),
    "extra": DatasetSpec((), "float", required=False),
}


def _write(directory, n=10, d=4, *, shard=0, shards=1, fail_after=False, offset=0):
    writer = ArtifactWriter(
        directory,
        "embed",
        "abc123",
        schema=SCHEMA,
        shard_index=shard,
        num_shards=shards,
        root_attrs={"config": "a: 1\n"},
    )
    with write_artifact(writer) as out:
        emb = out.create_dataset("embeddings", (n, d), "float32")
        emb[:] = np.arange(offset * d, (offset + n) * d, dtype="float32").reshape(n, d)
        out.write("label", np.arange(offset, offset + n))
        out.write("text_id", [f"t{offset + i}" for i in range(n)])
        out.attrs["pooling"] = "mean"
        out.summary["n"] = n
        if fail_after:
            raise RuntimeError("boom")
    return writer.path


def test_round_trip_with_provenance(tmp_path):
    path = _write(tmp_path)
    assert path == tmp_path / "embed.h5"
    with open_artifact(tmp_path, SCHEMA) as reader:
        np.testing.assert_array_equal(reader["label"][:], np.arange(10))
        assert list(reader.read("text_id")[:3]) == ["t0", "t1", "t2"]
        for key in (
            "stage",
            "uid",
            "moespec_version",
            "package_versions",
            "host",
            "start_time",
            "end_time",
            "git_commit",
            "slurm_job_id",
            "config",
        ):
            assert key in reader.attrs, key
        assert reader.attrs["complete"] is True
        assert reader.config == {"a": 1}
        assert reader.attrs["pooling"] == "mean"


def test_failure_leaves_nothing_under_final_name(tmp_path):
    with pytest.raises(RuntimeError):
        _write(tmp_path, fail_after=True)
    assert not (tmp_path / "embed.h5").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_checks_schema(tmp_path):
    writer = ArtifactWriter(tmp_path, "embed", "u", schema=SCHEMA)
    with pytest.raises(ArtifactError, match="missing dataset 'label'"):
        with write_artifact(writer) as out:
            out.write("embeddings", np.zeros((3, 2), "float32"))
            out.write("text_id", ["a", "b", "c"])
    assert not (tmp_path / "embed.h5").exists()


def test_shape_mismatch_across_datasets_is_reported(tmp_path):
    writer = ArtifactWriter(tmp_path, "embed", "u", schema=SCHEMA)
    with pytest.raises(ArtifactError, match=r"'label' axis 0 \(N\) has size 2"):
        with write_artifact(writer) as out:
            out.write("embeddings", np.zeros((3, 2), "float32"))
            out.write("label", np.zeros(2, "int64"))
            out.write("text_id", ["a", "b", "c"])


def test_wrong_dtype_is_reported_on_read(tmp_path):
    _write(tmp_path)
    bad = {**SCHEMA, "label": DatasetSpec(("N",), "float")}
    with pytest.raises(ArtifactError, match="'label' has dtype int64, expected float"):
        open_artifact(tmp_path, bad)


def test_truncated_file_names_the_file(tmp_path):
    path = _write(tmp_path, n=2000, d=64)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ArtifactError, match=str(path)):
        open_artifact(path, SCHEMA)
    assert not artifacts.is_complete(path, SCHEMA)


def test_garbage_file_names_the_file(tmp_path):
    path = tmp_path / "embed.h5"
    path.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(ArtifactError, match="cannot be opened as HDF5"):
        open_artifact(path)


def test_incomplete_flag_is_refused(tmp_path):
    path = tmp_path / "embed.h5"
    with h5py.File(path, "w") as f:
        f["embeddings"] = np.zeros((2, 2), "float32")
    with pytest.raises(ArtifactError, match="incomplete"):
        open_artifact(path)


def test_side_files_are_atomic(tmp_path):
    writer = ArtifactWriter(tmp_path, "embed", "u", schema={})
    with write_artifact(writer) as out:
        side = out.side_file("checkpoint.pt")
        side.write_bytes(b"weights")
        assert not (tmp_path / "checkpoint.pt").exists()
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"weights"

    writer = ArtifactWriter(tmp_path / "b", "embed", "u", schema={})
    with pytest.raises(RuntimeError):
        with write_artifact(writer) as out:
            out.side_file("checkpoint.pt").write_bytes(b"partial")
            raise RuntimeError("crash")
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
    assert not list((tmp_path / "b").glob("*.tmp"))


def test_shard_view_reads_all_shards_without_copy(tmp_path):
    sizes = [4, 3, 5]
    offset = 0
    for i, n in enumerate(sizes):
        _write(tmp_path, n=n, shard=i, shards=3, offset=offset)
        offset += n
    assert artifacts.build_shard_view(tmp_path, "embed", 3, SCHEMA)
    view = tmp_path / "embed.h5"
    assert view.stat().st_size < 50_000
    cwd = os.getcwd()
    os.chdir("/")  # virtual sources are relative to the view file, not to the working directory
    try:
        with open_artifact(view, SCHEMA) as reader:
            assert reader["embeddings"].is_virtual
            np.testing.assert_array_equal(reader["label"][:], np.arange(12))
            assert reader.read("text_id")[-1] == "t11"
            assert reader["embeddings"].shape == (12, 4)
    finally:
        os.chdir(cwd)


def test_shard_view_waits_for_every_shard_and_detects_a_lost_one(tmp_path):
    _write(tmp_path, n=3, shard=0, shards=2)
    assert not artifacts.build_shard_view(tmp_path, "embed", 2, SCHEMA)
    _write(tmp_path, n=3, shard=1, shards=2, offset=3)
    assert artifacts.build_shard_view(tmp_path, "embed", 2, SCHEMA)
    (tmp_path / artifacts.h5_name("embed", 1, 2)).unlink()
    with pytest.raises(ArtifactError, match="shard file .* is missing"):
        open_artifact(tmp_path / "embed.h5", SCHEMA)
