"""Spherical k-means in torch that gives the same centroids and assignments on every
device (a GPU, or the CPU), bit for bit.

Two things make float k-means differ between devices: the order in which a GPU sums
(matrix products, per-cluster sums), and ties between near-equal scores. Here:
- per-cluster sums are exact: rows become 64-bit fixed-point integers before they are
  added, and integer addition does not depend on order; the centroid is then normalised
  in float64 on the CPU (one fixed order), whatever device summed;
- the nearest centroid is screened with a float32 product, and every row whose best and
  second-best scores are closer than twice the product's worst-case rounding error
  (gamma_d, as in dedup.float32_margin) is decided again in float64 on the CPU, ties by
  the lower index. So no rounding difference can change an assignment.
Initial centroids and the reseeding of empty clusters come from a seeded numpy
generator. `device` is any torch device string ("cpu", "cuda", "cuda:1").
"""
from __future__ import annotations

import numpy as np

ROWS = 1 << 16          # rows per device step
CELLS = 1 << 25         # scores (rows x centroids) per device step


def resolve(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is present, else 'faiss' (the CPU k-means)."""
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "faiss"


def _torch(device: str):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False     # a float32 product, with its error bound
    return torch, torch.device(device)


def margin(d: int) -> float:
    """Worst-case |float32 x.c - x.c| for unit rows (norms within 1e-6 of 1)."""
    return 1.01 * d * 2.0 ** -24 * 1.00001


def _exact(x: np.ndarray, c: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float64 scores of (row, centroid) pairs, in one fixed order on the CPU."""
    return np.einsum("ij,ij->i", x[rows].astype(np.float64), c[cols].astype(np.float64))


def nearest(x: np.ndarray, c: np.ndarray, device: str, cd=None) -> np.ndarray:
    """Index of the nearest (largest dot product) centroid of each row of `x`, exactly:
    the same on any device. `cd`: `c` already on the device."""
    torch, dev = _torch(device)
    n, k = len(x), len(c)
    cd = cd if cd is not None else torch.from_numpy(np.ascontiguousarray(c, np.float32)).to(dev)
    out = np.empty(n, np.int64)
    if k == 1:
        out[:] = 0
        return out
    m2 = 2.0 * margin(x.shape[1])
    step = max(1, min(ROWS, CELLS // k))
    for s in range(0, n, step):
        xs = np.ascontiguousarray(x[s:s + step], np.float32)
        sc = torch.from_numpy(xs).to(dev) @ cd.T
        top = sc.topk(2, dim=1)
        best, second = top.values[:, 0], top.values[:, 1]
        lab = top.indices[:, 0].cpu().numpy()
        unsure = torch.nonzero(best - second <= m2).flatten()
        if len(unsure):
            # every centroid within the margin of the best is a candidate; float64 decides
            r, cc = torch.nonzero(sc[unsure] >= (best[unsure] - m2)[:, None], as_tuple=True)
            r, cc = unsure[r].cpu().numpy(), cc.cpu().numpy()
            ex = _exact(xs, c, r, cc)
            order = np.lexsort((cc, -ex, r))          # per row: best score, then lowest index
            first = np.r_[True, r[order][1:] != r[order][:-1]]
            lab[r[order][first]] = cc[order][first]
        out[s:s + step] = lab
    return out


def _unit64(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return (v / np.maximum(np.sqrt(np.einsum("ij,ij->i", v, v)), 1e-300)[:, None]).astype(np.float32)


class _Fixed:
    """The rows as 64-bit fixed-point integers on the device, made once when they fit
    (the same rows are summed every iteration), else a chunk at a time."""

    KEEP = 1 << 30          # bytes

    def __init__(self, x: np.ndarray, device: str):
        torch, self.dev = _torch(device)
        self.x, n = x, len(x)
        shift = min(40, 62 - int(np.ceil(np.log2(n + 1))))     # n rows of |v| <= 2^shift fit int64
        self.scale = float(2 ** shift)
        self.kept = self._make(0, n) if x.size * 8 <= self.KEEP else None

    def _make(self, s, e):
        import torch
        return torch.round(torch.from_numpy(np.ascontiguousarray(self.x[s:e], np.float32))
                           .to(self.dev).double() * self.scale).long()

    def chunks(self):
        n = len(self.x)
        for s in range(0, n, ROWS):
            yield s, (self.kept[s:s + ROWS] if self.kept is not None else self._make(s, s + ROWS))


def update(x: np.ndarray, lab: np.ndarray, c: np.ndarray, device: str,
           rng: np.random.Generator | None = None, fixed: _Fixed | None = None) -> np.ndarray:
    """New unit centroids: each the normalised exact sum of its rows (int64 fixed point on
    the device, float64 on the CPU); an empty cluster keeps its centroid, or with `rng`
    is reseeded from a row of the largest cluster."""
    torch, dev = _torch(device)
    fixed = fixed or _Fixed(x, device)
    k, d = c.shape
    sums = torch.zeros((k, d), dtype=torch.int64, device=dev)
    labt = torch.from_numpy(np.ascontiguousarray(lab, np.int64)).to(dev)
    for s, xi in fixed.chunks():
        sums.index_add_(0, labt[s:s + len(xi)], xi)
    counts = np.bincount(lab, minlength=k)
    new = sums.cpu().numpy()
    filled = counts > 0
    c = c.copy()
    c[filled] = _unit64(new[filled])
    if rng is not None:
        for e in np.flatnonzero(~filled):
            big = int(np.argmax(counts))
            members = np.flatnonzero(lab == big)
            c[e] = x[members[rng.integers(len(members))]]
            counts[big] -= 1
    return c


def train(x: np.ndarray, k: int, seed: int, niter: int, device: str) -> np.ndarray:
    """(k, d) unit centroids from unit float32 rows `x` (Lloyd iterations, cosine)."""
    rng = np.random.default_rng(seed)
    c = np.ascontiguousarray(x[np.sort(rng.choice(len(x), k, replace=False))], np.float32)
    fixed = _Fixed(x, device)
    for _ in range(niter):
        c = update(x, nearest(x, c, device), c, device, rng, fixed)
    return c
