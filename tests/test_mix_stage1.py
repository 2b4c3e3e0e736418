"""The stage-1 caption table from a curation coreset."""
import json
import os
from collections import Counter

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mllm.templates import check_conversation
from pipelines import manifest, schemas, storage
from pipelines.errors import ConfigError, InputError
from pipelines.mix import stage1


def write_coreset(folder, captions, images=True):
    os.makedirs(folder, exist_ok=True)
    n = len(captions)
    t = pa.table({"uid": [f"u{i:04d}" for i in range(n)], "url": [f"http://x/{i}.jpg" for i in range(n)],
                  "caption": captions, "cluster": [i % 3 for i in range(n)],
                  "clip_score": [0.3] * n, "centroid_cos": [0.2] * n, "extra": list(range(n))})
    path = os.path.join(folder, "coreset.parquet")
    storage.write_table(t, path)
    storage.write_table(pa.table({"uid": ["z"], "stage": ["dedup"], "reason": ["duplicate"], "kept_uid": ["u0000"]}),
                        os.path.join(folder, "rejects.parquet"), schemas.REJECTS)
    imgs = {"coreset": {"kind": "parquet", "path": "images/images.parquet"}} if images else None
    manifest.write(os.path.join(folder, "manifest.json"),
                   {"coreset": path, "rejects": os.path.join(folder, "rejects.parquet")}, images=imgs)
    return path


CAPTIONS = ["A dog on a beach.", None, "", "   ", "Two <image> cats.", "x" * 3000] + \
           [f"Caption number {i}." for i in range(94)]


def test_stage1_table_rejects_and_manifest_entry(tmp_path):
    run = str(tmp_path / "select")
    core = write_coreset(run, CAPTIONS)
    stats = stage1.run(stage1.Stage1Config(seed=1), core, run)
    t = pl.read_parquet(os.path.join(run, "stage1.parquet"))
    rej = pl.read_parquet(os.path.join(run, "stage1_rejects.parquet"))
    assert pq.read_schema(os.path.join(run, "stage1.parquet")).remove_metadata() == schemas.MIX
    assert t.height == 95 and stats["kept"] == 95 and stats["input"] == 100 == t.height + rej.height
    assert Counter(r.split(":")[0] for r in rej["reason"].to_list()) == {
        "missing_caption": 1, "empty_caption": 2, "image_tag_in_caption": 1, "too_long": 1}
    assert set(rej["id"].to_list()) == {"u0001", "u0002", "u0003", "u0004", "u0005"}
    assert (t["id"] == t["image"]).all() and t["has_image"].all() and (t["n_turns"] == 2).all()
    assert set(t["source"].to_list()) == {"coreset"}
    rows = t.to_dicts()
    assert rows[0]["conversations"][1] == {"from": "gpt", "value": "A dog on a beach."}
    for r in rows:
        human = r["conversations"][0]["value"]
        assert human.startswith("<image>\n") and human[len("<image>\n"):] in stage1.PROMPTS
        assert check_conversation(r["conversations"], True) is None
    assert len({r["conversations"][0]["value"] for r in rows}) > 3      # prompts vary
    # the existing manifest gained "stage1", carrying the coreset's images, and still verifies
    m = manifest.load(os.path.join(run, "manifest.json"), verify=True)
    assert set(m.doc["tables"]) == {"coreset", "rejects", "stage1"}
    assert m.entry("stage1")["rows"] == 95
    assert m.entry("stage1")["images"] == {"kind": "parquet", "path": "images/images.parquet"}
    assert m.images("stage1") == m.images("coreset")
    assert json.load(open(os.path.join(run, "stage1_stats.json")))["rejected"] == 5


def test_prompts_are_seeded_per_uid_and_can_be_fixed(tmp_path):
    core = write_coreset(str(tmp_path / "c"), [f"Cap {i}." for i in range(60)], images=False)

    def prompts(cfg, out):
        stage1.run(cfg, core, str(tmp_path / out))
        t = pl.read_parquet(str(tmp_path / out / "stage1.parquet"))
        return dict(zip(t["id"].to_list(), (c[0]["value"] for c in t["conversations"].to_list())))

    a = prompts(stage1.Stage1Config(seed=0), "a")
    assert prompts(stage1.Stage1Config(seed=0), "b") == a
    assert prompts(stage1.Stage1Config(seed=5), "c") != a
    fixed = prompts(stage1.Stage1Config(prompt="Describe."), "d")
    assert set(fixed.values()) == {"<image>\nDescribe."}
    # a new manifest in another folder, with no images entry (the coreset had none)
    m = manifest.load(str(tmp_path / "d" / "manifest.json"))
    assert set(m.doc["tables"]) == {"stage1"} and m.images("stage1") is None


def test_stage1_config_and_input_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        stage1.Stage1Config(prompt="<image> what?", max_chars=0)
    assert "must not contain <image>" in str(e.value) and "max_chars" in str(e.value)
    storage.write_table(pa.table({"uid": ["a"]}), str(tmp_path / "coreset.parquet"))
    with pytest.raises(InputError, match="missing column 'caption'"):
        stage1.run(stage1.Stage1Config(), str(tmp_path / "coreset.parquet"), str(tmp_path / "o"))


def test_stage1_rows_have_uids_and_rejects_name_their_row(tmp_path):
    # u0001 (null caption) and u0004 (<image> in it) are rejects; a uid repeated with the
    # same caption is a duplicate by content, with another caption it is kept
    run = str(tmp_path / "select")
    caps = ["A dog.", None, "A cat.", "A cat.", "Two <image> cats.", "A bird."]
    core = write_coreset(run, caps)
    t = pa.Table.from_pylist([{"uid": u, "caption": c} for u, c in
                              [("u0000", "A dog."), ("u0001", None), ("u0002", "A cat."), ("u0002", "A cat."),
                               ("u0004", "Two <image> cats."), ("u0002", "A kitten.")]])
    storage.write_table(t, core)
    stats = stage1.run(stage1.Stage1Config(), core, run)
    out = pl.read_parquet(os.path.join(run, "stage1.parquet"))
    rej = pl.read_parquet(os.path.join(run, "stage1_rejects.parquet"))
    assert out["uid"].to_list() == ["coreset:0", "coreset:2", "coreset:5"]
    assert out["id"].to_list() == ["u0000", "u0002", "u0002"] and out["system"].null_count() == 3
    assert rej.select("uid", "row", "id").rows() == [("coreset:1", 1, "u0001"), ("coreset:3", 3, "u0002"),
                                                     ("coreset:4", 4, "u0004")]
    assert rej["reason"].to_list()[1] == "duplicate: same uid 'u0002' and caption as an earlier row"
    assert set(rej["file"].to_list()) == {core}
    assert [json.loads(r) for r in rej["record"].to_list()] == [
        {"uid": "u0001", "caption": None}, {"uid": "u0002", "caption": "A cat."},
        {"uid": "u0004", "caption": "Two <image> cats."}]
    assert stats["input"] == 6 == out.height + rej.height
