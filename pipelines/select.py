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

import contextlib
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

from pipelines import bands, cluster, dedup, manifest, runkey, schemas, storage
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
    buckets: int | None = None           # dedup work units; None: min(k, 64)
    train_sample: int | None = None      # k-means training rows; None: max(50k, 64k) capped at n
    niter: int = 20
    two_level: Literal["auto", "on", "off"] = "auto"
    flat_max_k: int = 4096               # auto: two-level k-means above this k
    nprobe: int = 8
    batch_rows: int = 16_384
    block: int = dedup.BLOCK
    method: Literal["int8", "float32", "baseline"] = "int8"   # baseline: for bench/ only

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


def _input_key(source_dir: str) -> dict:
    """The input's fingerprint (file list, sizes, mtimes) under one fixed key, so the same
    folder named another way (relative, trailing slash) is the same input."""
    return {"input": next(iter(runkey.fingerprint([str(source_dir)]).values()))}


def _source(cfg: SelectConfig, src: str) -> EmbeddingSource:
    return open_source(src, cfg.uid_column)


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
        cfg_now = json.loads(json.dumps(cfg.to_dict()))
        if old.get("config") != cfg_now:
            diff = sorted(k for k in set(cfg_now) | set(old.get("config") or {})
                          if (old.get("config") or {}).get(k) != cfg_now.get(k))
            raise ConfigError(f"{output_dir} holds a run with another config (differs in "
                              f"{', '.join(diff)}); pass --restart to start over, or choose "
                              "another output folder", source="select")
        runkey.check_same(old.get("input"), fp, str(output_dir))
    src = _source(cfg, source_dir)
    if cfg.clip_band is not None and not src.has_text:
        raise ConfigError("the clip-score band needs text embeddings and the source has none "
                          f"(no text_emb/ or txt_emb column): pass {_hint('select.clip_band', 'none')}",
                          source=source_dir)
    k = cfg.k or max(1, int(round(src.rows / cfg.avg_cluster)))
    p = {"source": str(source_dir), "layout": src.layout, "shards": len(src.shards),
         "rows": src.rows, "dim": src.dim, "has_text": src.has_text, "k": k,
         "buckets": min(k, cfg.buckets or 64),
         "config": json.loads(json.dumps(cfg.to_dict())), "input": fp}
    storage.remove_temporaries(_w(output_dir))
    if old is not None:
        if old.get("rows") != p["rows"]:    # an old plan without a fingerprint
            raise ConfigError(f"{output_dir} holds a run of {old.get('rows')} input rows, not "
                              f"{p['rows']}; pass --restart to start over", source="select")
        return old
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
    src = _source(cfg, source_dir)
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
    storage.write_table(rej, _w(output_dir, "rejects", f"validate-s{shard:05d}.parquet"),
                        schemas.REJECTS)
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
    src = _source(cfg, source_dir)
    tables = _valid_tables(output_dir, p["shards"])
    _check_unique(tables, src)
    n_valid = sum(t.num_rows for t in tables)
    k = p["k"]
    if n_valid < k:
        raise InputError(f"only {n_valid} valid rows for k={k} clusters; lower "
                         f"{setting('select.k')}", path=source_dir)
    size = min(n_valid, cfg.train_sample or max(50_000, 64 * k))
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
    cents = cluster.train(x, k, seed=cfg.seed, niter=cfg.niter, two_level=two, nprobe=cfg.nprobe)
    cents.save(_w(output_dir, "centroids.npz"))
    info = {"k": k, "sample": int(len(x)), "two_level": two, "valid_rows": int(n_valid),
            "seconds": round(time.perf_counter() - t0, 3)}
    storage.mark_done(_w(output_dir), name, info)
    return info


def stage_assign(cfg: SelectConfig, source_dir: str, output_dir: str, shard: int) -> dict:
    """Nearest centroid, centroid cosine and clip score per valid row; rows and their
    normalised vectors go to one part per cluster bucket (streamed, bounded memory)."""
    name = f"assign-{shard:05d}"
    if storage.is_done(_w(output_dir), name):
        return storage.done_info(_w(output_dir), name)
    p = _plan(output_dir)
    src = _source(cfg, source_dir)
    sh = src.shards[shard]
    valid = storage.read_table(_w(output_dir, "valid", f"s{shard:05d}.parquet"))
    vrows = valid.column("row").to_numpy()
    vuids = _strings(valid.column("uid"))
    vhash = valid.column("hash").to_numpy()
    cents = cluster.Centroids.load(_w(output_dir, "centroids.npz"))
    index = cents.index()
    nb = p["buckets"]
    counts = np.zeros(nb, np.int64)
    with contextlib.ExitStack() as stack:
        writers: dict[int, tuple] = {}

        def writer(b: int):
            if b not in writers:
                base = _w(output_dir, "assign", f"b{b:05d}", f"s{shard:05d}")
                fmeta = stack.enter_context(storage.atomic_open(base + ".parquet"))
                fvec = stack.enter_context(storage.atomic_open(base + ".f16"))
                pw = stack.enter_context(pq.ParquetWriter(fmeta, schemas.ASSIGNMENTS))
                writers[b] = (pw, fvec)
            return writers[b]

        for batch in src.batches(sh, cfg.batch_rows):
            lo, hi = np.searchsorted(vrows, [batch.start, batch.start + len(batch.img)])
            if lo == hi:
                continue
            local = vrows[lo:hi] - batch.start
            # the batch is a fresh float32 array: take and scale rows in place
            img = batch.img if hi - lo == len(batch.img) else batch.img[local]
            img = cluster.unit(img, out=img)
            lab, cos = cluster.assign(cents, img, index, normalized=True)
            if batch.txt is not None:
                txt = batch.txt if hi - lo == len(batch.txt) else batch.txt[local]
                clip = np.einsum("ij,ij->i", img, cluster.unit(txt, out=txt)).astype(np.float32)
            else:
                clip = np.full(len(local), np.nan, np.float32)
            # rows grouped by bucket once, then each bucket's part is a slice
            bucket = lab % nb
            order = np.argsort(bucket, kind="stable")
            img16 = to_float16(img[order])
            cols = {"uid": vuids.slice(lo, hi - lo).take(order),
                    "shard": np.full(len(order), shard, np.int32), "row": vrows[lo:hi][order],
                    "cluster": lab[order], "centroid_cos": cos[order], "clip_score": clip[order],
                    "uid_hash": vhash[lo:hi][order]}
            sb = bucket[order]
            cuts = np.flatnonzero(np.r_[True, sb[1:] != sb[:-1], True])
            for s, e in zip(cuts[:-1], cuts[1:]):
                b = int(sb[s])
                pw, fvec = writer(b)
                pw.write_table(pa.table({k: v[s:e] for k, v in cols.items()},
                                        schema=schemas.ASSIGNMENTS))
                fvec.write(img16[s:e].tobytes())
                counts[b] += int(e - s)
    info = {"shard": shard, "rows": int(len(vrows)), "buckets_written": int((counts > 0).sum())}
    storage.mark_done(_w(output_dir), name, info)
    return info


def stage_dedup(cfg: SelectConfig, source_dir: str, output_dir: str, bucket: int) -> dict:
    """Deduplicate every cluster of one bucket, exactly and over the whole cluster."""
    name = f"dedup-{bucket:05d}"
    if storage.is_done(_w(output_dir), name):
        return storage.done_info(_w(output_dir), name)
    p = _plan(output_dir)
    d = p["dim"]
    parts = storage.listdir(_w(output_dir, "assign", f"b{bucket:05d}"), "s*.parquet")
    tables = [storage.read_table(part) for part in parts]
    vectors = _PartVectors([part[:-len(".parquet")] + ".f16" for part in parts],
                           [t.num_rows for t in tables], d)
    st = dedup.PairStats()
    t = pa.concat_tables(tables) if tables else schemas.ASSIGNMENTS.empty_table()
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
    starts = np.flatnonzero(np.r_[True, cl[order][1:] != cl[order][:-1]]) if len(order) else []
    t0 = time.perf_counter()
    largest = 0
    for s, e in zip(starts, list(starts[1:]) + [len(order)]):
        idx = order[s:e]
        largest = max(largest, len(idx))
        if cfg.policy == "bunny":
            x = vectors.rows(idx)
            lab = dedup.components(x, cfg.threshold, cfg.block, cfg.method, st)
            # `random` hashes the component's smallest uid, so it needs the strings
            names = (np.asarray(uid_col.take(idx).to_pylist(), dtype=object)
                     if cfg.keep == "random" else rank[idx])
            k_local = dedup.choose(lab, cos[idx], names, cfg.keep, cfg.seed)
        else:
            eps = cfg.eps if cfg.eps is not None else 1.0 - cfg.threshold
            k_local = dedup.semdedup(vectors.rows(idx), cos[idx], rank[idx], eps, cfg.keep,
                                     cfg.block, st)
        kept[idx] = idx[k_local]
    seconds = time.perf_counter() - t0
    survive = kept == np.arange(len(order))
    storage.write_table(t.filter(pa.array(survive)),
                        _w(output_dir, "dedup", f"b{bucket:05d}.parquet"), schemas.ASSIGNMENTS)
    drop = np.flatnonzero(~survive)
    storage.write_table(_rejects(uid_col.take(drop), "dedup", "duplicate", uid_col.take(kept[drop])),
                        _w(output_dir, "rejects", f"dedup-b{bucket:05d}.parquet"), schemas.REJECTS)
    info = {"bucket": bucket, "rows": int(len(order)), "kept": int(survive.sum()),
            "largest_cluster": int(largest), "seconds": round(seconds, 4),
            **dataclasses.asdict(st)}
    storage.mark_done(_w(output_dir), name, info)
    return info


class _PartVectors:
    """The float16 vectors of one bucket's parts, read a cluster at a time: local parts
    are memory-mapped only while a cluster's rows are copied out, so memory follows the
    largest cluster, not the bucket (which grows with the input)."""

    def __init__(self, paths: list[str], rows: list[int], dim: int):
        self.paths, self.counts, self.dim = paths, rows, dim
        self.part = np.repeat(np.arange(len(paths)), rows)
        self.offset = np.concatenate([np.arange(r) for r in rows]) if rows else np.zeros(0, int)
        self.loaded: dict[int, np.ndarray] = {}
        local = bool(paths) and storage.is_local(paths[0])   # one bucket folder
        for i, (path, n) in enumerate(zip(paths, rows)):
            fs, fp = storage.filesystem(path)
            if fs.size(fp) != n * dim * 2:
                raise WarrenError(f"{path}: {fs.size(fp) // (dim * 2)} vectors for {n} rows; "
                                  "delete its assign completion marker and rerun")
            if not local:   # no memory map: read each part once
                with fs.open(fp, "rb") as f:
                    self.loaded[i] = np.frombuffer(f.read(), np.float16).reshape(n, dim)

    def _open(self, i: int) -> np.ndarray:
        if i in self.loaded:
            return self.loaded[i]
        return np.memmap(storage.filesystem(self.paths[i])[1], np.float16, "r",
                         shape=(self.counts[i], self.dim))

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` of the bucket (in that order), as one float16 array."""
        out = np.empty((len(idx), self.dim), np.float16)
        part = self.part[idx]
        for i in np.unique(part):
            at = np.flatnonzero(part == i)
            src = self._open(int(i))
            out[at] = src[self.offset[idx[at]]]
            del src          # unmaps: the pages leave this process's resident set
        return out


def stage_finish(cfg: SelectConfig, source_dir: str, output_dir: str,
                 extra_rejects: Sequence[str] = ()) -> dict:
    """Chained bands, seeded sample, then coreset.parquet, rejects.parquet, centroids.npy,
    stats.json and manifest.json. Checks that every input uid lands in exactly one table."""
    p = _plan(output_dir)
    # the input must still be the one the run was planned on: the manifest names it
    runkey.check_same(p.get("input"), _input_key(source_dir), str(output_dir))
    src = _source(cfg, source_dir)
    surv = pa.concat_tables([storage.read_table(f) for f in
                             storage.listdir(_w(output_dir, "dedup"), "b*.parquet")]
                            or [schemas.ASSIGNMENTS.empty_table()])
    uids = surv.column("uid")
    alive = np.ones(surv.num_rows, bool)
    band_rejects, funnel = [], {}
    for stage, col, rng in (("clip_band", "clip_score", cfg.clip_band),
                            ("centroid_band", "centroid_cos", cfg.centroid_band)):
        n_in = int(alive.sum())
        if rng is not None:
            idx = np.flatnonzero(alive)
            codes = bands.band(surv.column(col).take(idx).to_numpy(), uids.take(idx), *rng)
            out = idx[codes > 0]
            band_rejects.append(_rejects(uids.take(out), stage,
                                         _by_code([None, bands.ABOVE, bands.BELOW], codes[codes > 0])))
            alive[out] = False
        funnel[stage] = {"in": n_in, "out": int(alive.sum())}
    idx = np.flatnonzero(alive)
    pick = bands.sample(surv.column("uid_hash").take(idx).to_numpy(), uids.take(idx),
                        cfg.target, cfg.seed)
    band_rejects.append(_rejects(uids.take(idx[~pick]), "sample", "not_sampled"))
    alive[idx[~pick]] = False
    funnel["sample"] = {"in": int(len(idx)), "out": int(alive.sum())}

    coreset = _coreset_table(src, surv.filter(pa.array(alive)), cfg.uid_column)
    storage.write_table(coreset, storage.join(output_dir, "coreset.parquet"), coreset.schema)
    del surv, uids, alive, idx, pick
    release_memory()

    parts = [storage.read_table(f, schema=schemas.REJECTS)
             for f in storage.listdir(_w(output_dir, "rejects"), "*.parquet")]
    parts += band_rejects + [storage.read_table(f, schema=schemas.REJECTS) for f in extra_rejects]
    rejects = pa.concat_tables(parts or [schemas.REJECTS.empty_table()])
    rejects = rejects.take(pc.sort_indices(rejects, [("uid", "ascending"),
                                                             ("stage", "ascending")]))
    storage.write_table(rejects, storage.join(output_dir, "rejects.parquet"), schemas.REJECTS)

    extra_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in extra_rejects)
    _check_accounting(coreset, rejects, p["rows"] + extra_rows)

    cents = cluster.Centroids.load(_w(output_dir, "centroids.npz"))
    with storage.atomic_open(storage.join(output_dir, "centroids.npy")) as f:
        np.save(f, cents.fine)
    stats = _stats(output_dir, p, rejects, funnel, coreset.num_rows, cfg)
    storage.write_json(storage.join(output_dir, "stats.json"), stats)
    base = str(output_dir)
    manifest.write(storage.join(base, "manifest.json"),
                   {"coreset": storage.join(base, "coreset.parquet"),
                    "rejects": storage.join(base, "rejects.parquet")},
                   config={"select": cfg.to_dict(), "source": str(source_dir),
                           "input": {k: {f: v[f] for f in ("files", "bytes", "digest")}
                                     for k, v in (p.get("input") or _input_key(source_dir)).items()}})
    return stats


def _coreset_table(src: EmbeddingSource, kept: pa.Table, uid_col: str) -> pa.Table:
    """Join the kept rows with their shard metadata; carried columns follow the fixed head."""
    shard = kept.column("shard").to_numpy()
    row = kept.column("row").to_numpy()
    pieces = []
    for s in np.unique(shard):
        sel = np.flatnonzero(shard == s)
        meta = src.metadata(src.shards[int(s)])
        rows_here = row[sel]
        order = np.argsort(rows_here)
        m = meta.take(pa.array(rows_here[order]))
        k = kept.take(pa.array(sel[order]))
        # url and caption may be bytes in some shards; the kept rows' are valid UTF-8
        # (validate rejected the others)
        cols = {"uid": k.column("uid"),
                "url": m.column("url").cast(pa.string()) if "url" in m.column_names
                else pa.nulls(len(sel), pa.string()),
                "caption": m.column("caption").cast(pa.string()) if "caption" in m.column_names
                else pa.nulls(len(sel), pa.string()),
                "cluster": k.column("cluster"), "clip_score": k.column("clip_score"),
                "centroid_cos": k.column("centroid_cos")}
        for c in m.column_names:
            if c not in (uid_col, "url", "caption") and c not in cols:
                cols[c] = m.column(c)
        pieces.append(pa.table(cols))
    if not pieces:
        return schemas.CORESET.empty_table()
    t = pa.concat_tables(pieces, promote_options="default")
    head = [schemas.CORESET.field(n) for n in schemas.CORESET.names]
    carried = [t.schema.field(n) for n in t.column_names if n not in schemas.CORESET.names]
    t = t.select([f.name for f in head + carried]).cast(pa.schema(head + carried))
    return t.take(pc.sort_indices(t, [("uid", "ascending")]))


def _check_accounting(coreset: pa.Table, rejects: pa.Table, expected: int) -> None:
    """Every input row is in exactly one table: counts add up and no uid appears twice.
    Checked on 64-bit uid hashes, and on the uid strings of the rows whose hashes
    collide (at LAION-2B's 2.3B rows some pair collides with ~14 % odds)."""
    n = coreset.num_rows + rejects.num_rows
    uids = pa.concat_arrays([_strings(coreset.column("uid")), _strings(rejects.column("uid"))])
    h = bands.uid_hash_arrow(uids)
    vals, counts = np.unique(h, return_counts=True)
    twice = False
    if (counts > 1).any():
        rows = np.flatnonzero(np.isin(h, vals[counts > 1]))
        u = uids.take(pa.array(rows))
        twice = pc.count_distinct(u).as_py() != len(u)
    if n != expected or twice:
        raise WarrenError(f"accounting broken: {coreset.num_rows} kept + {rejects.num_rows} "
                          f"rejected != {expected} input rows (or a uid is in both); this is a bug")


def _stats(output_dir, p, rejects, funnel, coreset_rows, cfg) -> dict:
    work = _w(output_dir)
    done = lambda prefix, n: [storage.done_info(work, f"{prefix}-{i:05d}") for i in range(n)]  # noqa: E731
    val = done("validate", p["shards"])
    ded = done("dedup", p["buckets"])
    stage_reason = (rejects.group_by(["stage", "reason"]).aggregate([("uid", "count")])
                    .to_pylist())
    by_reason: dict[str, dict[str, int]] = {}
    for r in stage_reason:
        by_reason.setdefault(r["stage"], {})[r["reason"]] = r["uid_count"]
    pair = {k: sum(d[k] for d in ded) for k in ("pairs", "flops", "blocks", "skipped_blocks",
                                                 "rechecked", "edges")}
    valid = sum(v["valid"] for v in val)
    dedup_kept = sum(d["kept"] for d in ded)
    return {
        "input_rows": p["rows"], "shards": p["shards"], "k": p["k"], "buckets": p["buckets"],
        "coreset_rows": int(coreset_rows), "rejected_rows": int(rejects.num_rows),
        "funnel": {"input": p["rows"], "valid": valid, "dedup": dedup_kept,
                   "clip_band": funnel["clip_band"]["out"],
                   "centroid_band": funnel["centroid_band"]["out"], "sample": funnel["sample"]["out"]},
        "rejects_by_stage": by_reason,
        "train": storage.done_info(work, "train"),
        "dedup": {"seconds": round(sum(d["seconds"] for d in ded), 3),
                  "largest_cluster": max([d["largest_cluster"] for d in ded] or [0]), **pair},
        "config": cfg.to_dict(), "code_version": manifest.code_version(),
    }


def _peak_rss_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def release_memory(collect: bool = True) -> None:
    """Hand freed heap back to the OS. glibc keeps freed small blocks (uid strings, Arrow
    buffers below its mmap threshold) mapped, so without this each stage's peak stacks
    on what the previous stage left behind and RSS grows with the row count. `collect`
    runs the cycle collector first (~0.1 s with torch loaded: between stages, not buckets)."""
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
    timings, peaks = {}, {}
    s = time.perf_counter()
    each_shard("validate shard", stage_validate)
    timings["validate"] = time.perf_counter() - s
    peaks["validate"] = _peak_rss_gb()
    release_memory()
    s = time.perf_counter()
    stage_train(cfg, source_dir, output_dir)
    timings["train"] = time.perf_counter() - s
    peaks["train"] = _peak_rss_gb()
    release_memory()
    s = time.perf_counter()
    each_shard("assign shard", stage_assign)
    timings["assign"] = time.perf_counter() - s
    peaks["assign"] = _peak_rss_gb()
    release_memory()
    s = time.perf_counter()
    for b in steps("dedup bucket", p["buckets"]):
        stage_dedup(cfg, source_dir, output_dir, b)
        release_memory(collect=False)
    timings["dedup"] = time.perf_counter() - s
    peaks["dedup"] = _peak_rss_gb()
    s = time.perf_counter()
    stats = stage_finish(cfg, source_dir, output_dir, extra_rejects)
    timings["finish"] = time.perf_counter() - s
    peaks["finish"] = _peak_rss_gb()
    release_memory()
    stats["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    stats["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    # the process's peak RSS as of the end of each stage: where it rises is the stage
    # that set it (RSS is measured, not estimated)
    stats["peak_rss_gb"] = {k: round(v, 3) for k, v in peaks.items()}
    storage.write_json(storage.join(output_dir, "stats.json"), stats)
    return stats
