"""The generated pool: planted kinds, files, and the local HTTP server."""
from __future__ import annotations

import io
import urllib.error
import urllib.request

import polars as pl
import pytest
from PIL import Image

from pipelines.synth import demo_pool


def test_build_plants_every_kind(tmp_path):
    cfg = demo_pool.DemoDataConfig(n=100, seed=3)
    info = demo_pool.build(str(tmp_path), cfg)
    truth = pl.read_parquet(tmp_path / "truth.parquet")
    counts = dict(truth.group_by("kind").len().iter_rows())
    assert counts == {"original": 75, "near_duplicate": 15, "dead_link": 3, "corrupt": 2,
                      "mismatched_caption": 5}
    assert info["rows"] == 100 and truth["uid"].n_unique() == 100
    files = {p.name for p in (tmp_path / "images").iterdir()}
    dead = set(truth.filter(pl.col("kind") == "dead_link")["file"])
    assert files == set(truth["file"]) - dead
    for f in truth.filter(pl.col("kind") == "corrupt")["file"]:
        with pytest.raises(Exception):
            Image.open(tmp_path / "images" / f).load()
    # every near-duplicate copy has an original in its group, with the same true caption
    dups = truth.filter(pl.col("kind") == "near_duplicate")
    origs = truth.filter((pl.col("kind") == "original") & (pl.col("dup_group") >= 0))
    assert set(dups["dup_group"]) == set(origs["dup_group"])
    joined = dups.join(origs, on="dup_group", suffix="_o")
    assert (joined["true_caption"] == joined["true_caption_o"]).all()
    mis = truth.filter(pl.col("kind") == "mismatched_caption")
    assert (mis["caption"] != mis["true_caption"]).all()
    # a second build is the same build (completion marker)
    assert demo_pool.build(str(tmp_path), cfg) == info


def test_same_seed_same_pool(tmp_path):
    a = demo_pool.build(str(tmp_path / "a"), demo_pool.DemoDataConfig(n=40, seed=5))
    b = demo_pool.build(str(tmp_path / "b"), demo_pool.DemoDataConfig(n=40, seed=5))
    assert a == b
    for f in (tmp_path / "a" / "images").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / "images" / f.name).read_bytes()


def test_server_serves_images_and_404s(tmp_path):
    demo_pool.build(str(tmp_path), demo_pool.DemoDataConfig(n=40, seed=2))
    with demo_pool.serve(str(tmp_path)) as base:
        assert base.startswith("http://127.0.0.1:")
        meta = pl.read_parquet(demo_pool.write_metadata(str(tmp_path), base))
        truth = pl.read_parquet(tmp_path / "truth.parquet")
        rows = meta.join(truth, on="uid")
        ok = rows.filter(pl.col("kind") == "original").row(0, named=True)
        with urllib.request.urlopen(ok["url"], timeout=5) as r:
            Image.open(io.BytesIO(r.read())).load()
        dead = rows.filter(pl.col("kind") == "dead_link").row(0, named=True)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(dead["url"], timeout=5)
        assert e.value.code == 404


def test_bad_config_lists_every_problem():
    from pipelines.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        demo_pool.DemoDataConfig(n=5, size=8)
    assert "n must be" in str(e.value) and "size must be" in str(e.value)
