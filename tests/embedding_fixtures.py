"""Helpers to write small embedding sources for tests."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_laion(root, img, txt=None, uids=None, shards=1, dtype=np.float16, extra=None,
                uid_column="key"):
    """Write LAION layout: img_emb/, text_emb/, metadata/ split into `shards` files."""
    n = len(img)
    uids = uids if uids is not None else [f"u{i:06d}" for i in range(n)]
    for sub in ("img_emb", "text_emb", "metadata"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s in range(shards):
        a, b = bounds[s], bounds[s + 1]
        np.save(os.path.join(root, "img_emb", f"img_emb_{s:04d}.npy"), np.asarray(img[a:b], dtype))
        if txt is not None:
            np.save(os.path.join(root, "text_emb", f"text_emb_{s:04d}.npy"), np.asarray(txt[a:b], dtype))
        cols = {uid_column: pa.array(list(uids[a:b]), pa.string()),
                "url": [f"http://x.invalid/{u}" for u in uids[a:b]],
                "caption": [f"caption {u}" for u in uids[a:b]]}
        for k, v in (extra or {}).items():
            cols[k] = list(v[a:b])
        pq.write_table(pa.table(cols), os.path.join(root, "metadata", f"metadata_{s:04d}.parquet"))
    return root


def write_warren_parquet(root, img, txt, uids, shards=1):
    """Write Warren's own Parquet embedding tables (fixed-size-list float16 columns)."""
    os.makedirs(root, exist_ok=True)
    d = img.shape[1]
    bounds = np.linspace(0, len(img), shards + 1).astype(int)
    for s in range(shards):
        a, b = bounds[s], bounds[s + 1]
        t = pa.table({
            "uid": pa.array(list(uids[a:b]), pa.string()),
            "url": [f"http://x.invalid/{u}" for u in uids[a:b]],
            "caption": [f"caption {u}" for u in uids[a:b]],
            "img_emb": pa.FixedSizeListArray.from_arrays(
                pa.array(np.asarray(img[a:b], np.float16).ravel()), d),
            "txt_emb": pa.FixedSizeListArray.from_arrays(
                pa.array(np.asarray(txt[a:b], np.float16).ravel()), d),
        })
        pq.write_table(t, os.path.join(root, f"emb_{s:05d}.parquet"))
    return root


def check_accounting(source_uids, out_dir, extra_uids=()):
    """Every input uid is in exactly one of coreset.parquet / rejects.parquet."""
    core = pq.read_table(os.path.join(out_dir, "coreset.parquet")).column("uid").to_pylist()
    rej = pq.read_table(os.path.join(out_dir, "rejects.parquet")).column("uid").to_pylist()
    assert len(set(core)) == len(core)
    assert len(set(rej)) == len(rej)
    assert not set(core) & set(rej)
    assert set(core) | set(rej) == set(source_uids) | set(extra_uids)
    assert len(core) + len(rej) == len(set(source_uids) | set(extra_uids))
    return core, rej
