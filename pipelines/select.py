"""Coreset selection on embeddings: the Bunny rule, as resumable stages.

    plan -> validate (per shard) -> train (once) -> assign (per shard)
         -> dedup (per cluster bucket) -> finish (bands, sample, outputs)

Every stage is a plain function of (config, source folder, output folder[, unit]) that
writes its results atomically under `<output>/_work/` and records a completion marker
last, so a rerun skips finished units and a killed run resumes where it stopped. The
Prefect flow (flows/curate.py) maps the per-shard and per-bucket stages over a task
runner; `run` calls them in order in this process.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import (bands, cluster, dedup, kmeans, manifest, merge, ranks, runkey, schemas,
                       shuffle, storage)
from pipelines.errors import ConfigError, InputError, OutputError, WarrenError, setting
from pipelines.readers import EmbeddingSource, open_source, row_flags, to_float16

log = logging.getLogger(__name__)

WORK = "_work"
REASONS = {1: "wrong_dim", 2: "nan_embedding", 3: "zero_embedding",
           4: "nan_text_embedding", 5: "zero_text_embedding",
           6: "bad_caption", 7: "bad_url", 8: "bad_text"}
CODES = {v: k for k, v in REASONS.items()}
# What a selection writes into its --output folder: a restart deletes these and nothing
# else (curate keeps its download and embed work in the same `_work` folder).
OUTPUTS = ("coreset.parquet", "rejects.parquet", "centroids.npy", "stats.json",
           "manifest.json", "report.html")
WORK_ENTRIES = ("plan.json", "shards.json", "centroids.npz", "valid", "rejects", "assign",
                "dedup", "finish")
STAGES = ("validate", "train", "assign", "dedup", "link", "finish")
# Default bucket count: 64, or one per 2M rows beyond 128M (LAION-2B: 1,150), so that a
# dedup task's table stays ~0.5 GB (its vectors are read a cluster group at a time).
BUCKET_ROWS = 2_000_000


@dataclass(frozen=True)
class SelectConfig:
    """Everything the selection computes from. Same config + same input = same coreset."""
    k: int | None = None                 # clusters; None: rows / avg_cluster
    avg_cluster: int = 20_000            # LAION-2B at k = 100,000
    threshold: float = 0.86              # duplicate edge: cos > threshold
    clip_band: tuple[float, float] | None = (0.40, 0.60)
    centroid_band: tuple[float, float] | None = (0.15, 0.35)
    target: int | None = None            # final sample size; None keeps every band survivor
    seed: int = 0
    keep: Literal["middle", "far", "near", "random"] = "middle"
    policy: Literal["bunny", "semdedup"] = "bunny"
    eps: float | None = None             # semdedup: drop when cos > 1 - eps (default 1 - threshold)
    uid_column: str = "key"
    buckets: int | None = None           # dedup work units; None: min(k, max(64, rows / 2M))
    train_sample: int | None = None      # k-means training rows; None: max(10k, 64 k) capped at n
    niter: int = 20
    two_level: Literal["auto", "on", "off"] = "auto"
    flat_max_k: int = 4096               # auto: two-level k-means above this k
    nprobe: int = 8
    batch_rows: int = 16_384
    block: int = dedup.BLOCK
    method: Literal["int8", "float32", "baseline"] = "int8"   # baseline: for bench/ only
    dedup_scope: Literal["cluster", "global"] = "cluster"   # global: also across cluster borders
    # k-means and the pairwise step: "faiss" (CPU), a torch device ("cpu", "cuda", "cuda:1":
    # the same result on each), or "auto" (cuda when present, else faiss). Not part of
    # the run's key: a run resumes on another device of the same family.
    device: str = "auto"

    def __post_init__(self):
        p = []
        if self.k is not None and self.k < 1:
            p.append(f"k must be >= 1 (got {self.k})")
        if self.avg_cluster < 1:
            p.append("avg_cluster must be >= 1")
        if not 0.0 < self.threshold < 1.0:
            p.append(f"threshold must be in (0, 1) (got {self.threshold})")
        for name in ("clip_band", "centroid_band"):
            b = getattr(self, name)
            if b is not None and not (len(b) == 2 and 0.0 <= b[0] < b[1] <= 1.0):
                p.append(f"{name} must be lo,hi with 0 <= lo < hi <= 1 (got {b})")
        if self.target is not None and self.target < 0:
            p.append(f"target must be >= 0 (got {self.target})")
        if self.keep not in ("middle", "far", "near", "random"):
            p.append(f"keep must be middle, far, near or random (got {self.keep!r})")
        if self.policy not in ("bunny", "semdedup"):
            p.append(f"policy must be bunny or semdedup (got {self.policy!r})")
        if self.policy == "semdedup" and self.keep not in ("far", "near"):
            p.append("policy semdedup ranks by centroid distance: keep must be far or near")
        if self.eps is not None and not 0.0 < self.eps < 1.0:
            p.append(f"eps must be in (0, 1) (got {self.eps})")
        if self.buckets is not None and self.buckets < 1:
            p.append("buckets must be >= 1")
        if self.two_level not in ("auto", "on", "off"):
            p.append("two_level must be auto, on or off")
        if self.dedup_scope not in ("cluster", "global"):
            p.append(f"dedup_scope must be cluster or global (got {self.dedup_scope!r})")
        if self.dedup_scope == "global" and self.policy != "bunny":
            p.append("dedup_scope global links components across clusters: policy must be bunny")
        if not (self.device in ("auto", "faiss", "cpu") or self.device.startswith("cuda")):
            p.append(f"device must be auto, faiss, cpu or cuda[:N] (got {self.device!r})")
        if self.method not in ("int8", "float32", "baseline"):
            p.append("method must be int8, float32 or baseline")
        if self.block < 32:
            p.append("block must be >= 32")
        if p:
            raise ConfigError(p, source="select config")

    @classmethod
    def from_dict(cls, d: dict) -> "SelectConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError([f"unknown select option '{u}'" for u in unknown],
                              source="select config")
        d = dict(d)
        for b in ("clip_band", "centroid_band"):
            if isinstance(d.get(b), list):
                d[b] = tuple(d[b])
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- helpers -------------------------------------------------------------------------
def _w(out: str, *parts: str) -> str:
    return storage.join(out, WORK, *parts)


def _plan(out: str) -> dict:
    return storage.read_json(_w(out, "plan.json"))


def _hint(path: str, value: str) -> str:
    """A setting with its value as the user types it (`--clip-band none` or
    `--set select.clip_band=none`)."""
    s = setting(path)
    return s + value if s.endswith("=") else f"{s} {value}"


def _key(config: dict) -> dict:
    """The config as a run's key: everything but the device (a run may resume on
    another device of the same k-means family, with the same result)."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k != "device"}


def _family(device: str) -> str:
    return "faiss" if device == "faiss" else "torch"


def _device(cfg: SelectConfig, p: dict) -> str:
    """Where this run's k-means and pairwise step run: "faiss", or a torch device."""
    if p.get("kmeans", "faiss") == "faiss":
        return "faiss"
    if cfg.device not in ("auto", "faiss"):
        return cfg.device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _input_key(source_dir: str) -> dict:
    """The input's fingerprint (file list, sizes, mtimes) under one fixed key, so the same
    folder named another way (relative, trailing slash) is the same input."""
    return {"input": next(iter(runkey.fingerprint([str(source_dir)]).values()))}


def _source(cfg: SelectConfig, src: str) -> EmbeddingSource:
    return open_source(src, cfg.uid_column)


def _src(output_dir: str) -> EmbeddingSource:
    """The source as the plan opened it: a task reads one small record instead of
    listing and opening every shard (2,300 at LAION-2B, for each of thousands of tasks)."""
    return EmbeddingSource.from_record(storage.read_json(_w(output_dir, "shards.json")))


def _carried(src: EmbeddingSource) -> pa.Schema:
    """Metadata columns that follow the coreset's fixed head, in order of first
    appearance over the shards (nullable, as a column built from data is)."""
    head = set(schemas.CORESET.names) | {src.uid_column}
    return pa.schema([pa.field(f.name, f.type, True) for f in src.columns if f.name not in head])


def _strings(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    return values if isinstance(values, pa.Array) else pa.array(list(values), pa.string())


def _by_code(names: list[str | None], codes: np.ndarray) -> pa.Array:
    """names[code] per row, as Arrow strings: no Python str per row."""
    return pa.array(names, pa.string()).take(pa.array(np.asarray(codes, np.int64)))


def _rejects(uids, stage: str, reasons, kept=None) -> pa.Table:
    n = len(uids)
    reasons = pa.repeat(pa.scalar(reasons, pa.string()), n) if isinstance(reasons, str) \
        else _strings(reasons)
    return pa.table({"uid": _strings(uids),
                     "stage": pa.repeat(pa.scalar(stage, pa.string()), n),
                     "reason": reasons,
                     "kept_uid": _strings(kept) if kept is not None else pa.nulls(n, pa.string())},
                    schema=schemas.REJECTS)


# -- stages --------------------------------------------------------------------------
def plan(cfg: SelectConfig, source_dir: str, output_dir: str, *, restart: bool = False) -> dict:
    """Open and check the source, fix k and the bucket count, record them with the
    input's fingerprint.

    A rerun into a folder that holds a run of another config or another input is
    refused in one line naming what changed; `restart` deletes that run (only the files
    a selection writes) and starts over."""
    _check_output(source_dir, output_dir)
    fp = _input_key(source_dir)
    if restart:
        clear(output_dir)
    path = _w(output_dir, "plan.json")
    old = storage.read_json(path) if storage.exists(path) else None
    if old is not None:
        cfg_now = _key(cfg.to_dict())
        if _key(old.get("config") or {}) != cfg_now:
            diff = sorted(k for k in set(cfg_now) | set(_key(old.get("config") or {}))
                          if _key(old.get("config") or {}).get(k) != cfg_now.get(k))
            raise ConfigError(f"{output_dir} holds a run with another config (differs in "
                              f"{', '.join(diff)}); pass --restart to start over, or choose "
                              "another output folder", source="select")
        runkey.check_same(old.get("input"), fp, str(output_dir))
        family = old.get("kmeans", "faiss")
        if cfg.device != "auto" and _family(cfg.device) != family:
            raise ConfigError(f"{output_dir} holds a run whose k-means ran on "
                              f"{'faiss' if family == 'faiss' else 'torch'}: resume it with "
                              f"{_hint('select.device', 'faiss' if family == 'faiss' else 'cpu')} "
                              "(or cuda), or pass --restart", source="select")
    src = _source(cfg, source_dir)
    if cfg.clip_band is not None and not src.has_text:
        raise ConfigError("the clip-score band needs text embeddings and the source has none "
                          f"(no text_emb/ or txt_emb column): pass {_hint('select.clip_band', 'none')}",
                          source=source_dir)
    k = cfg.k or max(1, int(round(src.rows / cfg.avg_cluster)))
    p = {"source": str(source_dir), "layout": src.layout, "shards": len(src.shards),
         "rows": src.rows, "dim": src.dim, "has_text": src.has_text, "k": k,
         "buckets": min(k, cfg.buckets or max(64, -(-src.rows // BUCKET_ROWS))),
         "config": json.loads(json.dumps(cfg.to_dict())), "input": fp,
         "kmeans": _family(kmeans.resolve(cfg.device))}
    storage.remove_temporaries(_w(output_dir))
    if old is not None:
        if old.get("rows") != p["rows"]:    # an old plan without a fingerprint
            raise ConfigError(f"{output_dir} holds a run of {old.get('rows')} input rows, not "
                              f"{p['rows']}; pass --restart to start over", source="select")
        if not storage.exists(_w(output_dir, "shards.json")):
            storage.write_json(_w(output_dir, "shards.json"), src.to_record())
        return old
    storage.write_json(_w(output_dir, "shards.json"), src.to_record())
    storage.write_json(path, p)
    return p


def _check_output(source_dir: str, output_dir: str) -> None:
    """The output folder must be a folder, apart from the input: written into the input
    (centroids.npy in img_emb/) it would break that input for every later run. The one
    input a run may hold is the embedding folder it made itself (curate's URL mode)."""
    own = storage.join(output_dir, "embeddings")
    if os.path.normpath(str(source_dir)) != os.path.normpath(own):
        runkey.check_apart(str(output_dir), [str(source_dir)])
    fs, p = storage.filesystem(output_dir)
    if fs.exists(p) and not fs.isdir(p):
        raise OutputError(str(output_dir), "it is a file, not a folder")
    storage.makedirs(output_dir)


def clear(output_dir: str) -> None:
    """Delete a selection's outputs and work files in `output_dir` (nothing else)."""
    fs, p = storage.filesystem(output_dir)
    if not fs.isdir(p):
        return
    targets = [storage.join(p, n) for n in OUTPUTS] + [storage.join(p, WORK, n) for n in WORK_ENTRIES]
    done = storage.join(p, WORK, storage.COMPLETIONS)
    if fs.isdir(done):
        targets += [f for f in fs.ls(done, detail=False)
                    if f.rsplit("/", 1)[-1].split("-", 1)[0].removesuffix(".json") in STAGES]
    for t in targets:
        if fs.exists(t):
            fs.rm(t, recursive=True)


def stage_validate(cfg: SelectConfig, source_dir: str, output_dir: str, shard: int) -> dict:
    """Turn unusable rows into rejects with a reason; record (uid, row, uid hash) of the rest."""
    name = f"validate-{shard:05d}"
    if storage.is_done(_w(output_dir), name):
        return storage.done_info(_w(output_dir), name)
    src = _src(output_dir)
    sh = src.shards[shard]
    uids = src.uids(sh)
    code = np.zeros(sh.rows, np.int8)
    for b in src.batches(sh, cfg.batch_rows, native=True):
        s, e = b.start, b.start + len(b.img)
        c = np.zeros(e - s, np.int8)
        if b.bad_dim is not None:
            c[b.bad_dim] = 1
        fin, nonzero = row_flags(b.img)
        c[(c == 0) & ~fin] = 2
        c[(c == 0) & ~nonzero] = 3
        if b.txt is not None and cfg.clip_band is not None:
            fin, nonzero = row_flags(b.txt)
            c[(c == 0) & ~fin] = 4
            c[(c == 0) & ~nonzero] = 5
        code[s:e] = c
    for reason, rows in src.bad_text(sh).items():
        code[rows[code[rows] == 0]] = CODES[reason]
    ok = code == 0
    rows = np.flatnonzero(ok)
    good = uids.take(rows)
    valid = pa.table({"uid": good, "row": pa.array(rows, pa.int64()),
                      "hash": pa.array(bands.uid_hash_arrow(good).view(np.int64))})
    storage.write_table(valid, _w(output_dir, "valid", f"s{shard:05d}.parquet"))
    bad = np.flatnonzero(~ok)
    rej = _rejects(uids.take(bad), "validate",
                   _by_code([REASONS.get(i) for i in range(max(REASONS) + 1)], code[bad]))
    # sorted by uid: a run of the finish stage's merge
    rej = rej.take(pc.sort_indices(rej, [("uid", "ascending")]))
    storage.write_table(rej, _w(output_dir, "rejects", f"validate-s{shard:05d}.parquet"),
                        schemas.REJECTS, row_group_size=merge.RUN_ROWS)
    counts = {REASONS[int(c)]: int((code == c).sum()) for c in np.unique(code[bad])}
    info = {"shard": shard, "rows": int(sh.rows), "valid": int(ok.sum()), "rejects": counts}
    storage.mark_done(_w(output_dir), name, info)
    return info


def _valid_tables(output_dir: str, shards: int) -> list[pa.Table]:
    return [storage.read_table(_w(output_dir, "valid", f"s{s:05d}.parquet")) for s in range(shards)]


def _check_unique(tables: list[pa.Table], src: EmbeddingSource) -> None:
    hashes = np.concatenate([t.column("hash").to_numpy() for t in tables]) if tables else np.zeros(0)
    if len(np.unique(hashes)) == len(hashes):
        return
    vals, counts = np.unique(hashes, return_counts=True)
    dup = set(vals[counts > 1].tolist())
    seen: dict[str, tuple[int, int]] = {}
    for s, t in enumerate(tables):
        h = t.column("hash").to_numpy()
        for i in np.flatnonzero(np.isin(h, list(dup))):
            u, r = t.column("uid")[i].as_py(), int(t.column("row")[i].as_py())
            if u in seen:
                s0, r0 = seen[u]
                raise InputError(f"duplicate uid '{u}' (also at {src.shards[s0].meta} row {r0}); "
                                 "uids must be unique", path=src.shards[s].meta, row=r,
                                 field=src.uid_column)
            seen[u] = (s, r)


def stage_train(cfg: SelectConfig, source_dir: str, output_dir: str) -> dict:
    """Check uid uniqueness, draw the seeded training sample, train spherical k-means."""
    name = "train"
    if storage.is_done(_w(output_dir), name):
        return storage.done_info(_w(output_dir), name)
    p = _plan(output_dir)
    src = _src(output_dir)
    tables = _valid_tables(output_dir, p["shards"])
    _check_unique(tables, src)
    n_valid = sum(t.num_rows for t in tables)
    k = p["k"]
    if n_valid < k:
        raise InputError(f"only {n_valid} valid rows for k={k} clusters; lower "
                         f"{setting('select.k')}", path=source_dir)
    size = min(n_valid, cfg.train_sample or max(10_000, 64 * k))
    # The sample is the rows with the smallest seeded uid hash: independent of sharding.
    keys = [bands.mix(t.column("hash").to_numpy().view(np.uint64), cfg.seed) for t in tables]
    cut = np.sort(np.concatenate(keys))[size - 1]
    parts, part_keys, part_uids = [], [], []
    for s, (t, key) in enumerate(zip(tables, keys)):
        pick = np.flatnonzero(key <= cut)
        if not len(pick):
            continue
        rows = t.column("row").to_numpy()[pick]
        order = np.argsort(rows)
        batch = next(src.batches(src.shards[s], rows=rows[order]))
        parts.append(cluster.unit(batch.img))
        part_keys.append(key[pick][order])
        part_uids.append(_strings(t.column("uid")).take(pa.array(pick[order])))
    x = np.concatenate(parts)
    # sample order: by key, ties (colliding 64-bit hashes) by uid, so it does not depend
    # on the sharding
    key = np.concatenate(part_keys)
    order = np.argsort(key, kind="stable")
    sk = key[order]
    order = bands._ties_by_uid(order, sk[1:] == sk[:-1], pa.concat_arrays(part_uids))
    x = x[order]
    two = cfg.two_level == "on" or (cfg.two_level == "auto" and k > cfg.flat_max_k)
    t0 = time.perf_counter()
    dev = _device(cfg, p)
    cents = cluster.train(x, k, seed=cfg.seed, niter=cfg.niter, two_level=two, nprobe=cfg.nprobe,
                          device=dev)
    cents.save(_w(output_dir, "centroids.npz"))
    info = {"k": k, "sample": int(len(x)), "two_level": two, "valid_rows": int(n_valid), "device": dev,
            "seconds": round(time.perf_counter() - t0, 3)}
    storage.mark_done(_w(output_dir), name, info)
    return info


def stage_assign(cfg: SelectConfig, source_dir: str, output_dir: str, shard: int) -> dict:
    """Nearest centroid, centroid cosine and clip score per valid row. The rows (with
    their metadata, so the finish needs no join) and their normalised float16 vectors go
    to ONE file per shard, in batches per cluster bucket (pipelines/shuffle.py)."""
    name = f"assign-{shard:05d}"
    if storage.is_done(_w(output_dir), name):
        return storage.done_info(_w(output_dir), name)
    p = _plan(output_dir)
    src = _src(output_dir)
    sh = src.shards[shard]
    valid = storage.read_table(_w(output_dir, "valid", f"s{shard:05d}.parquet"))
    vrows = valid.column("row").to_numpy()
    vuids = _strings(valid.column("uid"))
    vhash = valid.column("hash").to_numpy()
    meta = _metadata(src, sh, vrows)
    cents = cluster.Centroids.load(_w(output_dir, "centroids.npz"))
    dev = _device(cfg, p)
    index = cents.index(dev)
    nb = p["buckets"]
    counts = np.zeros(nb, np.int64)
    schema = schemas.survivors(_carried(src))
    glob = cfg.dedup_scope == "global"
    if glob:     # rows also go, as visitors, to the buckets of clusters across their border
        schema = schema.append(pa.field("visit", pa.int32(), nullable=False))
        gram = cents.fine @ cents.fine.T if cents.k <= 8192 else None
    visitors = 0
    out = shuffle.ShardWriter(_w(output_dir, "assign", f"s{shard:05d}.arrow"), schema, p["dim"])
    try:
        for batch in src.batches(sh, cfg.batch_rows):
            lo, hi = np.searchsorted(vrows, [batch.start, batch.start + len(batch.img)])
            if lo == hi:
                continue
            local = vrows[lo:hi] - batch.start
            # the batch is a fresh float32 array: take and scale rows in place
            img = batch.img if hi - lo == len(batch.img) else batch.img[local]
            img = cluster.unit(img, out=img)
            lab, cos = cluster.assign(cents, img, index, normalized=True, device=dev)
            if batch.txt is not None:
                txt = batch.txt if hi - lo == len(batch.txt) else batch.txt[local]
                clip = np.einsum("ij,ij->i", img, cluster.unit(txt, out=txt)).astype(np.float32)
            else:
                clip = np.full(len(local), np.nan, np.float32)
            # rows grouped by bucket once, then each bucket's rows are a slice
            bucket = lab % nb
            order = np.argsort(bucket, kind="stable")
            img16 = to_float16(img[order])
            cols = {"uid": vuids.slice(lo, hi - lo).take(order),
                    "shard": np.full(len(order), shard, np.int32), "row": vrows[lo:hi][order],
                    "cluster": lab[order], "centroid_cos": cos[order], "clip_score": clip[order],
                    "uid_hash": vhash[lo:hi][order]}
            t = pa.table(cols)
            m = meta.slice(lo, hi - lo).take(pa.array(order))
            for f in m.column_names:
                t = t.append_column(f, m.column(f))
            if glob:
                t = t.append_column("visit", pa.array(np.full(len(order), -1, np.int32)))
                visitors += _add_visitors(out, cfg, schema, img, lab, cos, clip, cents, gram, nb,
                                          vuids.slice(lo, hi - lo), vrows[lo:hi], vhash[lo:hi],
                                          shard)
            sb = bucket[order]
            cuts = np.flatnonzero(np.r_[True, sb[1:] != sb[:-1], True])
            for s0, e0 in zip(cuts[:-1], cuts[1:]):
                b = int(sb[s0])
                out.add(b, t.slice(s0, e0 - s0), img16[s0:e0])
                counts[b] += int(e0 - s0)
        runs = out.close()
    except BaseException as e:
        out.abort(e)
        raise
    info = {"shard": shard, "rows": int(len(vrows)), "buckets_written": int((counts > 0).sum()),
            "runs": runs, "visitors": int(visitors)}
    storage.mark_done(_w(output_dir), name, info)
    return info


def _add_visitors(out, cfg, schema, img, lab, cos, clip, cents, gram, nb, uids, rows, hashes,
                  shard) -> int:
    """Copies of the rows near a cluster border, one per cluster they must be compared
    with (dedup.border_candidates), each sent to that cluster's bucket."""
    r, c = dedup.border_candidates(img, lab, cents.fine, cfg.threshold, gram)
    if not len(r):
        return 0
    vb = c % nb
    o = np.lexsort((r, vb))
    r, c, vb = r[o], c[o], vb[o]
    cols = {"uid": uids.take(pa.array(r)), "shard": np.full(len(r), shard, np.int32),
            "row": rows[r], "cluster": lab[r], "centroid_cos": cos[r], "clip_score": clip[r],
            "uid_hash": hashes[r]}
    t = pa.table(cols)
    for f in list(schema)[len(t.column_names):]:
        t = t.append_column(f.name, pa.array(c.astype(np.int32)) if f.name == "visit"
                            else pa.nulls(len(r), f.type))
    v16 = to_float16(img[r])
    cuts = np.flatnonzero(np.r_[True, vb[1:] != vb[:-1], True])
    for s0, e0 in zip(cuts[:-1], cuts[1:]):
        out.add(int(vb[s0]), t.slice(s0, e0 - s0), v16[s0:e0])
    return len(r)


def _metadata(src: EmbeddingSource, sh, rows: np.ndarray) -> pa.Table:
    """url, caption and the carried columns of the given rows, in the carried schema
    (text as strings: the rows are valid UTF-8; a column the shard lacks is null)."""
    carried = _carried(src)
    want = ["url", "caption"] + carried.names
    present = _shard_columns(sh)
    have = [c for c in want if c in present]
    m = src.metadata(sh, columns=have).take(pa.array(rows)) if have else None
    n = len(rows)
    cols = {}
    for f in list(schemas.survivors(carried))[len(schemas.ASSIGNMENTS):]:
        if m is not None and f.name in m.column_names:
            cols[f.name] = m.column(f.name).combine_chunks().cast(f.type)
        else:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table(cols)


def _shard_columns(sh) -> set[str]:
    fs, p = storage.filesystem(sh.meta)
    with fs.open(p, "rb") as f:
        return set(pq.ParquetFile(f).schema_arrow.names)


DEDUP_BUDGET = 1 << 30     # bytes of float16 vectors gathered at once (a group of clusters)
TOP_GROUPS, GROUP_MEMBERS = 8, 5   # duplicate groups the report shows, members of each


def stage_dedup(cfg: SelectConfig, source_dir: str, output_dir: str, bucket: int) -> dict:
    """Deduplicate every cluster of one bucket, exactly and over the whole cluster."""
    name = f"dedup-{bucket:05d}"
    if storage.is_done(_w(output_dir), name):
        return storage.done_info(_w(output_dir), name)
    p = _plan(output_dir)
    d = p["dim"]
    paths = [_w(output_dir, "assign", f"s{s:05d}.arrow") for s in range(p["shards"])]
    for s in range(p["shards"]):      # a bucket holds rows of every shard
        if not storage.is_done(_w(output_dir), f"assign-{s:05d}"):
            raise WarrenError(f"dedup of bucket {bucket} needs every shard assigned; shard {s} "
                              "is not (run the assign stage first)")
    runs = [storage.done_info(_w(output_dir), f"assign-{s:05d}")["runs"] for s in range(p["shards"])]
    bk = shuffle.Bucket(paths, runs, bucket)
    src_schema = schemas.survivors(_carried(_src(output_dir)))
    glob = cfg.dedup_scope == "global"
    t = bk.table if bk.table is not None else src_schema.empty_table()
    rows_of = np.arange(t.num_rows)           # member row -> row of the bucket's files
    vrows = vcl = np.zeros(0, np.int64)
    if glob and bk.table is not None:
        vis = t.column("visit").to_numpy()
        rows_of, vrows = np.flatnonzero(vis < 0), np.flatnonzero(vis >= 0)
        vrows = vrows[np.argsort(vis[vrows], kind="stable")]     # visitors by visited cluster
        vcl = vis[vrows]
        t = t.take(pa.array(rows_of)).drop_columns(["visit"])
    st = dedup.PairStats()
    cross = dedup.PairStats()
    edges_a, edges_b = [], []
    uid_col = _strings(t.column("uid"))
    cl = t.column("cluster").to_numpy()
    cos = t.column("centroid_cos").to_numpy()
    # Arrow sorts the strings; below, a row's rank in this order stands in for its uid
    # (same order inside a cluster) so no Python string is made per row.
    order = pc.sort_indices(pa.table({"c": cl, "u": uid_col}),
                            [("c", "ascending"), ("u", "ascending")]).to_numpy()
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    kept = np.arange(len(order))
    starts = np.flatnonzero(np.r_[True, cl[order][1:] != cl[order][:-1]]) if len(order) else \
        np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(order)].astype(np.int64)
    dev = _device(cfg, p)
    t0 = time.perf_counter()
    largest = int((ends - starts).max()) if len(starts) else 0
    # clusters in groups of about DEDUP_BUDGET bytes of vectors: one pass over the shard
    # files per group (a single bigger cluster is a group of its own)
    per_row = 2 * d
    g0 = 0
    while g0 < len(starts):
        g1 = g0 + 1
        while g1 < len(starts) and (ends[g1] - starts[g0]) * per_row <= DEDUP_BUDGET:
            g1 += 1
        base = starts[g0]
        members = ends[g1 - 1] - base
        want = rows_of[order[base:ends[g1 - 1]]]
        if glob and len(vrows):     # the visitors of these clusters, in the same pass
            c_lo, c_hi = cl[order[base]], cl[order[ends[g1 - 1] - 1]]
            v0, v1 = np.searchsorted(vcl, [c_lo, c_hi + 1])
            want = np.r_[want, vrows[v0:v1]]
        vecs = bk.vectors(want, d)
        for s0, e0 in zip(starts[g0:g1], ends[g0:g1]):
            idx = order[s0:e0]
            x = vecs[s0 - base:e0 - base]
            if glob and len(vrows):
                a0, a1 = np.searchsorted(vcl[v0:v1], [cl[idx[0]], cl[idx[0]] + 1])
                if a1 > a0:
                    i, j = dedup.cross_edges(vecs[members + a0:members + a1], x, cfg.threshold,
                                             cfg.block, cross)
                    edges_a.append(vrows[v0 + a0 + i])     # visitor's row in the bucket files
                    edges_b.append(idx[j])                 # member's row in `t`
            if cfg.policy == "bunny":
                lab = dedup.components(x, cfg.threshold, cfg.block, cfg.method, st,
                                       device=None if dev == "faiss" else dev)
                # `random` hashes the component's smallest uid, so it needs the strings
                names = (np.asarray(uid_col.take(idx).to_pylist(), dtype=object)
                         if cfg.keep == "random" else rank[idx])
                k_local = dedup.choose(lab, cos[idx], names, cfg.keep, cfg.seed)
            else:
                eps = cfg.eps if cfg.eps is not None else 1.0 - cfg.threshold
                k_local = dedup.semdedup(x, cos[idx], rank[idx], eps, cfg.keep, cfg.block, st)
            kept[idx] = idx[k_local]
        del vecs
        g0 = g1
    seconds = time.perf_counter() - t0
    survive = kept == np.arange(len(order))
    surv = t.filter(pa.array(survive))
    surv = surv.take(pc.sort_indices(surv, [("uid", "ascending")]))     # a run of the merge
    storage.write_table(surv, _w(output_dir, "dedup", f"b{bucket:05d}.parquet"), src_schema,
                        row_group_size=merge.RUN_ROWS)
    drop = np.flatnonzero(~survive)
    rej = _rejects(uid_col.take(drop), "dedup", "duplicate", uid_col.take(kept[drop]))
    rej = rej.take(pc.sort_indices(rej, [("uid", "ascending")]))
    storage.write_table(rej, _w(output_dir, "rejects", f"dedup-b{bucket:05d}.parquet"),
                        schemas.REJECTS, row_group_size=merge.RUN_ROWS)
    if glob:
        _write_links(output_dir, bucket, bk, t, kept, edges_a, edges_b)
    ids, sizes = np.unique(cl, return_counts=True)
    info = {"bucket": bucket, "rows": int(len(order)), "kept": int(survive.sum()),
            "largest_cluster": int(largest), "seconds": round(seconds, 4),
            **dataclasses.asdict(st), "clusters": [ids.tolist(), sizes.tolist()],
            "cross": dataclasses.asdict(cross) if glob else None,
            **_top_groups(kept, drop, uid_col)}
    storage.mark_done(_w(output_dir), name, info)
    return info


def gid(shard: np.ndarray, row: np.ndarray) -> np.ndarray:
    """One int64 per input row: (shard, row) packed (shards < 2^23, rows < 2^40)."""
    return (np.asarray(shard, np.int64) << np.int64(40)) | np.asarray(row, np.int64)


def _write_links(output_dir, bucket, bk, t, kept, edges_a, edges_b) -> None:
    """What the finish needs to join components across buckets: the cross-border edges
    found here (visitor, member) and every member's local component (its kept row)."""
    g = gid(t.column("shard").to_numpy(), t.column("row").to_numpy())
    ea = np.concatenate(edges_a) if edges_a else np.zeros(0, np.int64)
    eb = np.concatenate(edges_b) if edges_b else np.zeros(0, np.int64)
    if len(ea):
        full = bk.table
        ga = gid(full.column("shard").to_numpy()[ea], full.column("row").to_numpy()[ea])
    else:
        ga = np.zeros(0, np.int64)
    storage.write_table(pa.table({"a": pa.array(ga, pa.int64()), "b": pa.array(g[eb], pa.int64())}),
                        _w(output_dir, "dedup", f"edges-b{bucket:05d}.parquet"))
    storage.write_table(pa.table({"gid": pa.array(g, pa.int64()), "comp": pa.array(g[kept], pa.int64()),
                                  "uid": _strings(t.column("uid")),
                                  "centroid_cos": t.column("centroid_cos")}),
                        _w(output_dir, "dedup", f"labels-b{bucket:05d}.parquet"),
                        row_group_size=merge.RUN_ROWS)


def _top_groups(kept: np.ndarray, drop: np.ndarray, uid_col: pa.Array) -> dict:
    """The largest duplicate groups of a bucket (by rows dropped, then kept uid), with
    their smallest dropped uids: what the report shows, without reading the rejects."""
    if not len(drop):
        return {"groups": 0, "dropped": 0, "top_groups": []}
    heads, count = np.unique(kept[drop], return_counts=True)
    cut = np.sort(count)[::-1][min(TOP_GROUPS, len(count)) - 1]
    cand = np.flatnonzero(count >= cut)
    names = uid_col.take(pa.array(heads[cand])).to_pylist()
    best = sorted(zip((-count[cand]).tolist(), names, heads[cand].tolist()))[:TOP_GROUPS]
    top = []
    for neg, name, head in best:
        members = uid_col.take(pa.array(drop[kept[drop] == head]))
        members = members.take(pc.sort_indices(members)).slice(0, GROUP_MEMBERS).to_pylist()
        top.append({"kept_uid": name, "dropped": -neg, "members": members})
    return {"groups": int(len(heads)), "dropped": int(len(drop)), "top_groups": top}


# Codes of a dedup survivor in the finish stage (one int8 per row, kept on disk).
ALIVE, CLIP_ABOVE, CLIP_BELOW, CENT_ABOVE, CENT_BELOW, NOT_SAMPLED = range(6)
CODE_STAGE = {CLIP_ABOVE: ("clip_band", bands.ABOVE), CLIP_BELOW: ("clip_band", bands.BELOW),
              CENT_ABOVE: ("centroid_band", bands.ABOVE),
              CENT_BELOW: ("centroid_band", bands.BELOW), NOT_SAMPLED: ("sample", "not_sampled")}
HIST_BINS = 60
SAMPLES = 24          # coreset rows the report shows


class _Survivors:
    """The dedup survivors, bucket by bucket (files sorted by uid), with each row's
    finish code in a small file next to it: the finish never holds more than a bucket."""

    def __init__(self, output_dir: str, buckets: int):
        self.files = [_w(output_dir, "dedup", f"b{b:05d}.parquet") for b in range(buckets)]
        self.codes = [_w(output_dir, "finish", f"codes-b{b:05d}.npy") for b in range(buckets)]
        self.rows = [pq.ParquetFile(storage.filesystem(f)[1]).metadata.num_rows
                     if storage.is_local(f) else storage.read_table(f, ["uid"]).num_rows
                     for f in self.files]
        for path, n in zip(self.codes, self.rows):
            self.save(path, np.zeros(n, np.int8))

    @staticmethod
    def save(path: str, codes: np.ndarray) -> None:
        with storage.atomic_open(path, "wb", durable=False) as f:   # scratch of this finish
            np.save(f, codes)

    @staticmethod
    def load(path: str) -> np.ndarray:
        fs, p = storage.filesystem(path)
        with fs.open(p, "rb") as f:
            return np.load(f)

    def groups(self, columns: list[str]):
        """(bucket, its codes, first row, the row group's `columns`, read) per row group of
        each bucket, `read(names)` reading other columns of the same row group (valid until
        the next one): memory follows the row group (merge.RUN_ROWS rows), not the bucket."""
        for b in range(len(self.files)):
            codes = self.load(self.codes[b])
            fs, path = storage.filesystem(self.files[b])
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                at = 0
                for i in range(pf.num_row_groups):
                    t = pf.read_row_group(i, columns=columns)
                    yield b, codes, at, t, lambda names, i=i, pf=pf: pf.read_row_group(i, names)
                    at += t.num_rows

    def each(self, columns: list[str], save: bool = False):
        """(codes of the bucket, {column: numpy of the row group's ALIVE rows}, their row
        indices in the bucket, uids_of) per row group; `save` writes each bucket's codes
        back after its last row group (the caller changed them in place)."""
        last = None
        for b, codes, at, t, read in self.groups(columns):
            if save and last is not None and last[0] != b:
                self.save(self.codes[last[0]], last[1])
            last = (b, codes)
            here = np.flatnonzero(codes[at:at + t.num_rows] == ALIVE)
            if not len(here):
                continue
            cols = {c: t.column(c).combine_chunks().to_numpy(zero_copy_only=False)[here]
                    for c in columns}
            yield codes, cols, at + here, lambda rows, read=read, here=here: \
                _strings(read(["uid"]).column(0)).take(pa.array(here[rows]))
        if save and last is not None:
            self.save(self.codes[last[0]], last[1])


def _band_pass(sv: _Survivors, col: str, rng, above: int, below: int) -> dict:
    """One chained band over the ALIVE rows, exactly as `bands.band` ranks them (score
    descending, ties by uid, ranks [floor(lo n), floor(hi n)) kept), without holding
    them: the two boundary rows by radix selection, then each row compared with them."""
    n = sum(int((sv.load(c) == ALIVE).sum()) for c in sv.codes)
    a, b = int(np.floor(rng[0] * n)), int(np.floor(rng[1] * n))

    def chunks():
        for _, cols, _, uids_of in sv.each([col]):
            yield ranks.score_keys(cols[col]), uids_of
    lo, hi = ranks.boundaries(chunks, n, [a, b], 32)
    vmin, vmax = np.inf, -np.inf
    for codes, cols, alive, uids_of in sv.each([col], save=True):
        keys = ranks.score_keys(cols[col])
        before_lo, before_hi = lo.before(keys, uids_of), hi.before(keys, uids_of)
        codes[alive[before_lo]] = above
        codes[alive[~before_hi]] = below
        v = cols[col][np.isfinite(cols[col])]
        if len(v):
            vmin, vmax = min(vmin, float(v.min())), max(vmax, float(v.max()))
    # a histogram of the band's input (and the span it kept) for the report
    edges = np.linspace(vmin, vmax, HIST_BINS + 1) if np.isfinite(vmin) else None
    hist, kmin, kmax = np.zeros(HIST_BINS, np.int64), np.inf, -np.inf
    for _, codes, at, t, _ in sv.groups([col]):
        c = codes[at:at + t.num_rows]
        vals = t.column(0).combine_chunks().to_numpy(zero_copy_only=False)
        v = vals[(c == ALIVE) | (c == above) | (c == below)]
        fin = np.isfinite(v)
        if edges is not None and fin.any():
            hist += np.histogram(v[fin], bins=edges)[0]
        k = vals[c == ALIVE]
        k = k[np.isfinite(k)]
        if len(k):
            kmin, kmax = min(kmin, float(k.min())), max(kmax, float(k.max()))
    return {"in": n, "out": b - a, "ranks": [a, b],
            "edges": None if edges is None else edges.tolist(), "counts": hist.tolist(),
            "kept_span": [kmin, kmax] if np.isfinite(kmin) else None}


def _sample_pass(sv: _Survivors, target: int | None, seed: int) -> dict:
    """The `target` rows with the smallest seeded hash (ties by uid), as `bands.sample`."""
    m = sum(int((sv.load(c) == ALIVE).sum()) for c in sv.codes)
    if target is None or target >= m:
        return {"in": m, "out": m}

    def keys_of(cols):
        return bands.mix(cols["uid_hash"].view(np.uint64), seed)

    def chunks():
        for _, cols, _, uids_of in sv.each(["uid_hash"]):
            yield keys_of(cols), uids_of
    (cut,) = ranks.boundaries(chunks, m, [target], 64)
    for codes, cols, alive, uids_of in sv.each(["uid_hash"], save=True):
        codes[alive[~cut.before(keys_of(cols), uids_of)]] = NOT_SAMPLED
    return {"in": m, "out": target}


def _link(cfg: SelectConfig, output_dir: str, p: dict) -> dict:
    """Dedup scope "global": join the per-cluster components along the cross-border edges
    the dedup buckets found, choose one kept member per joined component (the keep rule
    over all its members), and rewrite the buckets whose decisions change. Holds only the
    edges and the rows of joined components (duplicates across borders: few)."""
    nb = p["buckets"]
    edges = [storage.read_table(_w(output_dir, "dedup", f"edges-b{b:05d}.parquet")) for b in range(nb)]
    a = np.concatenate([e.column("a").to_numpy() for e in edges])
    b = np.concatenate([e.column("b").to_numpy() for e in edges])
    info = {"edges": int(len(a)), "joined_components": 0, "rows_changed": 0}
    if not len(a):
        return info
    ends = np.unique(np.r_[a, b])

    def labels(bkt, cols=("gid", "comp", "uid", "centroid_cos")):
        return storage.read_table(_w(output_dir, "dedup", f"labels-b{bkt:05d}.parquet"), list(cols))
    comp_of = {}
    for bkt in range(nb):
        t = labels(bkt, ("gid", "comp"))
        g = t.column("gid").to_numpy()
        hit = np.isin(g, ends)
        comp_of.update(zip(g[hit].tolist(), t.column("comp").to_numpy()[hit].tolist()))
    ca = np.asarray([comp_of[x] for x in a.tolist()], np.int64)
    cb = np.asarray([comp_of[x] for x in b.tolist()], np.int64)
    diff = ca != cb
    if not diff.any():
        return info
    nodes, inv = np.unique(np.r_[ca[diff], cb[diff]], return_inverse=True)
    m = int(diff.sum())
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    _, grp = connected_components(coo_matrix((np.ones(m, np.int8), (inv[:m], inv[m:])),
                                             shape=(len(nodes), len(nodes))), directed=False)
    # the members of the joined components, wherever they are
    rows = []
    for bkt in range(nb):
        t = labels(bkt)
        c = t.column("comp").to_numpy()
        hit = np.flatnonzero(np.isin(c, nodes))
        if len(hit):
            rows.append(pa.table({"gid": t.column("gid").take(hit), "uid": t.column("uid").take(hit),
                                  "cos": t.column("centroid_cos").take(hit),
                                  "comp": pa.array(c[hit], pa.int64()),
                                  "group": grp[np.searchsorted(nodes, c[hit])],
                                  "bucket": np.full(len(hit), bkt, np.int32)}))
    j = pa.concat_tables(rows)
    uids = np.asarray(j.column("uid").to_pylist(), dtype=object)
    group = j.column("group").to_numpy()
    kept = dedup.choose(group, j.column("cos").to_numpy(), uids, cfg.keep, cfg.seed)
    final = dict(zip(j.column("gid").to_numpy().tolist(), kept.tolist()))
    g_all = j.column("gid").to_numpy()
    info["joined_components"] = int(len(np.unique(grp)))
    for bkt in np.unique(j.column("bucket").to_numpy()):
        info["rows_changed"] += _settle(cfg, output_dir, p, int(bkt), final, g_all, uids)
    # the joined groups for the report, and the local groups they absorbed
    comp = j.column("comp").to_numpy()
    cu, cn = np.unique(comp, return_counts=True)
    gid_to_row = {x: i for i, x in enumerate(g_all.tolist())}
    absorbed = {uids[gid_to_row[c]] for c in cu[cn > 1].tolist() if c in gid_to_row}
    groups = []
    for gidx in np.unique(group):
        at = np.flatnonzero(group == gidx)
        head = kept[at[0]]
        dropped = sorted(uids[r] for r in at if kept[r] != r)
        groups.append({"kept_uid": uids[head], "dropped": len(dropped),
                       "members": dropped[:GROUP_MEMBERS]})
    info["groups"], info["absorbed"] = groups, sorted(absorbed)
    return info


def _settle(cfg, output_dir, p, bucket, final, g_all, uids) -> int:
    """Rewrite one bucket's survivors and duplicate rejects with the joined components'
    choices (rows read again from the shuffle, so a rerun rewrites the same bytes)."""
    paths = [_w(output_dir, "assign", f"s{s:05d}.arrow") for s in range(p["shards"])]
    runs = [storage.done_info(_w(output_dir), f"assign-{s:05d}")["runs"] for s in range(p["shards"])]
    bk = shuffle.Bucket(paths, runs, bucket)
    t = bk.table
    t = t.filter(pc.less(t.column("visit"), 0)).drop_columns(["visit"])
    lab = storage.read_table(_w(output_dir, "dedup", f"labels-b{bucket:05d}.parquet"))
    g = gid(t.column("shard").to_numpy(), t.column("row").to_numpy())
    lg = lab.column("gid").to_numpy()
    pos = np.argsort(lg)
    at = pos[np.searchsorted(lg, g, sorter=pos)]
    comp = lab.column("comp").to_numpy()[at]                  # local kept row, as gid
    uid_col = _strings(t.column("uid"))
    # the kept member's uid: local components stay in the bucket; joined ones anywhere
    local_uid = dict(zip(g.tolist(), uid_col.to_pylist()))
    kept_uid, changed = [], 0
    for r, (gg, cc) in enumerate(zip(g.tolist(), comp.tolist())):
        if gg in final:
            ku = uids[final[gg]]
            changed += int(ku != local_uid[cc])
        else:
            ku = local_uid[cc]
        kept_uid.append(ku)
    kept_uid = pa.array(kept_uid, pa.string())
    survive = pc.equal(kept_uid, uid_col)
    carried = _carried(_src(output_dir))
    surv = t.filter(survive)
    surv = surv.take(pc.sort_indices(surv, [("uid", "ascending")]))
    storage.write_table(surv, _w(output_dir, "dedup", f"b{bucket:05d}.parquet"),
                        schemas.survivors(carried), row_group_size=merge.RUN_ROWS)
    drop = pc.invert(survive)
    rej = _rejects(uid_col.filter(drop), "dedup", "duplicate", kept_uid.filter(drop))
    rej = rej.take(pc.sort_indices(rej, [("uid", "ascending")]))
    storage.write_table(rej, _w(output_dir, "rejects", f"dedup-b{bucket:05d}.parquet"),
                        schemas.REJECTS, row_group_size=merge.RUN_ROWS)
    return changed


def stage_finish(cfg: SelectConfig, source_dir: str, output_dir: str,
                 extra_rejects: Sequence[str] = ()) -> dict:
    """Chained bands, seeded sample, then coreset.parquet, rejects.parquet, centroids.npy,
    stats.json and manifest.json. Checks that every input uid lands in exactly one table.

    Streaming: ranks come from radix selection over the per-bucket survivor files
    (pipelines/ranks.py), and both tables are external merges of per-bucket runs sorted
    by uid (pipelines/merge.py), so memory does not grow with the row count. The outputs
    are byte-identical to ranking and sorting everything in memory."""
    p = _plan(output_dir)
    # the input must still be the one the run was planned on: the manifest names it
    runkey.check_same(p.get("input"), _input_key(source_dir), str(output_dir))
    src = _src(output_dir)
    carried = _carried(src)
    core_schema, surv_schema = schemas.coreset(carried), schemas.survivors(carried)
    work = _w(output_dir, "finish")
    storage.remove_temporaries(work)
    linked = _link(cfg, output_dir, p) if cfg.dedup_scope == "global" else None
    sv = _Survivors(output_dir, p["buckets"])
    funnel, band_info = {}, {}
    for stage, col, rng, above, below in (
            ("clip_band", "clip_score", cfg.clip_band, CLIP_ABOVE, CLIP_BELOW),
            ("centroid_band", "centroid_cos", cfg.centroid_band, CENT_ABOVE, CENT_BELOW)):
        if rng is None:
            n = sum(int((sv.load(c) == ALIVE).sum()) for c in sv.codes)
            funnel[stage] = {"in": n, "out": n}
            continue
        band_info[stage] = _band_pass(sv, col, rng, above, below)
        funnel[stage] = {"in": band_info[stage]["in"], "out": band_info[stage]["out"]}
    funnel["sample"] = _sample_pass(sv, cfg.target, cfg.seed)

    # per bucket, a row group at a time: the kept rows and the band/sample rejects, both
    # already in uid order (the survivor files are); the dedup rejects are a run as they are
    core_runs, rej_runs = [], []
    names = [None] + [CODE_STAGE[c] for c in range(1, NOT_SAMPLED + 1)]
    stages = pa.array([n[0] if n else None for n in names], pa.string())
    reasons = pa.array([n[1] if n else None for n in names], pa.string())
    for b in range(len(sv.files)):
        codes = sv.load(sv.codes[b])
        core_runs.append(storage.join(work, f"core-b{b:05d}{merge.RUN_SUFFIX}"))
        rej_runs += [storage.join(work, f"rej-b{b:05d}{merge.RUN_SUFFIX}"),
                     _w(output_dir, "rejects", f"dedup-b{b:05d}.parquet")]
        fs, path = storage.filesystem(sv.files[b])
        with fs.open(path, "rb") as f, \
                merge.RunWriter(core_runs[-1], core_schema, merge.WIDE_RUN_ROWS) as wc, \
                merge.RunWriter(rej_runs[-2], schemas.REJECTS) as wr:
            pf = pq.ParquetFile(f)
            at = 0
            for i in range(pf.num_row_groups):
                t = pf.read_row_group(i).cast(surv_schema)
                c = codes[at:at + t.num_rows]
                at += t.num_rows
                wc.write(t.filter(pa.array(c == ALIVE)))
                out = np.flatnonzero(c != ALIVE)
                if len(out):
                    cc = pa.array(c[out].astype(np.int64))
                    wr.write(pa.table({"uid": t.column("uid").take(pa.array(out)),
                                       "stage": stages.take(cc), "reason": reasons.take(cc),
                                       "kept_uid": pa.nulls(len(out), pa.string())},
                                      schema=schemas.REJECTS))
    rej_runs += [_w(output_dir, "rejects", f"validate-s{s:05d}.parquet") for s in range(p["shards"])]
    for i, f in enumerate(extra_rejects):         # curate's download/embed rejects
        t = storage.read_table(f, schema=schemas.REJECTS)
        rej_runs.append(storage.join(work, f"extra-{i:05d}{merge.RUN_SUFFIX}"))
        with merge.RunWriter(rej_runs[-1], schemas.REJECTS) as w:
            w.write(t.take(pc.sort_indices(t, [("uid", "ascending"), ("stage", "ascending")])))
    release_memory()

    core_path = storage.join(output_dir, "coreset.parquet")
    rej_path = storage.join(output_dir, "rejects.parquet")
    # rows spread evenly over the coreset, kept for the report as the merge passes them
    n_kept = funnel["sample"]["out"]
    picks = np.unique(np.linspace(0, n_kept - 1, min(SAMPLES, n_kept)).astype(np.int64))
    samples: list[dict] = []
    seen = [0]

    def pick(t: pa.Table) -> None:
        here = picks[(picks >= seen[0]) & (picks < seen[0] + t.num_rows)] - seen[0]
        if len(here):
            samples.extend(t.select(["uid", "caption", "clip_score"]).take(pa.array(here))
                           .to_pylist())
        seen[0] += t.num_rows
    n_core = merge.merge(core_runs, core_path, ["uid"], core_schema, work, on_chunk=pick,
                         row_group_size=merge.WIDE_OUTPUT_ROWS, run_rows=merge.WIDE_RUN_ROWS)
    by_reason: dict[str, dict[str, int]] = {}

    def count(t: pa.Table) -> None:
        for r in t.group_by(["stage", "reason"]).aggregate([([], "count_all")]).to_pylist():
            d = by_reason.setdefault(r["stage"], {})
            d[r["reason"]] = d.get(r["reason"], 0) + r["count_all"]
    n_rej = merge.merge(rej_runs, rej_path, ["uid", "stage"], schemas.REJECTS, work, on_chunk=count)
    extra_rows = sum(pq.ParquetFile(storage.filesystem(f)[1]).metadata.num_rows
                     if storage.is_local(f) else storage.read_table(f, ["uid"]).num_rows
                     for f in extra_rejects)
    _check_accounting(core_path, rej_path, n_core, n_rej, p["rows"] + extra_rows)
    storage.remove_temporaries(work)

    cents = cluster.Centroids.load(_w(output_dir, "centroids.npz"))
    with storage.atomic_open(storage.join(output_dir, "centroids.npy")) as f:
        np.save(f, cents.fine)
    stats = _stats(output_dir, p, n_rej, by_reason, funnel, n_core, cfg)
    stats["funnel"]["dedup"] = int(sum(sv.rows))         # after any cross-border joins
    stats["dedup_groups"] = _groups(output_dir, p, stats["funnel"], linked)
    if linked is not None:
        stats["dedup"]["cross_border"] = {k: v for k, v in linked.items()
                                          if k not in ("groups", "absorbed")}
    stats["bands"] = band_info
    stats["samples"] = samples
    storage.write_json(storage.join(output_dir, "stats.json"), stats)
    base = str(output_dir)
    manifest.write(storage.join(base, "manifest.json"),
                   {"coreset": core_path, "rejects": rej_path},
                   config={"select": cfg.to_dict(), "source": str(source_dir),
                           "input": {k: {f: v[f] for f in ("files", "bytes", "digest")}
                                     for k, v in (p.get("input") or _input_key(source_dir)).items()}})
    # the per-bucket runs are no longer needed (codes stay: the report reads none of them)
    for f in core_runs + rej_runs:
        if f.startswith(work):
            fs, q = storage.filesystem(f)
            if fs.exists(q):
                fs.rm(q)
    return stats


def _groups(output_dir: str, p: dict, funnel: dict, linked: dict | None) -> dict:
    """Duplicate groups for the report: each bucket's largest, merged; with a global
    dedup scope, the groups joined across borders replace the local ones they absorbed."""
    ded = [storage.done_info(_w(output_dir), f"dedup-{b:05d}") for b in range(p["buckets"])]
    tops = [t for d in ded for t in d.get("top_groups", [])]
    n = sum(d.get("groups", 0) for d in ded)
    if linked and linked.get("groups"):
        gone = set(linked["absorbed"])
        tops = [t for t in tops if t["kept_uid"] not in gone] + linked["groups"]
        n += len(linked["groups"]) - len(gone)
    tops.sort(key=lambda t: (-t["dropped"], t["kept_uid"]))
    return {"groups": int(n), "dropped": int(funnel["valid"] - funnel["dedup"]),
            "top_groups": tops[:TOP_GROUPS]}


def _check_accounting(core_path: str, rej_path: str, n_core: int, n_rej: int,
                      expected: int) -> None:
    """Every input row is in exactly one table: counts add up and no uid appears twice,
    compared as strings (not 64-bit hashes, which collide at LAION-2B's scale) on the
    merged uid order of both files, a few thousand rows at a time."""
    last: list = [None]
    twice = [False]

    def check(t: pa.Table) -> None:
        u = _strings(t.column("uid"))
        if last[0] is not None and len(u) and u[0].as_py() == last[0]:
            twice[0] = True
        if len(u) > 1 and pc.any(pc.equal(u.slice(1), u.slice(0, len(u) - 1))).as_py():
            twice[0] = True
        if len(u):
            last[0] = u[len(u) - 1].as_py()
    for t in merge.merged([core_path, rej_path], ["uid"], ["uid"]):
        check(t)
    if n_core + n_rej != expected or twice[0]:
        raise WarrenError(f"accounting broken: {n_core} kept + {n_rej} rejected != {expected} "
                          "input rows (or a uid is in both); this is a bug")


def _stats(output_dir, p, n_rej, by_reason, funnel, coreset_rows, cfg) -> dict:
    work = _w(output_dir)
    done = lambda prefix, n: [storage.done_info(work, f"{prefix}-{i:05d}") for i in range(n)]  # noqa: E731
    val = done("validate", p["shards"])
    ded = done("dedup", p["buckets"])
    pair = {k: sum(d[k] for d in ded) for k in ("pairs", "flops", "blocks", "skipped_blocks",
                                                 "rechecked", "edges")}
    valid = sum(v["valid"] for v in val)
    dedup_kept = sum(d["kept"] for d in ded)
    return {
        "input_rows": p["rows"], "shards": p["shards"], "k": p["k"], "buckets": p["buckets"],
        "coreset_rows": int(coreset_rows), "rejected_rows": int(n_rej),
        "funnel": {"input": p["rows"], "valid": valid, "dedup": dedup_kept,
                   "clip_band": funnel["clip_band"]["out"],
                   "centroid_band": funnel["centroid_band"]["out"], "sample": funnel["sample"]["out"]},
        "rejects_by_stage": {k: dict(sorted(v.items())) for k, v in sorted(by_reason.items())},
        "train": storage.done_info(work, "train"),
        "dedup": {"seconds": round(sum(d["seconds"] for d in ded), 3),
                  "largest_cluster": max([d["largest_cluster"] for d in ded] or [0]), **pair},
        "config": cfg.to_dict(), "code_version": manifest.code_version(),
    }


def _cpu_seconds() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_gb() -> float:
    """This process's peak resident set, GB. Linux's VmHWM belongs to this process's own
    memory map; getrusage's ru_maxrss also counts the parent's peak when the process was
    started by vfork/posix_spawn (as subprocess does), which made small runs look big."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def release_memory(collect: bool = False) -> None:
    """Hand freed heap back to the OS. glibc keeps freed small blocks (uid strings, Arrow
    buffers below its mmap threshold) mapped, so without this each stage's peak stacks
    on what the previous stage left behind and RSS grows with the row count. `collect`
    runs the cycle collector first (0.1-0.7 s with torch loaded: so only before the
    finish; the stages make few reference cycles)."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: nothing to trim
        pass


def run(cfg: SelectConfig, source_dir: str, output_dir: str, progress: bool = True,
        extra_rejects: Sequence[str] = (), *, restart: bool = False) -> dict:
    """All stages in this process, in order; resumes a killed run in the same folder
    (`restart`: deletes that run first)."""
    from tqdm import tqdm

    def steps(desc, n):
        return tqdm(range(n), desc=desc, unit=desc.split()[-1], disable=not progress,
                    mininterval=0.5, leave=False)

    def each_shard(desc, stage):
        # Two shards at a time: numpy, Arrow and faiss release the GIL, and a shard's
        # outputs are its own files, so the result does not depend on the interleaving.
        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            jobs = [pool.submit(stage, cfg, source_dir, output_dir, i) for i in range(p["shards"])]
            for job in tqdm(as_completed(jobs), total=len(jobs), desc=desc, unit="shard",
                            disable=not progress, mininterval=0.5, leave=False):
                job.result()

    t0 = time.perf_counter()
    p = plan(cfg, source_dir, output_dir, restart=restart)
    timings, peaks, cpu = {}, {}, {}
    s, c = time.perf_counter(), _cpu_seconds()
    each_shard("validate shard", stage_validate)
    timings["validate"] = time.perf_counter() - s
    cpu["validate"] = _cpu_seconds() - c
    peaks["validate"] = _peak_rss_gb()
    release_memory()
    s, c = time.perf_counter(), _cpu_seconds()
    stage_train(cfg, source_dir, output_dir)
    timings["train"] = time.perf_counter() - s
    cpu["train"] = _cpu_seconds() - c
    peaks["train"] = _peak_rss_gb()
    release_memory()
    s, c = time.perf_counter(), _cpu_seconds()
    each_shard("assign shard", stage_assign)
    timings["assign"] = time.perf_counter() - s
    cpu["assign"] = _cpu_seconds() - c
    peaks["assign"] = _peak_rss_gb()
    release_memory()
    s, c = time.perf_counter(), _cpu_seconds()
    for b in steps("dedup bucket", p["buckets"]):
        stage_dedup(cfg, source_dir, output_dir, b)
        release_memory()
    timings["dedup"] = time.perf_counter() - s
    cpu["dedup"] = _cpu_seconds() - c
    peaks["dedup"] = _peak_rss_gb()
    release_memory(collect=True)
    s, c = time.perf_counter(), _cpu_seconds()
    stats = stage_finish(cfg, source_dir, output_dir, extra_rejects)
    timings["finish"] = time.perf_counter() - s
    cpu["finish"] = _cpu_seconds() - c
    peaks["finish"] = _peak_rss_gb()
    release_memory()
    stats["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    stats["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    # CPU seconds (all threads) per stage: what the rates in docs/scale.md are made of,
    # steady on a busy machine where wall time is not
    stats["cpu_seconds"] = {k: round(v, 3) for k, v in cpu.items()}
    # the process's peak RSS as of the end of each stage: where it rises is the stage
    # that set it (RSS is measured, not estimated)
    stats["peak_rss_gb"] = {k: round(v, 3) for k, v in peaks.items()}
    storage.write_json(storage.join(output_dir, "stats.json"), stats)
    return stats
