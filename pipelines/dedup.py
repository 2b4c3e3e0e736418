"""Semantic deduplication inside one cluster: exact connected components of the graph
with an edge where cos(a, b) > threshold, then one kept member per component.

Speed without approximation: similarities are screened with an int8 matrix product
(one quantisation scale per cluster), and a rigorous per-cluster error bound splits the
screened pairs into three sets: certainly below the threshold (dropped), certainly
above (edges), and a thin band around it, which is recomputed exactly in float64. So the
graph is the same as a float32/float64 all-pairs computation, at int8 speed. Where a
cluster's ordinary pairs sit well below the threshold, a cheaper rigorous screen comes
first (the head screen: a product over part of the coordinates plus a bound on the
rest), and only rows it cannot clear get the full int8 product.

Memory stays bounded: the cluster is processed in square blocks (upper triangle only;
the similarity matrix is symmetric), and a block whose rows and columns already lie in
one component is skipped, which makes giant near-duplicate clusters (LAION's "image not
found" placeholder) cheap. Big clusters are never split into independent chunks.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

Keep = Literal["middle", "far", "near", "random"]

BLOCK = 2048
SMALL = 256         # below this many rows an exact float32 product is cheaper than int8 set-up
CHUNK = 8192        # rows (or pairs) per temporary: 25 MB float32, 50 MB float64 at d = 768
EDGE_ROWS = 256     # rows of a block scanned for edges at once


@dataclass
class PairStats:
    """Counters of the pairwise step, for benchmarks and stats.json."""
    pairs: int = 0            # pairs covered (upper triangle)
    flops: float = 0.0        # multiply-adds x2 actually executed
    blocks: int = 0
    skipped_blocks: int = 0
    rechecked: int = 0        # pairs recomputed exactly near the threshold
    edges: int = 0

    def add(self, other: "PairStats") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


def _merge(labels: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Union the components of edge endpoints u, v. Labels stay the smallest member index."""
    lu, lv = labels[u], labels[v]
    diff = lu != lv
    if not diff.any():
        return labels
    lu, lv = lu[diff], lv[diff]
    nodes, inv = np.unique(np.concatenate([lu, lv]), return_inverse=True)
    m = len(nodes)
    g = coo_matrix((np.ones(len(lu), np.int8), (inv[:len(lu)], inv[len(lu):])), shape=(m, m))
    _, comp = connected_components(g, directed=False)
    root = np.full(comp.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(root, comp, nodes)      # nodes are labels, i.e. smallest indices
    remap = np.arange(len(labels))
    remap[nodes] = root[comp]
    return remap[labels]


def _merge_block(labels: np.ndarray, ii: np.ndarray, jj: np.ndarray, i0: int, i1: int,
                 j0: int, j1: int) -> np.ndarray:
    """Union along the edges (ii, jj) of one block (global indices). The block's own
    components are found first over its at most 2*block nodes, so a dense block (a big
    near-duplicate group: millions of edges) reaches the label merge as a few hundred."""
    ni = i1 - i0
    diagonal = i0 == j0 and i1 == j1
    m = ni if diagonal else ni + (j1 - j0)
    a, b = ii - i0, (jj - j0 if diagonal else jj - j0 + ni)
    g = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(m, m))
    _, comp = connected_components(g, directed=False)
    nodes = np.arange(i0, i1) if diagonal else np.r_[np.arange(i0, i1), np.arange(j0, j1)]
    order = np.argsort(comp, kind="stable")
    same = comp[order][1:] == comp[order][:-1]
    lab = labels[nodes[order]]
    return _merge(labels, lab[:-1][same], lab[1:][same])


class _Edges:
    """Edges on their way into the labels. A merge builds a sparse graph (~1 ms), so the
    edges of sparse blocks (the usual case) are merged in batches; a dense block (a big
    near-duplicate group) is merged at once, so that later blocks inside the group can
    be skipped. Pending edges only delay skipping; they never change the components."""

    def __init__(self, labels: np.ndarray, limit: int):
        self.labels, self.limit = labels, limit
        self.u: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.pending = 0

    def add(self, ii, jj, i0, i1, j0, j1) -> None:
        if len(ii) > 2 * (i1 - i0):
            self.flush()
            self.labels = _merge_block(self.labels, ii, jj, i0, i1, j0, j1)
            return
        self.u.append(ii)
        self.v.append(jj)
        self.pending += len(ii)
        if self.pending >= self.limit:
            self.flush()

    def flush(self) -> np.ndarray:
        if self.pending:
            self.labels = _merge(self.labels, np.concatenate(self.u), np.concatenate(self.v))
            self.u, self.v, self.pending = [], [], 0
        return self.labels


def float32_margin(d: int) -> float:
    """Largest error of a float32 dot product of two rows of norm <= 1 + NORM_SLACK, in
    any summation order: gamma_d * sum |a_i b_i| <= 1.01 d 2^-24 ||a|| ||b|| (float16
    products are exact in float32; only the additions round)."""
    return 1.01 * d * 2.0 ** -24 * (1.0 + NORM_SLACK) ** 2


def _exact(x: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """float64 dot products of row pairs (the ground truth for near-threshold pairs)."""
    out = np.empty(len(i))
    for s in range(0, len(i), CHUNK):
        a = x[i[s:s + CHUNK]].astype(np.float64)
        b = x[j[s:s + CHUNK]].astype(np.float64)
        out[s:s + CHUNK] = np.einsum("ij,ij->i", a, b)
    return out


def components(x: np.ndarray, threshold: float, block: int = BLOCK,
               method: Literal["int8", "float32"] = "int8",
               stats: PairStats | None = None, device: str | None = None) -> np.ndarray:
    """Component label (smallest member index) of each row of `x` (L2-normalised rows)
    in the graph with an edge where cos > threshold. `device`: a torch device for the
    int8 screen (the same graph on every device: see _components_int8_on)."""
    n = len(x)
    labels = np.arange(n)
    if n < 2:
        return labels
    st = stats if stats is not None else PairStats()
    st.pairs += n * (n - 1) // 2
    if method == "baseline":
        return _components_baseline(x, threshold, block, labels, st)
    if method == "float32" or n <= SMALL:
        return _components_float(x, threshold, block, labels, st)
    if device is not None:
        return _components_int8_on(device, x, threshold, block, labels, st)
    return _components_int8(x, threshold, block, labels, st)


def _block_order(nb: int):
    # Diagonal blocks first: they merge local groups, so later off-diagonal blocks
    # between already-joined ranges can be skipped.
    yield from ((b, b) for b in range(nb))
    for gap in range(1, nb):
        yield from ((b, b + gap) for b in range(nb - gap))


def _open_blocks(n: int, block: int, edges: "_Edges", st: PairStats):
    """(diagonal, i0, i1, j0, j1) of each block pair in `_block_order`, skipping (and
    counting) pairs whose rows the edges found so far already put in one component."""
    nb = (n + block - 1) // block
    for bi, bj in _block_order(nb):
        i0, i1 = bi * block, min(n, (bi + 1) * block)
        j0, j1 = bj * block, min(n, (bj + 1) * block)
        if _one_component(edges.labels, i0, i1, j0, j1):
            st.skipped_blocks += 1
            continue
        yield bi == bj, i0, i1, j0, j1


def _components_float(x, threshold, block, labels, st):
    xf = np.ascontiguousarray(x, np.float32)
    n = len(xf)
    edges = _Edges(labels, 4 * block)
    for diagonal, i0, i1, j0, j1 in _open_blocks(n, block, edges, st):
        sim = xf[i0:i1] @ xf[j0:j1].T
        st.blocks += 1
        st.flops += 2.0 * (i1 - i0) * (j1 - j0) * xf.shape[1]
        ii, jj = np.nonzero(sim > threshold - float32_margin(xf.shape[1]))
        ii, jj = ii + i0, jj + j0
        keep = jj > ii
        ii, jj = ii[keep], jj[keep]
        if len(ii):
            # float32 rounding can flip pairs right at the threshold: decide those exactly
            ok = _exact(x, ii, jj) > threshold
            st.rechecked += len(ii)
            ii, jj = ii[ok], jj[ok]
            st.edges += len(ii)
            edges.add(ii, jj, i0, i1, j0, j1)
    return edges.flush()


def _components_baseline(x, threshold, block, labels, st):
    """The plain SemDeDup-style computation, kept as the benchmarks' reference: the full
    float32 X @ X.T of the cluster (row-chunked only so it fits in memory), no symmetry,
    no skipping, edges read off the thresholded matrix."""
    xf = np.ascontiguousarray(x, np.float32)
    n = len(xf)
    edges = _Edges(labels, 4 * block)
    for i0 in range(0, n, block):
        sim = xf[i0:i0 + block] @ xf.T
        st.blocks += 1
        st.flops += 2.0 * len(sim) * n * xf.shape[1]
        ii, jj = np.nonzero(sim > threshold)
        ii = ii + i0
        keep = jj > ii
        st.edges += int(keep.sum())
        if keep.any():
            edges.add(ii[keep], jj[keep], i0, min(n, i0 + block), 0, n)
    return edges.flush()


def _one_component(labels, i0, i1, j0, j1) -> bool:
    a, b = labels[i0:i1], labels[j0:j1]
    first = a[0]
    return bool((a == first).all() and (b == first).all())


def quantize(x: np.ndarray, *views) -> list[tuple[np.ndarray, float, float]]:
    """For x's rows (no view given) or for each view of them, the int8 rows with one
    scale for the whole cluster (padded to a multiple of 8 columns, as torch's int8 GEMM
    wants), the scale, and the largest row L1 norm (for the error bound). Two passes over
    x in float32 chunks through torch (numpy's float16 arithmetic is scalar and was a
    tenth of the dedup stage): no float32 copy of a big cluster. A view maps a float32
    chunk to the rows to quantise (the head screen's z)."""
    import torch

    views = views or (lambda a: a,)

    def chunks():
        for s in range(0, len(x), CHUNK):
            a = torch.from_numpy(np.ascontiguousarray(x[s:s + CHUNK])).float()
            yield s, [f(a) for f in views]

    amax, dims = [0.0] * len(views), [0] * len(views)
    for _, vs in chunks():
        for k, v in enumerate(vs):
            amax[k], dims[k] = max(amax[k], float(v.abs().max())), v.shape[1]
    out = []
    for k in range(len(views)):
        scale = amax[k] / 127.0 or 1.0
        out.append([np.zeros((len(x), dims[k] + (-dims[k]) % 8), np.int8), scale, 0.0])
    for s, vs in chunks():
        for o, v in zip(out, vs):
            o[2] = max(o[2], float(v.abs().sum(1).max()))
            torch.from_numpy(o[0])[s:s + CHUNK, :v.shape[1]] = \
                torch.round(v / o[1]).to(torch.int8)       # half to even, as np.rint
    return [tuple(o) for o in out]


def error_bound(l1: float, d: int, scale: float) -> float:
    """Largest possible |a.b - scale^2 * qa.qb| over row pairs, given the largest row L1
    norm `l1`. With |a_i - s*qa_i| <= s/2: |a.b - s^2 qa.qb| <= s/2 (|a|_1 + |b|_1) + d s^2 / 4.
    """
    return float(scale * l1 + d * scale * scale / 4.0) * 1.0001 + 1e-6


def _int8_product(a, b, buf):
    """a @ b.T for int8 rows into the reused int32 buffer. The transposed view goes to
    the GEMM as is (as fast as a contiguous copy). torch's int8 GEMM wants at least 17
    rows: a short `a` is padded with zero rows (their products are 0, far below any
    positive threshold). One buffer for all blocks: a fresh 16 MB result per block
    fragments glibc's heap (its mmap threshold adapts upwards) and RSS climbs."""
    import torch

    m = len(a)
    if m < 17:
        a = torch.nn.functional.pad(a, (0, 0, 0, 17 - m))
    out = buf[: len(a) * len(b)].view(len(a), len(b))
    return torch._int_mm(a, b.T, out=out)[:m]


# -- the head screen ---------------------------------------------------------------------
# x.y = x[:m].y[:m] + x[m:].y[m:] <= x[:m].y[:m] + |x[m:]| |y[m:]| (Cauchy-Schwarz). So
# with z = [x[:m], tau/sqrt(r) repeated r times], tau >= |x[m:]|, z.z' >= x.y for every
# pair, and a pair whose int8 z-product is below the threshold minus z's own error bound
# cannot be an edge. On clusters whose ordinary pairs sit well below the threshold (the
# usual case) this product over m + r of the d columns rules out all but the rows that
# have a near-duplicate; only those rows get the full int8 product. The graph is the
# same: both screens are rigorous, and the full screen decides as before.
HEAD_SHARES = (0.25, 0.375, 0.5, 0.625)   # head widths tried, as shares of d
HEAD_SAMPLE = 512       # rows sampled to choose the width
HEAD_PAYS = 0.8         # used only if its estimated cost is below this share of the full product
HEAD_ROW_COST = 1e6     # its fixed work per row (a second quantisation, gathers), as
                        # multiply-adds of the full product: ~2.5 us a row at the int8
                        # rate here; the second quantisation alone measured ~1.2 us


def _head_rows(a, m: int, r: int):
    """z = [a[:, :m], tau / sqrt(r) x r] in float32 for rows a (a torch tensor or numpy
    array), tau >= |a[:, m:]|, so that z.z' >= a.b for every pair. tau is the float32
    norm raised by twice its worst rounding error (a sum of n squares is off by at most
    (n + 1) 2^-24 of itself, its square root by half that, plus a few roundings)."""
    import torch

    a = torch.as_tensor(a).float()
    n = a.shape[1] - m
    tau = a[:, m:].square().sum(1, keepdim=True).sqrt() * ((1 + (n + 8) * 2.0 ** -24) / np.sqrt(r))
    return torch.cat([a[:, :m], tau.expand(-1, r)], 1)


def head_plan(x: np.ndarray, threshold: float, block: int) -> tuple[int, int] | None:
    """(m, r) of the cheapest head screen for this cluster, estimated on a sample of its
    rows (its pass rate sets how many rows need the full product), or None when no width
    is estimated to cost below HEAD_PAYS of the full product: small clusters, whose
    product is cheap next to the screen's fixed cost, and clusters whose ordinary pairs
    are too close to the threshold. Only speed depends on it."""
    import torch

    n, d = x.shape
    fixed = HEAD_ROW_COST / (0.5 * n * d)
    if HEAD_SHARES[0] + fixed >= HEAD_PAYS:       # cannot pay whatever the sample says
        return None
    idx = np.unique(np.linspace(0, n - 1, min(n, HEAD_SAMPLE)).astype(np.int64))
    # torch, not numpy: numpy's BLAS threads spin after a product and slowed the int8
    # work that follows on a 2-core machine
    xs = torch.from_numpy(np.asarray(x[idx])).float()    # an estimate: float32 is plenty
    amax = float(xs.abs().max()) or 1.0
    best, plan = HEAD_PAYS, None
    for share in HEAD_SHARES:
        m = max(8, int(round(share * d / 8)) * 8)
        if m >= d:
            continue
        tail = xs[:, m:].square().sum(1).sqrt()
        r = max(1, int(np.ceil((float(tail.max()) / amax) ** 2)))   # tail columns no larger than x's
        r += (-(m + r)) % 8                                  # the int8 GEMM's multiple of 8
        # the quantisation margin z will get (error_bound with the sample's L1 norms)
        l1 = float((xs[:, :m].abs().sum(1) + np.sqrt(r) * tail).max())
        margin = error_bound(l1, m + r, amax / 127.0)
        bound = xs[:, :m] @ xs[:, :m].T + torch.outer(tail, tail)
        bound.fill_diagonal_(-np.inf)
        p = float((bound > threshold - 2 * margin).float().mean())
        rows = 1.0 - (1.0 - p) ** min(block, n)       # rows of a block needing the full product
        cost = (m + r) / d + rows + fixed
        if cost < best:
            best, plan = cost, (m, r)
    return plan


def _components_int8(x, threshold, block, labels, st):
    import torch

    n, d = x.shape
    plan = head_plan(x, threshold, block) if n > block else None
    if plan is None:
        ((q, scale, l1),) = quantize(x)
    else:
        m, r = plan
        (q, scale, l1), (zq, zs, zl1) = quantize(x, lambda a: a, lambda a: _head_rows(a, m, r))
        zt = torch.from_numpy(zq)
        zlo = int(np.floor((threshold - error_bound(zl1, m + r, zs)) / (zs * zs)))
    bound = error_bound(l1, d, scale)
    s2 = scale * scale
    lo = int(np.floor((threshold - bound) / s2))    # q.q <= lo  => cos <= threshold: no edge
    hi = int(np.ceil((threshold + bound) / s2))     # q.q >  hi  => cos >  threshold: edge
    qt = torch.from_numpy(q)
    buf = torch.empty(max(min(block, n), 17) * min(block, n), dtype=torch.int32)
    edges = _Edges(labels, 4 * block)
    for diagonal, i0, i1, j0, j1 in _open_blocks(n, block, edges, st):
        st.blocks += 1
        if plan is None:
            ct = _int8_product(qt[i0:i1], qt[j0:j1], buf)
            st.flops += 2.0 * (i1 - i0) * (j1 - j0) * d
            if diagonal:
                ct.fill_diagonal_(lo)     # self-products are no edges; now few rows pass below
            # Rows first: near-duplicates are rare, so only a few rows need a full scan.
            rows = np.flatnonzero(ct.amax(1).numpy() > lo)
            c, at = ct.numpy(), np.arange(i0, i1)      # c's rows, as row indices of x
        else:
            ch = _int8_product(zt[i0:i1], zt[j0:j1], buf)
            st.flops += 2.0 * (i1 - i0) * (j1 - j0) * zq.shape[1]
            if diagonal:
                ch.fill_diagonal_(zlo)
            at = np.flatnonzero(ch.amax(1).numpy() > zlo) + i0
            if not len(at):
                continue
            ct = _int8_product(qt[torch.from_numpy(at)], qt[j0:j1], buf)
            st.flops += 2.0 * len(at) * (j1 - j0) * d
            if diagonal:
                ct[torch.arange(len(at)), torch.from_numpy(at - i0)] = lo
            rows = np.flatnonzero(ct.amax(1).numpy() > lo)
            c = ct.numpy()
        if not len(rows):
            continue
        # A few rows at a time: a block inside a big near-duplicate group has millions
        # of edges, and their index arrays would otherwise set the stage's peak memory.
        for r0 in range(0, len(rows), EDGE_ROWS):
            rr = rows[r0:r0 + EDGE_ROWS]
            sub = c[rr]
            ri, jj = np.nonzero(sub > lo)
            vals = sub[ri, jj]
            _add_edges(edges, st, x, at[rr[ri]], jj + j0, vals, hi, threshold, (i0, i1, j0, j1))
    return edges.flush()


def _add_edges(edges, st, x, ii, jj, vals, hi, threshold, block) -> None:
    """The screened pairs (ii, jj) of one block into the edge list: each pair once (j > i),
    those the int8 screen cannot decide (value <= hi) rechecked exactly in float64."""
    keep = jj > ii
    ii, jj, vals = ii[keep], jj[keep], vals[keep]
    unsure = vals <= hi
    if unsure.any():
        st.rechecked += int(unsure.sum())
        ok = ~unsure
        ok[unsure] = _exact(x, ii[unsure], jj[unsure]) > threshold
        ii, jj = ii[ok], jj[ok]
    st.edges += len(ii)
    if len(ii):
        edges.add(ii, jj, *block)


# -- duplicates across cluster borders (dedup scope "global") ------------------------------
NORM_SLACK = 1e-3   # |1 - ||v||| of a stored float16 unit vector is below 2^-11; margin on top
SCREEN_SLACK = 1e-4  # float32 error of the scores the border test is computed from


def border_margin(threshold: float) -> float:
    """h in the border test below: half the largest distance ||x - y|| of a linked pair.

    Rows x (cluster c) and y (cluster c') with x.y > t and ||x||, ||y|| <= 1 + e have
    ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y < 2 (1 + e)^2 - 2 t. With g_x(c') = x.mu_c -
    x.mu_c' (how much nearer x is to its own centroid than to c'), for any assignment:
        g_x(c') + g_y(c) = (x - y).(mu_c - mu_c') <= ||x - y|| ||mu_c - mu_c'||,
    so the smaller of the two is below h ||mu_c - mu_c'||, h = ||x - y|| / 2. Comparing
    every row x with the members of each cluster c' where g_x(c') < h ||mu_c - mu_c'||
    therefore finds every linked pair across a border from at least one side. In angles
    (unit vectors, t = cos theta_t): h = sin(theta_t / 2), and the test can only hold when
    the angle between the centroids is below 2 angle(x, mu_c) + theta_t."""
    return 0.5 * float(np.sqrt(max(0.0, 2.0 * (1.0 + NORM_SLACK) ** 2 - 2.0 * threshold)))


def border_candidates(x: np.ndarray, lab: np.ndarray, centroids: np.ndarray,
                      threshold: float, gram: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(row, cluster) pairs: the clusters other than its own whose members row x must be
    compared with (see border_margin). `x` float32 unit rows, `lab` their clusters,
    `centroids` the unit centroids, `gram` their Gram matrix when precomputed."""
    h = border_margin(threshold)
    k = len(centroids)
    rows_at_once = max(1, (1 << 22) // max(1, k))
    out_r, out_c = [], []
    for s in range(0, len(x), rows_at_once):
        xs, ls = x[s:s + rows_at_once], lab[s:s + rows_at_once]
        sc = xs @ centroids.T                                  # x . mu for every centroid
        own = sc[np.arange(len(xs)), ls]
        cc = gram[ls] if gram is not None else centroids[ls] @ centroids.T
        dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * cc))        # ||mu_c - mu_c'||
        hit = (own[:, None] - sc) < h * dist + SCREEN_SLACK
        hit[np.arange(len(xs)), ls] = False
        r, c = np.nonzero(hit)
        out_r.append(r + s)
        out_c.append(c)
    if not out_r:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_r).astype(np.int64), np.concatenate(out_c).astype(np.int64)


def cross_edges(a: np.ndarray, b: np.ndarray, threshold: float, block: int = BLOCK,
                stats: PairStats | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, j) with a_i . b_j > threshold, exactly: a float32 screen with a
    margin, and the pairs near the threshold decided in float64 (exact on float16 rows)."""
    st = stats if stats is not None else PairStats()
    af = np.ascontiguousarray(a, np.float32)
    bf = np.ascontiguousarray(b, np.float32)
    ii, jj = [], []
    for i0 in range(0, len(af), block):
        for j0 in range(0, len(bf), block):
            sim = af[i0:i0 + block] @ bf[j0:j0 + block].T
            st.blocks += 1
            st.pairs += sim.size
            st.flops += 2.0 * sim.size * af.shape[1]
            r, c = np.nonzero(sim > threshold - float32_margin(af.shape[1]))
            if len(r):
                r, c = r + i0, c + j0
                ok = _exact_pairs(a, b, r, c) > threshold
                st.rechecked += len(r)
                ii.append(r[ok])
                jj.append(c[ok])
    if not ii:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j = np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64)
    st.edges += len(i)
    return i, j


def _exact_pairs(a: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    out = np.empty(len(i))
    for s in range(0, len(i), CHUNK):
        out[s:s + CHUNK] = np.einsum("ij,ij->i", a[i[s:s + CHUNK]].astype(np.float64),
                                     b[j[s:s + CHUNK]].astype(np.float64))
    return out


def _components_int8_on(device: str, x, threshold, block, labels, st):
    """The int8 screen of _components_int8 with every block product on a torch device
    (a GPU). The graph is the same as on the CPU, bit for bit: int8 products are exact
    integers on any device; the error bound only sorts pairs into certain / unsure (a
    device's float32 sums can move it, never the decisions), and unsure pairs are decided
    by the same float64 computation on the CPU (exact for float16 rows: 11-bit products
    in a 53-bit sum)."""
    import torch

    dev = torch.device(device)
    n, d = x.shape
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    lo_hi = torch.aminmax(xt.float())
    scale = max(-float(lo_hi[0]), float(lo_hi[1])) / 127.0 or 1.0
    l1 = 0.0
    dp, npad = d + (-d) % 8, n + (-n) % 8 + 24     # int8 GEMM shapes: multiples of 8, > 16 rows
    qt = torch.zeros((npad, dp), dtype=torch.int8, device=dev)
    for s0 in range(0, n, CHUNK):
        a = xt[s0:s0 + CHUNK].float()
        l1 = max(l1, float(a.abs().sum(1).max()))
        qt[s0:s0 + len(a), :d] = torch.round(a / scale).to(torch.int8)
    del xt
    bound = error_bound(l1, d, scale)
    s2 = scale * scale
    lo = int(np.floor((threshold - bound) / s2))
    hi = int(np.ceil((threshold + bound) / s2))
    edges = _Edges(labels, 4 * block)
    for diagonal, i0, i1, j0, j1 in _open_blocks(n, block, edges, st):
        a = qt[i0:i0 + max(i1 - i0 + (-(i1 - i0)) % 8, 24)]
        b = qt[j0:j0 + (j1 - j0) + (-(j1 - j0)) % 8]
        ct = torch._int_mm(a, b.T)[: i1 - i0, : j1 - j0]     # padding rows/columns cut off
        if diagonal:
            ct.fill_diagonal_(lo)
        st.blocks += 1
        st.flops += 2.0 * (i1 - i0) * (j1 - j0) * d
        rows = torch.nonzero(ct.amax(1) > lo).flatten()
        for r0 in range(0, len(rows), EDGE_ROWS):
            rr = rows[r0:r0 + EDGE_ROWS]
            ri, jj = torch.nonzero(ct[rr] > lo, as_tuple=True)
            vals = ct[rr[ri], jj].cpu().numpy()
            _add_edges(edges, st, x, rr[ri].cpu().numpy() + i0, jj.cpu().numpy() + j0, vals, hi,
                       threshold, (i0, i1, j0, j1))
    return edges.flush()


def choose(labels: np.ndarray, centroid_cos: np.ndarray, uids: np.ndarray, keep: Keep,
           seed: int = 0) -> np.ndarray:
    """Index of the kept member for every row's component.

    Members are ordered by ascending distance to the centroid (descending centroid_cos),
    ties by uid. `middle` keeps index len // 2 of that order, `near` the first, `far` the
    last, `random` one drawn from a hash of (seed, the component's smallest uid).
    """
    n = len(labels)
    order = np.lexsort((uids, -centroid_cos.astype(np.float64), labels))
    lab_sorted = labels[order]
    starts = np.flatnonzero(np.r_[True, lab_sorted[1:] != lab_sorted[:-1]])
    sizes = np.diff(np.r_[starts, n])
    if keep == "middle":
        pick = sizes // 2
    elif keep == "near":
        pick = np.zeros_like(sizes)
    elif keep == "far":
        pick = sizes - 1
    elif keep == "random":
        pick = np.array([_hash_index(seed, min(uids[order[s:s + z]]), z)
                         for s, z in zip(starts, sizes)], dtype=np.int64)
    else:
        raise ValueError(f"unknown keep policy {keep!r}")
    kept_of_comp = order[starts + pick]
    comp_index = np.repeat(np.arange(len(starts)), sizes)
    kept = np.empty(n, np.int64)
    kept[order] = kept_of_comp[comp_index]
    return kept


def _hash_index(seed: int, key: str, size: int) -> int:
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % int(size)


def semdedup(x: np.ndarray, centroid_cos: np.ndarray, uids: np.ndarray, eps: float,
             keep: Literal["far", "near"] = "far", block: int = BLOCK,
             stats: PairStats | None = None) -> np.ndarray:
    """SemDeDup-style policy: walk members in rank order (farthest from the centroid first
    for `far`); a member is dropped when some earlier member has cos > 1 - eps, whatever
    became of that earlier member. Returns, per row, the index of the kept row it maps to
    (itself when kept)."""
    n = len(x)
    st = stats if stats is not None else PairStats()
    sign = 1.0 if keep == "far" else -1.0
    order = np.lexsort((uids, sign * centroid_cos.astype(np.float64)))
    xs = np.ascontiguousarray(np.asarray(x, np.float32)[order])
    threshold = 1.0 - eps
    earliest = np.arange(n)   # in rank positions
    nb = (n + block - 1) // block
    for bi, bj in _block_order(nb):
        i0, i1 = bi * block, min(n, (bi + 1) * block)
        j0, j1 = bj * block, min(n, (bj + 1) * block)
        sim = xs[i0:i1] @ xs[j0:j1].T
        st.blocks += 1
        st.flops += 2.0 * (i1 - i0) * (j1 - j0) * xs.shape[1]
        ii, jj = np.nonzero(sim > threshold - float32_margin(xs.shape[1]))
        ii, jj = ii + i0, jj + j0
        keepm = jj > ii
        ii, jj = ii[keepm], jj[keepm]
        if len(ii):
            ok = _exact(xs, ii, jj) > threshold
            st.rechecked += len(ii)
            ii, jj = ii[ok], jj[ok]
            st.edges += len(ii)
            np.minimum.at(earliest, jj, ii)
    st.pairs += n * (n - 1) // 2
    # Follow pointers to a kept member: the earliest pointer strictly decreases.
    target = earliest.copy()
    for p in range(n):
        if target[p] != p:
            target[p] = target[target[p]]
    kept = np.empty(n, np.int64)
    kept[order] = order[target]
    return kept
