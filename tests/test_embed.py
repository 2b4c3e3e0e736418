"""open_clip embeddings: exact preprocessing, table layout, determinism, rejects."""
from __future__ import annotations

import io

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import embed
from pipelines.synth import demo_pool
from pipelines.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A small pool table (POOL schema) with one corrupt and one non-square image."""
    from PIL import Image
    root = tmp_path_factory.mktemp("pool")
    demo_pool.build(str(root), demo_pool.DemoDataConfig(n=40, seed=4))
    truth = pl.read_parquet(root / "truth.parquet").filter(
        pl.col("kind").is_in(["original", "near_duplicate"]))
    blobs = [(root / "images" / f).read_bytes() for f in truth["file"]]
    wide = io.BytesIO()
    Image.new("RGB", (150, 70), (200, 30, 30)).save(wide, "PNG")
    blobs += [b"not an image", wide.getvalue()]
    uids = list(truth["uid"]) + ["zz-corrupt", "zz-wide"]
    t = pa.table({"uid": uids, "jpg": blobs, "width": pa.array([96] * len(uids), pa.int32()),
                  "height": pa.array([96] * len(uids), pa.int32()),
                  "url": [f"http://x/{u}" for u in uids],
                  "caption": list(truth["caption"]) + ["broken", None]})
    path = root / "pool.parquet"
    pq.write_table(t, path)
    return str(path), t


def test_decode_matches_open_clip_preprocess_exactly(pool):
    import torch
    from PIL import Image
    _, t = pool
    m = embed.load(embed.EmbedConfig())
    blobs = [b for b in t.column("jpg").to_pylist() if b != b"not an image"]
    pix, ok = embed.decode_batch(blobs, m.image["size"], m.image["interpolation"],
                                 m.image["resize_mode"])
    assert ok.all()
    mean = torch.tensor(m.image["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(m.image["std"]).view(1, 3, 1, 1)
    ours = (torch.from_numpy(pix).permute(0, 3, 1, 2).float().div(255) - mean) / std
    ref = torch.stack([m.preprocess(Image.open(io.BytesIO(b))) for b in blobs])
    assert torch.equal(ours, ref)


def test_embed_shard_table_and_rejects(pool, tmp_path):
    path, t = pool
    out, rej = tmp_path / "emb.parquet", tmp_path / "rej.parquet"
    info = embed.embed_shard(embed.EmbedConfig(workers=0), path, str(out), str(rej))
    df = pl.read_parquet(out)
    assert df.schema["img_emb"] == pl.Array(pl.Float16, 64)
    assert df.schema["txt_emb"] == pl.Array(pl.Float16, 64)
    assert df["uid"].to_list() == [u for u in t.column("uid").to_pylist() if u != "zz-corrupt"]
    for col in ("img_emb", "txt_emb"):
        x = np.asarray(df[col].to_list(), np.float32)
        assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)
    assert pl.read_parquet(rej).rows() == [("zz-corrupt", "embed", "corrupt_image", None)]
    assert info["rows"] == t.num_rows and info["embedded"] == t.num_rows - 1


def test_worker_processes_give_identical_embeddings(pool, tmp_path):
    path, _ = pool
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    embed.embed_shard(embed.EmbedConfig(workers=0, batch_size=8), path, str(a), str(tmp_path / "ra"))
    try:
        embed.embed_shard(embed.EmbedConfig(workers=2, batch_size=8), path, str(b),
                          str(tmp_path / "rb"))
    finally:
        embed.shutdown()
    assert pq.read_table(a).equals(pq.read_table(b))


def test_random_init_is_seeded():
    import torch
    x = torch.zeros(1, 3, 64, 64)
    e = [embed.load(embed.EmbedConfig(seed=s)).model.encode_image(x) for s in (0, 0, 1)]
    assert embed.load(embed.EmbedConfig(seed=0)) is embed.load(embed.EmbedConfig(seed=0))
    assert not torch.equal(e[0], e[2])


def test_missing_checkpoint_and_bad_config():
    with pytest.raises(InputError, match="checkpoint not found"):
        embed.load(embed.EmbedConfig(model="ViT-B-32", pretrained="no/such/ckpt.pt"))
    with pytest.raises(ConfigError) as e:
        embed.EmbedConfig(batch_size=0, workers=-1, precision="fp8")
    assert all(s in str(e.value) for s in ("batch_size", "workers", "precision"))
