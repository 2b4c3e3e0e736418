"""`--dedup-scope global`: duplicates across k-means cluster borders, against the
components of the whole graph computed by brute force."""
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from pipelines import cluster, dedup, select
from pipelines.errors import ConfigError
from pipelines.readers import to_float16
from tests.embedding_fixtures import check_accounting, unit, write_laion

T = 0.86


def planted(seed=0, d=32, per=500, pairs=12):
    """Three clusters and, on each of the three borders, `pairs` duplicate pairs whose
    halves lie on either side (each nearer its own centre), plus chains a~b~c across."""
    rng = np.random.default_rng(seed)
    centers = unit(rng.standard_normal((3, d)))
    rows, cross = [], []
    for c in centers:
        rows.append(unit(c + 0.55 * rng.standard_normal((per, d)) / np.sqrt(d)))
    x = np.concatenate(rows)
    extra = []
    for a, b in ((0, 1), (1, 2), (0, 2)):
        mid, u = unit(centers[a] + centers[b]), unit(centers[a] - centers[b])
        for _ in range(pairs):
            w = unit(rng.standard_normal(d))
            w = unit(w - (w @ mid) * mid - (w @ u) * u)
            p = unit(mid + 1.0 * w)         # pairs far apart from each other
            xa, xb = unit(p + 0.2 * u), unit(p - 0.2 * u)
            assert xa @ xb > T + 0.01 and xa @ centers[a] > xa @ centers[b] \
                and xb @ centers[b] > xb @ centers[a]
            cross.append((len(x) + len(extra), len(x) + len(extra) + 1))
            extra += [xa, xb]
    x = np.concatenate([x, np.asarray(extra)]).astype(np.float32)
    return x, cross


def stored(img16):
    """The vectors dedup compares: read as float16, scaled to unit length in float32,
    stored as float16 (the library's own conversions)."""
    return to_float16(cluster.unit(img16.astype(np.float32)))


def brute_groups(x16, uids):
    x = x16.astype(np.float64)
    adj = (x @ x.T) > T
    np.fill_diagonal(adj, False)
    _, lab = connected_components(csr_matrix(adj), directed=False)
    groups = {}
    for u, l in zip(uids, lab):
        groups.setdefault(l, set()).add(u)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def warren_groups(out):
    rej = pq.read_table(os.path.join(out, "rejects.parquet")).to_pylist()
    groups = {}
    for r in rej:
        if r["stage"] == "dedup":
            groups.setdefault(r["kept_uid"], {r["kept_uid"]}).add(r["uid"])
    return {frozenset(g) for g in groups.values()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("global")
    x, cross = planted()
    rng = np.random.default_rng(1)
    uids = [f"g{i:05d}" for i in rng.permutation(len(x))]
    txt = unit(x + rng.standard_normal(x.shape))
    src = write_laion(str(root / "src"), x, txt, uids, shards=3)
    out = {}
    for scope in ("cluster", "global"):
        out[scope] = str(root / scope)
        stats = select.run(select.SelectConfig(k=3, buckets=3, dedup_scope=scope, clip_band=None,
                                               centroid_band=None), src, out[scope], progress=False)
        out[scope + "_stats"] = stats
    x16 = stored(x.astype(np.float16))
    return src, out, uids, cross, x16


def test_global_components_equal_the_whole_graph(runs):
    src, out, uids, cross, x16 = runs
    truth = brute_groups(x16, uids)
    assert warren_groups(out["global"]) == truth
    check_accounting(uids, out["global"])
    # the per-cluster scope misses the border pairs: the two differ on this data
    assert warren_groups(out["cluster"]) != truth


def assigned_clusters(out):
    """uid -> k-means cluster of every valid row, as the assign stage wrote them."""
    import glob

    import pyarrow as pa
    found = {}
    for f in glob.glob(os.path.join(out, "_work", "assign", "*.arrow")):
        with pa.ipc.open_file(f) as r:
            for i in range(r.num_record_batches):
                b = r.get_batch(i)
                vis = b.column("visit").to_numpy() if "visit" in b.schema.names else None
                for j, (u, c) in enumerate(zip(b.column("uid").to_pylist(),
                                               b.column("cluster").to_pylist())):
                    if vis is None or vis[j] < 0:
                        found[u] = c
    return found


def test_every_planted_border_pair_is_found(runs):
    src, out, uids, cross, x16 = runs
    core = set(pq.read_table(os.path.join(out["global"], "coreset.parquet")).column("uid").to_pylist())
    groups = warren_groups(out["global"])
    for a, b in cross:
        ua, ub = uids[a], uids[b]
        g = next((g for g in groups if ua in g), None)
        assert g is not None and ub in g, (ua, ub)
        assert len(g & core) == 1                              # one kept per component
    # the pairs k-means split are exactly the ones the per-cluster scope misses
    cl = assigned_clusters(out["global"])
    assert cl == assigned_clusters(out["cluster"])
    split = {(uids[a], uids[b]) for a, b in cross if cl[uids[a]] != cl[uids[b]]}
    local = warren_groups(out["cluster"])
    missed = {(uids[a], uids[b]) for a, b in cross
              if not any(uids[a] in g and uids[b] in g for g in local)}
    assert missed == split and len(split) >= 15
    st = out["global_stats"]["dedup"]["cross_border"]
    assert st["edges"] >= len(split) and st["joined_components"] >= len(split)


def test_global_equals_cluster_scope_when_no_pair_crosses(tmp_path):
    """No duplicates across borders: the two scopes write the same bytes."""
    rng = np.random.default_rng(5)
    centers = unit(rng.standard_normal((2, 32)))
    x = np.concatenate([unit(c + 0.5 * rng.standard_normal((400, 32)) / np.sqrt(32)) for c in centers])
    x[:5] = unit(x[0] + 0.02 * rng.standard_normal((5, 32)))        # a group inside a cluster
    txt = unit(x + rng.standard_normal(x.shape))
    src = write_laion(str(tmp_path / "src"), x, txt, shards=2)
    for scope in ("cluster", "global"):
        select.run(select.SelectConfig(k=2, dedup_scope=scope), src, str(tmp_path / scope),
                   progress=False)
    for f in ("coreset.parquet", "rejects.parquet"):
        assert (tmp_path / "cluster" / f).read_bytes() == (tmp_path / "global" / f).read_bytes()


def test_border_bound_never_misses_a_pair():
    """The border test against brute force on random unit vectors with random (not
    nearest) assignments: every pair above the threshold in different clusters is
    covered from at least one side."""
    rng = np.random.default_rng(3)
    d, k = 16, 7
    cents = unit(rng.standard_normal((k, d)))
    x = unit(rng.standard_normal((600, d)))
    x[300:] = unit(x[:300] + 0.3 * rng.standard_normal((300, d)) / np.sqrt(d))   # close pairs
    x16 = to_float16(x)
    lab = np.argmax(x @ cents.T, 1)
    lab[::7] = rng.integers(0, k, len(lab[::7]))        # some rows not at their nearest centroid
    r, c = dedup.border_candidates(x16.astype(np.float32), lab, cents, T)
    seen = set(zip(r.tolist(), c.tolist()))
    xs = x16.astype(np.float64)
    sim = xs @ xs.T
    pairs = 0
    for i, j in zip(*np.nonzero(np.triu(sim > T, 1))):
        if lab[i] != lab[j]:
            pairs += 1
            assert (i, lab[j]) in seen or (j, lab[i]) in seen
    assert pairs > 50
    assert len(seen) < 0.6 * 600 * (k - 1)        # and it is a filter, not everything


def test_global_scope_needs_the_bunny_policy():
    with pytest.raises(ConfigError, match="dedup_scope global .* policy must be bunny"):
        select.SelectConfig(dedup_scope="global", policy="semdedup", keep="far")
