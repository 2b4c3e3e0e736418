"""Synthetic LAION-layout embeddings with planted structure and known truth.

What is planted, and why:
- clusters on the sphere with log-normal (very uneven) sizes, so k-means and per-cluster
  work see LAION-like skew;
- one giant cluster of near-identical vectors, like LAION's "image not found"
  placeholder: one huge duplicate group;
- near-duplicate groups (2-5 members, pairwise cos ~0.9-0.97) and chains a~b~c with
  cos(a,c) well below the threshold, so connected components differ from pairwise checks;
- text embeddings correlated with their image at varied strength, so clip scores spread.

Rows are generated in fixed-size chunks of a global order, then cut into shards, so the
data does not depend on the shard count (only the file boundaries do).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines import schemas, storage
from pipelines.errors import ConfigError

CHUNK = 65_536
CHAIN_COS = 0.93        # cos(a,b) = cos(b,c); cos(a,c) = 2*0.93^2-1 = 0.73
PLACEHOLDER_NOISE = 0.08


@dataclass(frozen=True)
class SynthConfig:
    n: int = 20_000
    dim: int = 256
    seed: int = 0
    shards: int = 4
    avg_cluster: int = 2_000      # LAION-2B at k=100k: ~20k
    giant_share: float = 0.03     # rows in the placeholder cluster
    dup_share: float = 0.10       # rows that belong to planted duplicate groups
    chain_share: float = 0.015    # rows that belong to a~b~c chains
    spread: tuple[float, float] = (1.0, 1.4)   # noise norm of ordinary members
    dup_noise: tuple[float, float] = (0.12, 0.28)
    clip_corr: tuple[float, float] = (0.05, 0.50)
    dtype: str = "float16"

    def __post_init__(self):
        problems = []
        if self.n < 10:
            problems.append(f"n must be >= 10 (got {self.n})")
        if self.dim < 8:
            problems.append(f"dim must be >= 8 (got {self.dim})")
        if not 1 <= self.shards <= max(1, self.n):
            problems.append(f"shards must be in [1, n] (got {self.shards})")
        if self.dtype not in ("float16", "float32"):
            problems.append(f"dtype must be float16 or float32 (got {self.dtype})")
        if not 0 <= self.giant_share + self.dup_share + self.chain_share < 0.9:
            problems.append("giant_share + dup_share + chain_share must be below 0.9")
        if problems:
            raise ConfigError(problems, source="synth-embeddings")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _plan(cfg: SynthConfig, rng: np.random.Generator):
    """Per-row roles: cluster, dup group, kind (0 single, 1 dup member, 2 chain, 3 placeholder)."""
    n = cfg.n
    n_giant = int(round(cfg.giant_share * n))
    rest = n - n_giant
    k = max(2, rest // cfg.avg_cluster)
    sizes = rng.lognormal(0.0, 1.0, k)
    sizes = np.maximum(1, np.floor(sizes / sizes.sum() * rest)).astype(np.int64)
    sizes[np.argmax(sizes)] += rest - sizes.sum()
    cluster = np.concatenate([np.full(n_giant, 0)] + [np.full(s, c + 1) for c, s in enumerate(sizes)])
    kind = np.zeros(n, np.int8)
    kind[:n_giant] = 3
    group = np.full(n, -1, np.int64)
    group[:n_giant] = 0
    next_group = 1
    # Carve duplicate groups and chains out of each ordinary cluster, in proportion.
    start = n_giant
    for s in sizes:
        n_dup = int(cfg.dup_share * s)
        n_chain = int(cfg.chain_share * s) // 3 * 3
        pos = start
        while n_dup >= 2:
            g = int(min(n_dup, rng.integers(2, 6)))
            if n_dup - g == 1:
                g += 1
            kind[pos:pos + g], group[pos:pos + g] = 1, next_group
            next_group, pos, n_dup = next_group + 1, pos + g, n_dup - g
        for _ in range(n_chain // 3):
            kind[pos:pos + 3], group[pos:pos + 3] = 2, next_group
            next_group, pos = next_group + 1, pos + 3
        start += s
    return cluster.astype(np.int32), kind, group, k + 1


def generate(cfg: SynthConfig, out: str, progress: bool = True) -> dict:
    """Write img_emb/, text_emb/, metadata/ (LAION layout) and truth.parquet under `out`."""
    from tqdm import tqdm

    rng = np.random.default_rng(cfg.seed)
    cluster, kind, group, n_clusters = _plan(cfg, rng)
    d = cfg.dim
    centers = _unit(rng.standard_normal((n_clusters, d)).astype(np.float32))
    spread = rng.uniform(*cfg.spread, n_clusters).astype(np.float32)
    # One base vector per group (placeholder group 0 sits on its cluster centre).
    n_groups = int(group.max()) + 1
    first = np.full(n_groups, -1, np.int64)
    rows_with_group = np.flatnonzero(group >= 0)
    first[group[rows_with_group][::-1]] = rows_with_group[::-1]
    g_cluster = cluster[first]
    base = centers[g_cluster] + spread[g_cluster, None] * rng.standard_normal(
        (n_groups, d), dtype=np.float32) / math.sqrt(d)
    base[0] = centers[0]
    base = _unit(base)
    chain_dir = rng.standard_normal((n_groups, d), dtype=np.float32)
    chain_dir -= (chain_dir * base).sum(1, keepdims=True) * base
    chain_dir = _unit(chain_dir)
    # Shuffle rows so groups are spread over shards; uids follow the shuffled order.
    order = rng.permutation(cfg.n)
    cluster, kind, group = cluster[order], kind[order], group[order]
    # Position of each row inside its chain (0, 1, 2) decides a, b or c.
    chain_pos = np.zeros(cfg.n, np.int8)
    for_chain = np.flatnonzero(kind == 2)
    if len(for_chain):
        _, inv = np.unique(group[for_chain], return_inverse=True)
        seen = np.zeros(inv.max() + 1, np.int8)
        for i, g in zip(for_chain, inv):
            chain_pos[i], seen[g] = seen[g], seen[g] + 1
    uids = np.array([f"{i:010d}" for i in range(cfg.n)], dtype=object)

    bounds = np.linspace(0, cfg.n, cfg.shards + 1).astype(np.int64)
    for sub in ("img_emb", "text_emb", "metadata"):
        storage.makedirs(storage.join(out, sub))
    writers = _ShardWriter(out, bounds, cfg.dtype, d)
    bar = tqdm(total=cfg.n, desc="synth", unit="row", disable=not progress, mininterval=1)
    for c0 in range(0, cfg.n, CHUNK):
        c1 = min(cfg.n, c0 + CHUNK)
        crng = np.random.default_rng([cfg.seed, c0])
        m = c1 - c0
        cl, kd, gr, cp = cluster[c0:c1], kind[c0:c1], group[c0:c1], chain_pos[c0:c1]
        noise = crng.standard_normal((m, d), dtype=np.float32) / math.sqrt(d)
        img = centers[cl] + spread[cl, None] * noise
        dup = kd == 1
        eps = crng.uniform(*cfg.dup_noise, m).astype(np.float32)
        img[dup] = base[gr[dup]] + eps[dup, None] * noise[dup]
        ph = kd == 3
        img[ph] = base[0] + PLACEHOLDER_NOISE * noise[ph]
        ch = kd == 2
        sign = np.where(cp == 0, 1.0, np.where(cp == 2, -1.0, 0.0)).astype(np.float32)
        sin = math.sqrt(1 - CHAIN_COS ** 2)
        along = np.where(cp == 1, 1.0, CHAIN_COS).astype(np.float32)
        img[ch] = base[gr[ch]] * along[ch, None] + (sign[ch] * sin)[:, None] * chain_dir[gr[ch]]
        img = _unit(img)
        rho = crng.uniform(*cfg.clip_corr, m).astype(np.float32)
        txt_noise = _unit(crng.standard_normal((m, d), dtype=np.float32))
        txt_noise -= (txt_noise * img).sum(1, keepdims=True) * img
        txt = _unit(rho[:, None] * img + np.sqrt(1 - rho ** 2)[:, None] * _unit(txt_noise))
        writers.add(c0, img, txt, uids[c0:c1], cl)
        bar.update(m)
    bar.close()
    writers.close()
    truth = pa.table({"uid": uids.tolist(), "cluster": cluster, "dup_group": group},
                     schema=schemas.TRUTH)
    storage.write_table(truth, storage.join(out, "truth.parquet"), schemas.TRUTH)
    n_dup_rows = int((group >= 0).sum())
    return {"rows": cfg.n, "dim": d, "shards": cfg.shards, "clusters": int(n_clusters),
            "dup_groups": int(len(np.unique(group[group >= 0]))), "rows_in_dup_groups": n_dup_rows,
            "giant_cluster_rows": int((kind == 3).sum())}


class _ShardWriter:
    """Accumulates chunk slices and writes each shard once it is complete."""

    def __init__(self, out: str, bounds: np.ndarray, dtype: str, dim: int):
        self.out, self.bounds, self.dtype, self.dim = out, bounds, dtype, dim
        self.parts: list = []
        self.shard = 0

    def add(self, start: int, img, txt, uids, cluster):
        end = start + len(img)
        while self.shard < len(self.bounds) - 1:
            s0, s1 = self.bounds[self.shard], self.bounds[self.shard + 1]
            lo, hi = max(s0, start), min(s1, end)
            if lo < hi:
                sl = slice(lo - start, hi - start)
                self.parts.append((img[sl], txt[sl], uids[sl], cluster[sl]))
            if s1 <= end:
                self._flush()
            else:
                break

    def _flush(self):
        i = self.shard
        if self.parts:
            img = np.concatenate([p[0] for p in self.parts]).astype(self.dtype)
            txt = np.concatenate([p[1] for p in self.parts]).astype(self.dtype)
            uids = np.concatenate([p[2] for p in self.parts]).tolist()
        else:
            img = txt = np.zeros((0, self.dim), self.dtype)
            uids = []
        for sub, arr in (("img_emb", img), ("text_emb", txt)):
            with storage.atomic_open(storage.join(self.out, sub, f"{sub}_{i:04d}.npy")) as f:
                np.save(f, arr)
        meta = pa.table({
            "key": pa.array(uids, pa.string()),
            "url": pa.array([f"http://synthetic.invalid/{u}.jpg" for u in uids], pa.string()),
            "caption": pa.array([f"synthetic caption {u}" for u in uids], pa.string()),
            "width": pa.array(np.full(len(uids), 256, np.int32)),
        })
        storage.write_table(meta, storage.join(self.out, "metadata", f"metadata_{i:04d}.parquet"))
        self.parts = []
        self.shard += 1

    def close(self):
        while self.shard < len(self.bounds) - 1:
            self._flush()
