"""Spherical k-means with faiss: `train` on a sample, `assign` in batches.

LAION-2B used k = 100,000. Flat k-means at that k costs n*k*d per iteration, too much
on a CPU, so for large k training and assignment are two-level: a coarse k-means with
about sqrt(k) cells, then a fine k-means inside each cell with a share of k proportional
to the cell's size; assignment probes the `nprobe` nearest cells (a faiss IVF index over
the fine centroids). `bench/cluster_quality.py` measures what this costs in quality
against flat k-means where both fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix

from pipelines import storage
from pipelines.errors import InputError, MissingDependencyError


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError("faiss-cpu", "clustering") from None
    return faiss


def unit(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (einsum for the norms: a tenth of the time
    of np.linalg.norm over rows). `out=x` scales a float32 array in place."""
    x = np.ascontiguousarray(x, np.float32)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    if out is not None and (out.dtype != np.float32 or not out.flags.writeable):
        out = None
    return np.divide(x, np.maximum(norm, 1e-12)[:, None], out=out)


@dataclass
class Centroids:
    """Fine centroids (k, d), L2-normalised; for two-level, the coarse cells as well."""
    fine: np.ndarray
    coarse: np.ndarray | None = None
    nprobe: int = 8

    @property
    def k(self) -> int:
        return len(self.fine)

    def save(self, path: str) -> None:
        with storage.atomic_open(path) as f:
            np.savez(f, fine=self.fine, coarse=self.coarse if self.coarse is not None
                     else np.zeros((0, self.fine.shape[1]), np.float32), nprobe=self.nprobe)

    @classmethod
    def load(cls, path: str) -> "Centroids":
        fs, p = storage.filesystem(path)
        with fs.open(p, "rb") as f:
            z = np.load(f)
            coarse = z["coarse"]
            return cls(z["fine"], coarse if len(coarse) else None, int(z["nprobe"]))

    def index(self, device: str = "faiss"):
        """What `assign` searches: a faiss index (device "faiss"), or the centroids on a
        torch device for the exact search of pipelines/kmeans.py."""
        if device != "faiss":
            import torch
            return torch.from_numpy(np.ascontiguousarray(self.fine, np.float32)).to(device)
        faiss = _faiss()
        d = self.fine.shape[1]
        if self.coarse is None:
            idx = faiss.IndexFlatIP(d)
            idx.add(self.fine)
            return idx
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(self.coarse)
        idx = faiss.IndexIVFFlat(quantizer, d, len(self.coarse), faiss.METRIC_INNER_PRODUCT)
        idx.is_trained = True
        idx.add(self.fine)
        idx.nprobe = min(self.nprobe, len(self.coarse))
        return _Held(idx, quantizer)


class _Held:
    """An IVF index plus its quantizer, which must outlive it (faiss does not own it)."""

    def __init__(self, index, quantizer):
        self.index, self.quantizer = index, quantizer

    def search(self, x, k):
        return self.index.search(x, k)


def train(sample: np.ndarray, k: int, seed: int = 0, niter: int = 20,
          two_level: bool = False, nprobe: int = 8, refine: int = 4,
          device: str = "faiss") -> Centroids:
    """Spherical k-means on `sample` (rows L2-normalised). Deterministic for a given
    sample order and seed. `device` "faiss": faiss on the CPU; any torch device
    ("cpu", "cuda"): pipelines/kmeans.py, the same centroids on every device."""
    x = unit(sample)
    if k < 1 or k > len(x):
        raise InputError(f"k={k} clusters need at least k valid samples; have {len(x)}",
                         field="k")
    exact = device != "faiss"
    if exact:
        from pipelines import kmeans
    kmeans_fn = (lambda pts, kk, sd: kmeans.train(pts, kk, sd, niter, device)) if exact \
        else (lambda pts, kk, sd: _kmeans(pts, kk, sd, niter))
    if not two_level or k < 4:
        return Centroids(kmeans_fn(x, k, seed))
    k1 = max(2, int(round(math.sqrt(k))))
    coarse = kmeans_fn(x, k1, seed)
    cell = kmeans.nearest(x, coarse, device) if exact else _nearest(coarse, x)
    sizes = np.bincount(cell, minlength=k1)
    share = _apportion(sizes, k)
    fine = []
    for c in range(k1):
        if share[c] == 0:
            continue
        pts = x[cell == c]
        if share[c] > 1:
            fine.append(kmeans_fn(pts, int(share[c]), seed + c + 1))
        else:
            fine.append(kmeans._unit64(pts.astype(np.float64).sum(0, keepdims=True)) if exact
                        else unit(pts.mean(0, keepdims=True)))
    cents = Centroids(unit(np.concatenate(fine)), coarse, nprobe)
    # Each fine k-means saw only its own cell: a few global Lloyd steps over all fine
    # centroids undo most of the boundary damage.
    for _ in range(refine):
        if exact:     # exact nearest of all fine centroids, exact sums
            cents.fine = kmeans.update(x, kmeans.nearest(x, cents.fine, device), cents.fine, device)
            continue
        lab, _ = assign(cents, x)
        member = csr_matrix((np.ones(len(x), np.float32), (lab, np.arange(len(x)))),
                            shape=(cents.k, len(x)))
        sums = np.asarray(member @ x)
        filled = np.bincount(lab, minlength=cents.k) > 0
        cents.fine[filled] = unit(sums[filled])
    return cents


def _apportion(sizes: np.ndarray, k: int) -> np.ndarray:
    """Split k centroids over cells in proportion to their sizes (largest remainder),
    at least one per non-empty cell and never more than its points."""
    nonempty = sizes > 0
    raw = sizes / sizes.sum() * k
    share = np.where(nonempty, np.maximum(1, np.floor(raw)), 0).astype(np.int64)
    share = np.minimum(share, sizes)
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    i = 0
    while share.sum() < k:
        c = order[i % len(order)]
        if share[c] < sizes[c]:
            share[c] += 1
        i += 1
    while share.sum() > k:
        c = int(np.argmax(share))
        share[c] -= 1
    return share


def _kmeans(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    faiss = _faiss()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(256, math.ceil(len(x) / k)),
                      min_points_per_centroid=1)
    km.train(x)
    return unit(km.centroids)


def _nearest(centroids: np.ndarray, x: np.ndarray) -> np.ndarray:
    faiss = _faiss()
    idx = faiss.IndexFlatIP(centroids.shape[1])
    idx.add(centroids)
    _, lab = idx.search(x, 1)
    return lab[:, 0]


def assign(centroids: Centroids, x: np.ndarray, index=None,
           normalized: bool = False, device: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
    """(cluster id, cosine to that normalised centroid) for each row of x. On a torch
    device the nearest of all centroids, exactly (pipelines/kmeans.py); with faiss, its
    index (approximate, through `nprobe` cells, for two-level centroids)."""
    xs = np.ascontiguousarray(x, np.float32) if normalized else unit(x)
    if device != "faiss":
        from pipelines import kmeans
        lab = kmeans.nearest(xs, centroids.fine, device, index).astype(np.int32)
    else:
        idx = index if index is not None else centroids.index()
        _, lab = idx.search(xs, 1)
        lab = lab[:, 0].astype(np.int32)
    # exact cosine to the chosen centroid (the index may return approximate scores)
    cos = np.einsum("ij,ij->i", xs, centroids.fine[lab]).astype(np.float32)
    return lab, cos
