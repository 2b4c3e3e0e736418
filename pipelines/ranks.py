"""Exact rank boundaries over more rows than fit in memory: radix selection on key bits.

A band keeps the rows of ranks [a, b) in an order (score descending, ties by uid); the
sample keeps the `target` rows with the smallest seeded hash (ties by uid). Both need
only the row AT a few ranks: then each row is placed by comparing it with those rows.
That row is found in passes over the data, 16 key bits per pass, with a 65,536-bin
histogram per wanted rank (so memory is a few MB at any row count): the first pass
counts the top 16 bits and picks the bin holding the rank, the next counts the next 16
bits inside that bin, and so on, until the key is known exactly. Rows with that same key
are then ordered by uid (one more pass collects just them).

Keys are unsigned integers whose ascending order is the ranking order: `score_keys`
maps float32 scores so that ascending keys = descending scores, as numpy orders them
(-0.0 equal to 0.0, NaN last).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DIGIT = 16
NAN_KEY = np.uint32(0xFFFFFFFF)


def score_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys, ascending = scores descending; -0.0 ties with 0.0, NaN sorts last."""
    f = np.array(scores, np.float32)            # a copy: zeros are rewritten
    f[f == 0] = 0.0                             # -0.0 -> +0.0 (numpy's sort ties them)
    bits = f.view(np.uint32)
    up = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))   # ascending
    key = ~up
    key[np.isnan(f)] = NAN_KEY
    return key


@dataclass(frozen=True)
class Boundary:
    """The row at one rank of the order (key ascending, uid ascending), or past the end."""
    rank: int
    key: int | None = None        # None: rank >= rows (no such row)
    uid: str | None = None

    def before(self, keys: np.ndarray, uids: Callable[[np.ndarray], pa.Array]) -> np.ndarray:
        """Mask of rows ranked before this boundary. `uids(rows)` gives the uids of the
        given rows (read only for rows whose key equals the boundary's)."""
        if self.key is None:
            return np.ones(len(keys), bool)
        k = keys.dtype.type(self.key)
        out = keys < k
        tie = np.flatnonzero(keys == k)
        if len(tie):
            out[tie] = pc.less(uids(tie), pa.scalar(self.uid, pa.string())).to_numpy(
                zero_copy_only=False)
        return out


def boundaries(chunks: Callable[[], Iterable[tuple[np.ndarray, Callable]]], n: int,
               ranks: Sequence[int], bits: int) -> list[Boundary]:
    """The rows at `ranks` (0-based) among the `n` keys that `chunks()` yields, as
    (keys, uids_of) pairs: `keys` unsigned ints of `bits` bits, `uids_of(rows)` the uids of
    those rows. `chunks` is called once per pass (bits / 16 passes, plus one for ties)."""
    dtype = np.uint64 if bits > 32 else np.uint32
    want = [r for r in ranks if 0 <= r < n]
    prefix = {r: 0 for r in want}
    left = {r: r for r in want}          # rank within the current prefix's bin
    for level in range(bits // DIGIT):
        shift = dtype(bits - DIGIT * (level + 1))
        groups: dict[int, list[int]] = {}
        for r in want:
            groups.setdefault(prefix[r], []).append(r)
        counts = {p: np.zeros(1 << DIGIT, np.int64) for p in groups}
        for keys, _ in chunks():
            keys = keys.astype(dtype, copy=False)
            digit = ((keys >> shift) & dtype(0xFFFF)).astype(np.int64)
            high = keys >> dtype(shift + DIGIT) if level else None
            for p in groups:
                d = digit if level == 0 else digit[high == dtype(p)]
                counts[p] += np.bincount(d, minlength=1 << DIGIT)
        for p, rs in groups.items():
            cum = np.cumsum(counts[p])
            for r in rs:
                d = int(np.searchsorted(cum, left[r], side="right"))
                left[r] -= int(cum[d - 1]) if d else 0
                prefix[r] = (prefix[r] << DIGIT) | d
    # ties: the rows with the boundary key, ordered by uid
    keyset = sorted(set(prefix.values()))
    tied: dict[int, list[pa.Array]] = {k: [] for k in keyset}
    if keyset:
        kv = np.asarray(keyset, dtype)
        for keys, uids_of in chunks():
            keys = keys.astype(dtype, copy=False)
            hit = np.flatnonzero(np.isin(keys, kv))
            if len(hit):
                u = uids_of(hit)
                hk = keys[hit]
                for k in np.unique(hk):
                    tied[int(k)].append(u.filter(pa.array(hk == k)))
    out = []
    for r in ranks:
        if r not in prefix:
            out.append(Boundary(r))
            continue
        u = pa.concat_arrays(tied[prefix[r]]) if tied[prefix[r]] else pa.array([], pa.string())
        u = u.take(pc.sort_indices(u))
        out.append(Boundary(r, prefix[r], u[left[r]].as_py()))
    return out
