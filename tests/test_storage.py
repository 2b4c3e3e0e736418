"""Storage helper and manifest: atomic writes, markers, hashes."""
import json
import os

import pyarrow as pa
import pytest

from pipelines import manifest, schemas, storage
from pipelines.errors import InputError, ManifestError


def test_atomic_open_leaves_nothing_on_failure(tmp_path):
    target = str(tmp_path / "sub" / "out.bin")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(target) as f:
            f.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert not os.path.exists(target)
    assert os.listdir(tmp_path / "sub") == []
    storage.write_bytes(target, b"whole")
    assert open(target, "rb").read() == b"whole"
    assert os.listdir(tmp_path / "sub") == ["out.bin"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_at_flush_names_the_file(tmp_path, monkeypatch):
    """A buffered write that fails at flush fails again when the file closes; the error
    the user reads still names the file (the close's bare OSError once replaced it)."""
    from pipelines.errors import OutputError
    real_open = open
    monkeypatch.setattr(storage, "open", lambda path, mode: real_open("/dev/full", mode), raising=False)
    target = str(tmp_path / "out.parquet")
    with pytest.raises(OutputError) as e:
        with storage.atomic_open(target) as f:
            f.write(b"x" * 100)        # buffered: the disk is full only at flush
    assert str(e.value) == (f"cannot write {target}: no space left on device; free space (or fix "
                            "the folder) and rerun the same command to resume")
    assert os.listdir(tmp_path) == []


def test_write_table_casts_to_the_explicit_schema(tmp_path):
    t = pa.table({"kept_uid": [None], "reason": ["duplicate"], "stage": ["dedup"], "uid": ["a"],
                  "extra": [1]})
    path = str(tmp_path / "r.parquet")
    storage.write_table(t, path, schemas.REJECTS)
    back = storage.read_table(path)
    assert back.schema == schemas.REJECTS and back.to_pylist() == [
        {"uid": "a", "stage": "dedup", "reason": "duplicate", "kept_uid": None}]
    with pytest.raises(InputError, match="missing column"):
        storage.read_table(path, schema=schemas.ASSIGNMENTS)


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="bad.parquet: unreadable Parquet"):
        storage.read_table(str(bad))
    with pytest.raises(InputError, match="nope.json: file not found"):
        storage.read_json(str(tmp_path / "nope.json"))


def test_completion_markers(tmp_path):
    root = str(tmp_path)
    assert not storage.is_done(root, "shard-1")
    storage.mark_done(root, "shard-1", {"rows": 3})
    assert storage.is_done(root, "shard-1") and storage.done_info(root, "shard-1") == {"rows": 3}


def test_manifest_roundtrip_and_refusal(tmp_path):
    t = pa.table({"uid": ["a", "b"]})
    p = str(tmp_path / "t.parquet")
    storage.write_table(t, p)
    doc = manifest.write(str(tmp_path / "manifest.json"), {"coreset": p}, config={"k": 1},
                         images={"coreset": {"kind": "parquet", "path": "images.parquet"}})
    assert doc["tables"]["coreset"]["rows"] == 2 and doc["tables"]["coreset"]["path"] == "t.parquet"
    m = manifest.load(str(tmp_path / "manifest.json"))
    assert m.table_path("coreset") == p
    assert m.images("coreset") == {"kind": "parquet", "path": str(tmp_path / "images.parquet")}
    with pytest.raises(ManifestError, match="no table 'mix'"):
        m.entry("mix")
    storage.write_table(pa.table({"uid": ["a", "c"]}), p)
    with pytest.raises(ManifestError, match="does not match its sha256"):
        manifest.load(str(tmp_path / "manifest.json"))
    manifest.load(str(tmp_path / "manifest.json"), verify=False)
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ManifestError, match="not a Warren manifest"):
        manifest.load(str(tmp_path / "other.json"))
