"""Bunny's score bands and the final seeded sample.

Each band ranks its input by a score, descending, ties broken by uid, and keeps the
ranks in [floor(lo*n), floor(hi*n)). Bands are chained: the centroid band ranks only the
survivors of the clip band (Bunny's released code ranks both over the same input, which
is wrong). The sample is the `target` rows with the smallest seeded uid hash, so it is
uniform, and the same for any order or sharding of the input.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ABOVE, BELOW = "above_band", "below_band"

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def uid_hash(uids) -> np.ndarray:
    """Stable 64-bit hash of each uid (independent of Python's hash seed)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(),
                                       "little") for u in uids), np.uint64, count=len(uids))


def uid_hash_arrow(uids, chunk: int = 100_000) -> np.ndarray:
    """uid_hash over an arrow string column, a chunk of Python strings at a time."""
    col = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
    return np.concatenate([uid_hash(col.slice(s, chunk).to_pylist())
                           for s in range(0, len(col), chunk)] or [np.zeros(0, np.uint64)])


def mix(h: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (hash xor seed): a seeded, order-free permutation key."""
    with np.errstate(over="ignore"):
        z = h.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _order(key, uids) -> np.ndarray:
    """Row order by `key` descending, ties by uid ascending (uids: list, numpy or arrow).

    A numpy sort of the keys; uids are read only for rows inside runs of equal keys, so
    memory stays a few bytes per row instead of a sorted copy of every uid string."""
    k = np.asarray(key, np.float64)
    order = np.argsort(-k, kind="stable")          # NaN keys last
    sk = k[order]
    same = (sk[1:] == sk[:-1]) | (np.isnan(sk[1:]) & np.isnan(sk[:-1]))
    return _ties_by_uid(order, same, uids)


def _ties_by_uid(order: np.ndarray, same: np.ndarray, uids) -> np.ndarray:
    """`order` with each run of equal keys (`same[i]`: sorted rows i and i+1 tie)
    re-sorted by uid."""
    n = len(order)
    if not same.any():
        return order
    tied = np.zeros(n, bool)
    tied[:-1] |= same
    tied[1:] |= same
    pos = np.flatnonzero(tied)                     # sorted positions inside tie runs
    run = np.cumsum(np.r_[True, ~same])[pos]       # which run each belongs to
    rows = order[pos]
    if isinstance(uids, (pa.Array, pa.ChunkedArray)):
        u = uids.take(pa.array(rows))
    else:
        u = pa.array([str(x) for x in np.asarray(uids, dtype=object)[rows]], pa.string())
    within = pc.sort_indices(pa.table({"r": pa.array(run), "u": u}),
                             [("r", "ascending"), ("u", "ascending")]).to_numpy()
    order = order.copy()
    order[pos] = rows[within]
    return order


def band(scores, uids, lo: float, hi: float) -> np.ndarray:
    """Per row: 0 kept, 1 ranked above the band, 2 ranked below it."""
    n = len(scores)
    order = _order(scores, uids)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    a, b = int(np.floor(lo * n)), int(np.floor(hi * n))
    return np.where(rank < a, 1, np.where(rank >= b, 2, 0)).astype(np.int8)


def sample(hashes: np.ndarray, uids, target: int | None, seed: int) -> np.ndarray:
    """Boolean mask of the seeded uniform sample of size `target` (all when None): the
    rows with the smallest seeded hash, ties (two uids with one 64-bit hash) by uid."""
    n = len(hashes)
    if target is None or target >= n:
        return np.ones(n, bool)
    key = mix(np.asarray(hashes).view(np.uint64), seed)
    order = np.argsort(key, kind="stable")
    sk = key[order]
    order = _ties_by_uid(order, sk[1:] == sk[:-1], uids)
    keep = np.zeros(n, bool)
    keep[order[:target]] = True
    return keep
