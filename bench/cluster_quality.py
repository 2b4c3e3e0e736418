"""Two-level (coarse -> fine) spherical k-means against flat k-means, where both fit.

    python bench/cluster_quality.py                 # 200k x 256, k = 2048
    python bench/cluster_quality.py --n 50000 --k 512

Reports, for both: training and assignment time, the k-means objective (mean cosine of
each point to its assigned centroid), and for two-level the share of points whose IVF
assignment equals the exact nearest of its own fine centroids.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import cluster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--planted", type=int, default=3000, help="true clusters in the data")
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--nprobe", type=int, default=8)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((a.planted, a.dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    sizes = rng.lognormal(0, 1, a.planted)
    lab = rng.choice(a.planted, a.n, p=sizes / sizes.sum())
    x = centers[lab] + 0.8 * rng.standard_normal((a.n, a.dim)).astype(np.float32) / np.sqrt(a.dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    res = {}
    for name, two in (("flat", False), ("two-level", True)):
        t = time.perf_counter()
        c = cluster.train(x, a.k, seed=0, niter=a.niter, two_level=two, nprobe=a.nprobe)
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        got, cos = cluster.assign(c, x)
        t_assign = time.perf_counter() - t
        exact = np.argmax(x @ c.fine.T, 1)
        res[name] = (t_train, t_assign, float(cos.mean()), float((got == exact).mean()))
    print(f"{a.n:,} x {a.dim}, k = {a.k}, {a.planted} planted clusters")
    print(f"{'':12}{'train s':>10}{'assign s':>10}{'objective':>11}{'exact-NN':>10}")
    for name, (tt, ta, obj, agree) in res.items():
        print(f"{name:12}{tt:10.2f}{ta:10.2f}{obj:11.4f}{agree:10.3f}")
    f, s = res["flat"], res["two-level"]
    print(f"two-level / flat: objective {s[2] / f[2]:.4f}, train time {s[0] / f[0]:.2f}x, "
          f"assign time {s[1] / f[1]:.2f}x")


if __name__ == "__main__":
    main()
