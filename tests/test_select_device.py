"""The device path (torch: k-means, assignment, the int8 pairwise screen) forced onto
the CPU: the same graph and centroids as exact arithmetic gives, whatever the order of
summation a GPU would use, and whole runs byte-identical to the CPU's."""
import os

import numpy as np
import pytest

from pipelines import cluster, dedup, kmeans, select
from pipelines.errors import ConfigError
from tests.embedding_fixtures import check_accounting, unit, write_laion
from tests.test_dedup import brute_components, chained_cluster, near_threshold_pairs


@pytest.mark.parametrize("n,block", [(1500, 64), (2050, 2048), (700, 300), (333, 4096)])
def test_int8_screen_on_a_device_gives_the_cpu_graph(n, block):
    rng = np.random.default_rng(n)
    x = chained_cluster(rng, n, 72, giant=min(300, n // 3))     # d = 72: GEMM padding
    st_dev, st_cpu = dedup.PairStats(), dedup.PairStats()
    got = dedup.components(x, 0.86, block=block, stats=st_dev, device="cpu")
    cpu = dedup.components(x, 0.86, block=block, stats=st_cpu)
    np.testing.assert_array_equal(got, cpu)
    np.testing.assert_array_equal(got, brute_components(x, 0.86))
    assert st_dev.edges == st_cpu.edges and st_dev.blocks == st_cpu.blocks


def test_near_threshold_pairs_on_a_device_are_decided_exactly():
    x = near_threshold_pairs().astype(np.float16)
    st = dedup.PairStats()
    got = dedup.components(x, 0.86, block=128, stats=st, device="cpu")
    np.testing.assert_array_equal(got, brute_components(x, 0.86))
    assert st.rechecked >= 300


def test_exact_nearest_centroid_breaks_ties_by_index():
    rng = np.random.default_rng(0)
    c = unit(rng.standard_normal((20, 24)))
    c[7] = c[3]                                   # an exact tie: 3 must win
    c[11] = unit(c[5] + 1e-7 * rng.standard_normal(24))      # within rounding of 5
    x = unit(np.concatenate([c + 0.01 * rng.standard_normal((20, 24)),
                             rng.standard_normal((2000, 24))]))
    x[:20] = c                                    # rows exactly on centroids
    got = kmeans.nearest(x, c, "cpu")
    ex = x.astype(np.float64) @ c.astype(np.float64).T
    want = np.argmax(ex, 1)                       # first index of the maximum
    np.testing.assert_array_equal(got, want)
    assert got[7] == 3


def test_centroid_sums_do_not_depend_on_row_order():
    """A GPU adds in another order: the fixed-point sums make that irrelevant."""
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((5000, 48)))
    c = unit(rng.standard_normal((12, 48)))
    lab = kmeans.nearest(x, c, "cpu")
    a = kmeans.update(x, lab, c, "cpu")
    perm = rng.permutation(len(x))
    b = kmeans.update(x[perm], lab[perm], c, "cpu")
    assert a.tobytes() == b.tobytes()
    # a float32 sum in another order is not bit-stable, which is why the sums are integers
    f1 = np.add.reduceat(x[np.argsort(lab, kind="stable")], np.r_[0, np.cumsum(np.bincount(lab))[:-1]])
    f2 = np.zeros_like(f1)
    for i in perm:
        f2[lab[i]] += x[i]
    assert f1.tobytes() != f2.tobytes()


def test_exact_kmeans_two_level_close_to_flat():
    rng = np.random.default_rng(11)
    d, k_true = 32, 120
    centers = unit(rng.standard_normal((k_true, d)))
    x = unit(centers[rng.integers(0, k_true, 12_000)] + 0.5 * rng.standard_normal((12_000, d)) / np.sqrt(d))
    flat = cluster.train(x, 100, seed=0, niter=10, device="cpu")
    two = cluster.train(x, 100, seed=0, niter=10, two_level=True, device="cpu")
    again = cluster.train(x, 100, seed=0, niter=10, two_level=True, device="cpu")
    assert two.fine.tobytes() == again.fine.tobytes()
    _, cos_flat = cluster.assign(flat, x, device="cpu")
    lab, cos_two = cluster.assign(two, x, device="cpu")
    assert cos_two.mean() >= 0.97 * cos_flat.mean()
    np.testing.assert_array_equal(lab, np.argmax(x.astype(np.float64) @ two.fine.astype(np.float64).T, 1))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    rng = np.random.default_rng(4)
    n, d = 4000, 40
    centers = unit(rng.standard_normal((5, d)))
    img = unit(centers[rng.integers(0, 5, n)] + 0.7 * rng.standard_normal((n, d)) / np.sqrt(d))
    img[:40] = unit(img[0] + 0.03 * rng.standard_normal((40, d)))
    txt = unit(img + rng.standard_normal((n, d)))
    root = tmp_path_factory.mktemp("dev")
    return write_laion(str(root / "src"), img, txt, shards=3)


def test_a_run_on_the_device_path_equals_the_cpu_pairwise_step(src, tmp_path, monkeypatch):
    """device "cpu": torch k-means + the device pairwise code; the same run with the
    pairwise step swapped for the CPU's numpy code writes the same bytes."""
    cfg = select.SelectConfig(k=5, device="cpu", target=500)
    a = select.run(cfg, src, str(tmp_path / "a"), progress=False)
    assert a["train"]["device"] == "cpu"
    calls = []
    real = dedup._components_int8

    def cpu_only(device, x, threshold, block, labels, st):
        calls.append(len(x))
        return real(x, threshold, block, labels, st)
    monkeypatch.setattr(dedup, "_components_int8_on", cpu_only)
    select.run(cfg, src, str(tmp_path / "b"), progress=False)
    assert calls
    for f in ("coreset.parquet", "rejects.parquet", "centroids.npy"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    check_accounting([f"u{i:06d}" for i in range(4000)], str(tmp_path / "a"))


def test_resuming_on_another_kmeans_family_is_refused(src, tmp_path):
    out = str(tmp_path / "out")
    select.run(select.SelectConfig(k=5, device="faiss"), src, out, progress=False)
    select.run(select.SelectConfig(k=5, device="auto"), src, out, progress=False)   # follows the run
    with pytest.raises(ConfigError, match="k-means ran on faiss: resume it with --device faiss"):
        select.run(select.SelectConfig(k=5, device="cpu"), src, out, progress=False)
    assert os.path.exists(os.path.join(out, "coreset.parquet"))
