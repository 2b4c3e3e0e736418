"""Dedup components and keep policies against brute force."""
import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from pipelines import dedup
from tests.embedding_fixtures import unit


def brute_components(x, t):
    """All-pairs float64 similarity + union-find (scipy), labels = smallest member index."""
    x = np.asarray(x, np.float64)
    adj = (x @ x.T) > t
    np.fill_diagonal(adj, False)
    _, lab = connected_components(csr_matrix(adj), directed=False)
    first = {}
    for i, l in enumerate(lab):
        first.setdefault(l, i)
    return np.array([first[l] for l in lab])


def chained_cluster(rng, n, d, n_chains=30, n_groups=40, giant=0):
    """A cluster with near-dup groups, chains a~b~c (a not~ c) and an optional giant group."""
    c = unit(rng.standard_normal(d))
    x = unit(c + 1.2 * rng.standard_normal((n, d)) / np.sqrt(d))
    pos = 0
    for _ in range(n_chains):
        b = x[pos + 1]
        u = rng.standard_normal(d)
        u = unit(u - (u @ b) * b)
        x[pos] = unit(0.93 * b + np.sqrt(1 - 0.93 ** 2) * u)
        x[pos + 2] = unit(0.93 * b - np.sqrt(1 - 0.93 ** 2) * u)
        pos += 3
    for _ in range(n_groups):
        g = rng.integers(2, 5)
        x[pos:pos + g] = unit(x[pos] + 0.2 * rng.standard_normal((g, d)) / np.sqrt(d))
        pos += g
    if giant:
        x[pos:pos + giant] = unit(c + 0.05 * rng.standard_normal((giant, d)) / np.sqrt(d))
    return x.astype(np.float16)


@pytest.mark.parametrize("method", ["int8", "float32", "baseline"])
@pytest.mark.parametrize("block", [64, 300, 4096])
def test_components_equal_brute_force(method, block):
    rng = np.random.default_rng(block)
    x = chained_cluster(rng, 1500, 128, giant=400)
    expected = brute_components(x, 0.86)
    st = dedup.PairStats()
    got = dedup.components(x, 0.86, block=block, method=method, stats=st)
    np.testing.assert_array_equal(got, expected)
    assert st.pairs == 1500 * 1499 // 2
    # the giant group is one component of exactly 400 members
    _, counts = np.unique(got, return_counts=True)
    assert counts.max() >= 400


def test_chains_are_components_not_pairwise():
    rng = np.random.default_rng(1)
    x = chained_cluster(rng, 400, 256, n_chains=10, n_groups=0)
    xf = x.astype(np.float64)
    for c in range(10):
        a, b, cc = 3 * c, 3 * c + 1, 3 * c + 2
        assert xf[a] @ xf[b] > 0.86 and xf[b] @ xf[cc] > 0.86 and xf[a] @ xf[cc] < 0.86
    lab = dedup.components(x, 0.86, block=64)
    for c in range(10):
        assert lab[3 * c] == lab[3 * c + 1] == lab[3 * c + 2] == 3 * c


def near_threshold_pairs(seed: int = 2, n: int = 300, d: int = 256, threshold: float = 0.86):
    """n rows and n twins whose cosine to their row lies within 1e-3 of the threshold,
    on both sides (float64; callers cast)."""
    rng = np.random.default_rng(seed)
    base = unit(rng.standard_normal((n, d)))
    u = rng.standard_normal((n, d))
    u = unit(u - (u * base).sum(1, keepdims=True) * base)
    cos = threshold + rng.uniform(-1e-3, 1e-3, n)
    twin = unit(base * cos[:, None] + np.sqrt(1 - cos ** 2)[:, None] * u)
    return np.concatenate([base, twin])


def test_int8_decides_near_threshold_pairs_exactly():
    """Pairs planted within 1e-3 of the threshold, on both sides: the int8 screen must
    send them to the exact recheck and decide them like float64 does."""
    x = near_threshold_pairs().astype(np.float32)
    st = dedup.PairStats()
    got = dedup.components(x, 0.86, block=128, method="int8", stats=st)
    np.testing.assert_array_equal(got, brute_components(x, 0.86))
    assert st.rechecked >= 300


def twins(where: str, seed: int = 7, n: int = 2400, d: int = 256, pairs: int = 150,
          threshold: float = 0.86):
    """An ordinary cluster (chained_cluster) in which `pairs` rows get a twin whose cosine
    to them lies within 1e-3 of the threshold, on both sides. `where` the two differ:
    "last" -- in the last quarter of the coordinates, so a head screen sees only part of
    their similarity and must bound the rest; "first" -- in the first quarter only, inside
    any head, so the rest is equal and its Cauchy-Schwarz bound is exact: a bound that
    rounded the rest down by any margin would drop the twins above the threshold."""
    rng = np.random.default_rng(seed)
    x = chained_cluster(rng, n, d, n_chains=20, n_groups=30).astype(np.float64)
    f = d // 4                        # the narrowest head a plan may choose (HEAD_SHARES)
    ok = np.flatnonzero((unit(x)[:, :f] ** 2).sum(1) > 0.1)     # room for the rotation
    idx = rng.choice(ok[ok >= 200], 2 * pairs, replace=False)
    a, b = idx[:pairs], idx[pairs:]
    base = unit(x[a])
    cos = threshold + rng.uniform(-1e-3, 1e-3, pairs)
    u = rng.standard_normal((pairs, d))
    if where == "last":
        u[:, :-d // 4] = 0
        u = unit(u - (u * base).sum(1, keepdims=True) * base)
        x[b] = unit(base * cos[:, None] + np.sqrt(1 - cos ** 2)[:, None] * u)
    else:                 # rotate the first d/4 coordinates by the angle that gives `cos`
        head = base[:, :f]
        h2 = (head ** 2).sum(1, keepdims=True)
        w = u[:, :f] - (u[:, :f] * head).sum(1, keepdims=True) / h2 * head
        w = w / np.linalg.norm(w, axis=1, keepdims=True) * np.sqrt(h2)
        c = 1 - (1 - cos[:, None]) / h2                 # cos of the rotation
        assert (np.abs(c) < 1).all()
        x[b] = base
        x[b, :f] = c * head + np.sqrt(1 - c ** 2) * w
    return x.astype(np.float16), a, b


@pytest.mark.parametrize("where", ["last", "first"])
def test_head_screen_bounds_every_pair_from_above(where):
    x, _, _ = twins(where)
    xf = x.astype(np.float64)
    for m, r in ((64, 8), (128, 16), (200, 8)):
        z = dedup._head_rows(x, m, r).numpy().astype(np.float64)
        assert ((z @ z.T) >= (xf @ xf.T) - 1e-12).all(), (m, r)


@pytest.mark.parametrize("where", ["last", "first"])
def test_head_screen_keeps_every_pair_near_the_threshold(monkeypatch, where):
    """The cheaper screen (a product over the first m coordinates plus a Cauchy-Schwarz
    bound on the rest) must pass every pair near the threshold, however its similarity
    is split: the graph equals brute force, and the screen did run (fewer multiply-adds
    than the full int8 product)."""
    monkeypatch.setattr(dedup, "HEAD_ROW_COST", 0.0)     # a test-sized cluster, screened
    x, a, b = twins(where)
    assert dedup.head_plan(x, 0.86, 256) is not None
    expected = brute_components(x, 0.86)
    xf = x.astype(np.float64)
    above = (xf[a] * xf[b]).sum(1) > 0.86
    assert 20 < above.sum() < 130                  # twins on both sides of the threshold
    assert (expected[a[above]] == expected[b[above]]).all()
    st = dedup.PairStats()
    got = dedup.components(x, 0.86, block=256, stats=st)
    np.testing.assert_array_equal(got, expected)
    monkeypatch.setattr(dedup, "head_plan", lambda *args: None)
    full = dedup.PairStats()
    np.testing.assert_array_equal(dedup.components(x, 0.86, block=256, stats=full), expected)
    assert st.flops < 0.8 * full.flops and st.rechecked >= 100


def test_head_screen_is_declined_where_it_cannot_pay(monkeypatch):
    """A near-duplicate clique (every row would need the full product after the screen)
    and a small cluster (its product is cheap next to the screen's fixed cost per row)."""
    rng = np.random.default_rng(4)
    ordinary = chained_cluster(rng, 2000, 128)
    assert dedup.head_plan(ordinary, 0.86, 256) is None              # 2,000 rows: too small
    monkeypatch.setattr(dedup, "HEAD_ROW_COST", 0.0)
    assert dedup.head_plan(ordinary, 0.86, 256) is not None
    c = unit(rng.standard_normal(128))
    x = unit(c + 0.05 * rng.standard_normal((2000, 128)) / np.sqrt(128)).astype(np.float16)
    assert dedup.head_plan(x, 0.86, 256) is None


def test_keep_policies():
    labels = np.array([0, 0, 0, 0, 4, 0])
    cos = np.array([0.9, 0.5, 0.7, 0.6, 0.3, 0.8], np.float32)
    uids = np.array(["a", "b", "c", "d", "e", "f"], dtype=object)
    # component {0,1,2,3,5}: ascending distance = descending cos: a(.9) f(.8) c(.7) d(.6) b(.5)
    assert dedup.choose(labels, cos, uids, "near")[0] == 0
    assert dedup.choose(labels, cos, uids, "far")[0] == 1
    assert dedup.choose(labels, cos, uids, "middle")[0] == 2   # index 5 // 2 = 2 -> c
    kept = dedup.choose(labels, cos, uids, "middle")
    assert list(kept) == [2, 2, 2, 2, 4, 2]
    r1 = dedup.choose(labels, cos, uids, "random", seed=1)
    assert r1[4] == 4 and len(set(r1[[0, 1, 2, 3, 5]])) == 1
    assert list(r1) == list(dedup.choose(labels, cos, uids, "random", seed=1))
    picks = {int(dedup.choose(labels, cos, uids, "random", seed=s)[0]) for s in range(40)}
    assert picks == {0, 1, 2, 3, 5}


def test_middle_of_even_component_and_ties_by_uid():
    labels = np.zeros(4, int)
    cos = np.array([0.5, 0.5, 0.9, 0.1], np.float32)
    uids = np.array(["z", "y", "x", "w"], dtype=object)
    # order: x(.9), y(.5), z(.5) [tie by uid], w(.1); len 4 -> index 2 -> z
    assert dedup.choose(labels, cos, uids, "middle")[0] == 0


def test_semdedup_matches_greedy_reference():
    rng = np.random.default_rng(3)
    x = chained_cluster(rng, 600, 128)
    cos = rng.uniform(0.3, 0.9, 600).astype(np.float32)
    uids = np.array([f"{i:04d}" for i in range(600)], dtype=object)
    kept = dedup.semdedup(x, cos, uids, eps=0.14, keep="far", block=97)
    order = np.lexsort((uids, cos.astype(np.float64)))        # far first = lowest cos first
    xs = x[order].astype(np.float64)
    sim = xs @ xs.T
    removed = np.zeros(600, bool)
    for j in range(600):
        removed[j] = (sim[:j, j] > 0.86).any()
    got_removed = kept[order] != order
    np.testing.assert_array_equal(got_removed, removed)
    assert (kept[kept] == kept).all()   # every pointer lands on a kept row
