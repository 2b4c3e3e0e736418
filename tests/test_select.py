"""The selection core end to end on synthetic embeddings."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipelines import bands, cluster, select
from pipelines.synth import embeddings as synth
from pipelines.errors import ConfigError, InputError, WarrenError
from tests.embedding_fixtures import check_accounting, unit, write_laion, write_warren_parquet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(k=8, avg_cluster=1000, train_sample=20_000)


@pytest.fixture(scope="module")
def synth_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    info = synth.generate(synth.SynthConfig(n=12_000, dim=256, shards=3, avg_cluster=1500, seed=7),
                          str(root / "src"), progress=False)
    return str(root / "src"), info


@pytest.fixture(scope="module")
def synth_run(synth_src, tmp_path_factory):
    src, _ = synth_src
    out = str(tmp_path_factory.mktemp("run") / "out")
    stats = select.run(select.SelectConfig(**CFG), src, out, progress=False)
    return src, out, stats


def source_uids(src):
    return pl.read_parquet(os.path.join(src, "metadata", "*.parquet"))["key"].to_list()


def test_outputs_and_accounting(synth_run):
    src, out, stats = synth_run
    for f in ("coreset.parquet", "rejects.parquet", "centroids.npy", "stats.json", "manifest.json"):
        assert os.path.exists(os.path.join(out, f)), f
    core, rej = check_accounting(source_uids(src), out)
    c = pl.read_parquet(os.path.join(out, "coreset.parquet"))
    assert c.columns[:6] == ["uid", "url", "caption", "cluster", "clip_score", "centroid_cos"]
    assert "width" in c.columns                      # carried metadata
    r = pl.read_parquet(os.path.join(out, "rejects.parquet"))
    assert set(r["stage"]) == {"dedup", "clip_band", "centroid_band"}
    assert r.filter(pl.col("stage") == "dedup")["kept_uid"].null_count() == 0
    assert set(r.filter(pl.col("stage") == "dedup")["kept_uid"]) <= set(c["uid"]) | set(
        r.filter(pl.col("stage") != "dedup")["uid"])
    f = stats["funnel"]
    assert f["input"] == 12_000 and f["sample"] == c.height
    assert np.load(os.path.join(out, "centroids.npy")).shape == (8, 256)
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["tables"]["coreset"]["rows"] == c.height
    assert m["tables"]["rejects"]["rows"] == r.height


def test_planted_duplicates_recall_and_no_false_merges(synth_src, synth_run):
    src, out, _ = synth_run
    truth = pl.read_parquet(os.path.join(src, "truth.parquet"))
    rej = pl.read_parquet(os.path.join(out, "rejects.parquet")).filter(pl.col("stage") == "dedup")
    j = (rej.join(truth, on="uid")
         .join(truth.select(kept_uid="uid", kept_group="dup_group"), on="kept_uid"))
    # no false merge: every removed row was planted in the same group as its kept row
    assert j.filter((pl.col("dup_group") < 0) | (pl.col("dup_group") != pl.col("kept_group"))).height == 0
    planted = truth.filter(pl.col("dup_group") >= 0).group_by("dup_group").len()
    expected_removals = int((planted["len"] - 1).sum())
    assert rej.height / expected_removals >= 0.99
    assert rej.height <= expected_removals
    # the giant placeholder group collapses to one kept member
    giant = truth.filter(pl.col("dup_group") == 0)["uid"]
    assert rej.filter(pl.col("uid").is_in(giant.implode())).height == len(giant) - 1


def reference_bands(survivors: pl.DataFrame, clip_band, cent_band, chained=True):
    def band(df, col, lo, hi):
        df = df.sort([col, "uid"], descending=[True, False])
        n = df.height
        return df.slice(int(np.floor(lo * n)), int(np.floor(hi * n)) - int(np.floor(lo * n)))
    a = band(survivors, "clip_score", *clip_band)
    if chained:
        return set(band(a, "centroid_cos", *cent_band)["uid"])
    b = band(survivors, "centroid_cos", *cent_band)   # Bunny's release: both over the same input
    return set(a["uid"]) & set(b["uid"])


def test_bands_are_chained_not_independent(synth_run):
    src, out, _ = synth_run
    surv = pl.read_parquet(os.path.join(out, "_work", "dedup", "*.parquet"))
    chained = reference_bands(surv, (0.4, 0.6), (0.15, 0.35))
    wrong = reference_bands(surv, (0.4, 0.6), (0.15, 0.35), chained=False)
    assert chained != wrong                       # the data tells the two apart
    core = set(pl.read_parquet(os.path.join(out, "coreset.parquet"))["uid"])
    assert core == chained
    # sizes follow the rule: 40-60% then 15-35% of that
    n = surv.height
    m = int(np.floor(0.6 * n)) - int(np.floor(0.4 * n))
    assert len(core) == int(np.floor(0.35 * m)) - int(np.floor(0.15 * m))


def test_same_seed_byte_identical_across_shard_counts(synth_src, tmp_path):
    src, _ = synth_src
    resharded = str(tmp_path / "one")
    synth.generate(synth.SynthConfig(n=12_000, dim=256, shards=1, avg_cluster=1500, seed=7),
                   resharded, progress=False)
    cfg = select.SelectConfig(**CFG, target=300, seed=3)
    select.run(cfg, src, str(tmp_path / "a"), progress=False)
    select.run(cfg, resharded, str(tmp_path / "b"), progress=False)
    for f in ("coreset.parquet", "rejects.parquet", "centroids.npy"):
        assert open(tmp_path / "a" / f, "rb").read() == open(tmp_path / "b" / f, "rb").read(), f
    assert pq.read_metadata(tmp_path / "a" / "coreset.parquet").num_rows == 300
    other = select.SelectConfig(**CFG, target=300, seed=4)
    select.run(other, src, str(tmp_path / "c"), progress=False)
    a = set(pl.read_parquet(tmp_path / "a" / "coreset.parquet")["uid"])
    c = set(pl.read_parquet(tmp_path / "c" / "coreset.parquet")["uid"])
    assert a != c
    check_accounting(source_uids(src), str(tmp_path / "c"))


def test_sample_is_order_free():
    uids = np.array([f"u{i}" for i in range(1000)], dtype=object)
    h = bands.uid_hash(uids)
    keep = bands.sample(h, uids, 100, seed=5)
    perm = np.random.default_rng(0).permutation(1000)
    keep_p = bands.sample(h[perm], uids[perm], 100, seed=5)
    assert set(uids[keep]) == set(uids[perm][keep_p]) and keep.sum() == 100


def test_parquet_layout_equals_laion_layout(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 3000, 64
    centers = unit(rng.standard_normal((4, d)))
    img = unit(centers[rng.integers(0, 4, n)] + 0.9 * rng.standard_normal((n, d)) / np.sqrt(d))
    img[100:110] = unit(img[100] + 0.05 * rng.standard_normal((10, d)) / np.sqrt(d))
    txt = unit(0.3 * img + rng.standard_normal((n, d)) / np.sqrt(d))
    uids = [f"s{i:05d}" for i in range(n)]
    write_laion(str(tmp_path / "laion"), img, txt, uids, shards=2)
    write_warren_parquet(str(tmp_path / "pq"), img, txt, uids, shards=3)
    cfg = select.SelectConfig(k=4, train_sample=3000)
    select.run(cfg, str(tmp_path / "laion"), str(tmp_path / "o1"), progress=False)
    select.run(select.SelectConfig(**{**cfg.to_dict(), "uid_column": "uid"}),
               str(tmp_path / "pq"), str(tmp_path / "o2"), progress=False)
    a = pl.read_parquet(tmp_path / "o1" / "coreset.parquet")
    b = pl.read_parquet(tmp_path / "o2" / "coreset.parquet")
    assert a.select("uid", "cluster", "clip_score", "centroid_cos").equals(
        b.select("uid", "cluster", "clip_score", "centroid_cos"))
    r = pl.read_parquet(tmp_path / "o2" / "rejects.parquet")
    assert r.filter(pl.col("stage") == "dedup").height == 9
    check_accounting(uids, str(tmp_path / "o2"))


# -- bad input ------------------------------------------------------------------------
def small(rng, n=400, d=32):
    img = unit(rng.standard_normal((n, d)))
    txt = unit(img + rng.standard_normal((n, d)))
    return img, txt


def test_bad_rows_become_rejects_with_reasons(tmp_path):
    rng = np.random.default_rng(1)
    img, txt = small(rng)
    img[3] = np.nan
    img[5] = 0
    txt[7, 2] = np.inf
    txt[9] = 0
    uids = [f"r{i:04d}" for i in range(400)]
    write_laion(str(tmp_path / "src"), img, txt, uids, shards=2)
    select.run(select.SelectConfig(k=2), str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    r = pl.read_parquet(tmp_path / "out" / "rejects.parquet").filter(pl.col("stage") == "validate")
    assert dict(zip(r["uid"], r["reason"])) == {
        "r0003": "nan_embedding", "r0005": "zero_embedding",
        "r0007": "nan_text_embedding", "r0009": "zero_text_embedding"}
    check_accounting(uids, str(tmp_path / "out"))


def test_wrong_dimension_rows_in_parquet_are_rejected(tmp_path):
    import pyarrow as pa
    rng = np.random.default_rng(2)
    img, txt = small(rng, 300, 16)
    rows = [list(map(float, v)) for v in img]
    rows[10] = rows[10][:12]
    t = pa.table({"uid": [f"p{i}" for i in range(300)],
                  "img_emb": pa.array(rows, pa.list_(pa.float32())),
                  "txt_emb": pa.array([list(map(float, v)) for v in txt], pa.list_(pa.float32()))})
    os.makedirs(tmp_path / "src")
    pq.write_table(t, tmp_path / "src" / "emb_00000.parquet")
    select.run(select.SelectConfig(k=2, uid_column="uid"), str(tmp_path / "src"),
               str(tmp_path / "out"), progress=False)
    r = pl.read_parquet(tmp_path / "out" / "rejects.parquet").filter(pl.col("stage") == "validate")
    assert r.rows() == [("p10", "validate", "wrong_dim", None)]
    check_accounting([f"p{i}" for i in range(300)], str(tmp_path / "out"))


def expect_input_error(tmp_path, match, cfg=None):
    with pytest.raises(InputError, match=match):
        select.run(cfg or select.SelectConfig(k=2), str(tmp_path / "src"), str(tmp_path / "out"),
                   progress=False)


def test_wrong_dimension_shard_is_an_error(tmp_path):
    rng = np.random.default_rng(3)
    img, txt = small(rng)
    write_laion(str(tmp_path / "src"), img, txt, shards=2)
    np.save(tmp_path / "src" / "img_emb" / "img_emb_0001.npy", np.zeros((200, 48), np.float16))
    expect_input_error(tmp_path, r"img_emb_0001\.npy.*dimension 48 differs")


def test_row_count_mismatch_is_an_error(tmp_path):
    rng = np.random.default_rng(4)
    img, txt = small(rng)
    write_laion(str(tmp_path / "src"), img, txt, shards=2)
    np.save(tmp_path / "src" / "img_emb" / "img_emb_0000.npy", np.asarray(img[:150], np.float16))
    expect_input_error(tmp_path, r"metadata_0000\.parquet.*200 metadata rows but 150 embedding rows")


def test_duplicate_uids_are_an_error_naming_both_rows(tmp_path):
    rng = np.random.default_rng(5)
    img, txt = small(rng)
    uids = [f"d{i}" for i in range(400)]
    uids[350] = "d17"
    write_laion(str(tmp_path / "src"), img, txt, uids, shards=2)
    expect_input_error(tmp_path, r"metadata_0001\.parquet, row 150, field 'key': duplicate uid 'd17' "
                                 r"\(also at .*metadata_0000\.parquet row 17\)")


def test_missing_uid_column_is_an_error(tmp_path):
    rng = np.random.default_rng(6)
    img, txt = small(rng)
    write_laion(str(tmp_path / "src"), img, txt, uid_column="id")
    expect_input_error(tmp_path, r"metadata_0000\.parquet, field 'key': missing column 'key'")


def test_unreadable_files_are_errors(tmp_path):
    rng = np.random.default_rng(7)
    img, txt = small(rng)
    write_laion(str(tmp_path / "src"), img, txt, shards=2)
    (tmp_path / "src" / "metadata" / "metadata_0001.parquet").write_bytes(b"not parquet at all")
    expect_input_error(tmp_path, r"metadata_0001\.parquet.*unreadable Parquet")
    write_laion(str(tmp_path / "src"), img, txt, shards=2)
    (tmp_path / "src" / "img_emb" / "img_emb_0000.npy").write_bytes(b"\x93NUMPY garbage")
    expect_input_error(tmp_path, r"img_emb_0000\.npy.*unreadable npy")


def test_empty_shard_is_fine(tmp_path):
    rng = np.random.default_rng(8)
    img, txt = small(rng)
    uids = [f"e{i}" for i in range(400)]
    write_laion(str(tmp_path / "src"), img, txt, uids, shards=1)
    write_laion(str(tmp_path / "empty"), img[:0], txt[:0], [], shards=1)
    for sub, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        os.replace(tmp_path / "empty" / sub / f"{sub}_0000.{ext}", tmp_path / "src" / sub / f"{sub}_0001.{ext}")
    stats = select.run(select.SelectConfig(k=2), str(tmp_path / "src"), str(tmp_path / "out"),
                       progress=False)
    assert stats["shards"] == 2 and stats["input_rows"] == 400
    check_accounting(uids, str(tmp_path / "out"))


def test_clip_band_without_text_is_a_config_error(tmp_path):
    rng = np.random.default_rng(9)
    img, _ = small(rng)
    write_laion(str(tmp_path / "src"), img, None)
    with pytest.raises(ConfigError, match="--clip-band none"):
        select.run(select.SelectConfig(k=2), str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    select.run(select.SelectConfig(k=2, clip_band=None), str(tmp_path / "src"), str(tmp_path / "out2"),
               progress=False)
    check_accounting([f"u{i:06d}" for i in range(400)], str(tmp_path / "out2"))


def test_config_collects_every_problem():
    with pytest.raises(ConfigError) as e:
        select.SelectConfig(threshold=1.5, clip_band=(0.7, 0.2), keep="best")
    assert len(e.value.problems) == 3


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
    rng = np.random.default_rng(10)
    img, txt = small(rng)
    write_laion(str(tmp_path / "src"), img, txt, uid_column="id")
    p = subprocess.run([sys.executable, "-m", "flows.cli", "select", "--input", str(tmp_path / "src"),
                        "--output", str(tmp_path / "out"), "--k", "2", "--quiet"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("warren select: error: ") and "missing column 'key'" in lines[-1]
    assert "Traceback" not in p.stderr


# -- resume ---------------------------------------------------------------------------
def test_partial_run_resumes_to_the_same_result(synth_src, synth_run, tmp_path):
    src, full, _ = synth_run
    cfg = select.SelectConfig(**CFG)
    out = str(tmp_path / "out")
    p = select.plan(cfg, src, out)
    for s in range(p["shards"]):
        select.stage_validate(cfg, src, out, s)
    select.stage_train(cfg, src, out)
    select.stage_assign(cfg, src, out, 0)
    with pytest.raises(WarrenError, match="dedup of bucket 0 needs every shard assigned; "
                                          "shard 1 is not"):
        select.stage_dedup(cfg, src, out, 0)   # a bucket missing shards 1, 2 is refused
    assert not os.path.exists(os.path.join(out, "_work", "_completions", "dedup-00000.json"))
    select.run(cfg, src, out, progress=False)
    for f in ("coreset.parquet", "rejects.parquet"):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(full, f), "rb").read()


SELECT_DRIVER = """
import sys, time
from pipelines import select
from flows import cli

real = select.stage_dedup
def parked(cfg, src, out, bucket):
    # buckets after the first wait here until killed: the kill lands at a known point
    # however busy the machine is
    while bucket > 0:
        time.sleep(60)
    return real(cfg, src, out, bucket)
select.stage_dedup = parked
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigkill_during_dedup_then_resume(synth_src, synth_run, tmp_path):
    src, full, _ = synth_run
    out = tmp_path / "out"
    args = ["select", "--input", src, "--output", str(out), "--k", "8", "--buckets", "8", "--quiet"]
    driver = tmp_path / "driver.py"
    driver.write_text(SELECT_DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / "_work" / "_completions" / "dedup-00000.json"
    deadline = time.monotonic() + 600           # generous: the run parks at the kill point
    while not marker.exists():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "coreset.parquet").exists()
    # a hidden temporary left by the kill is legitimate; every visible file is whole
    for dirpath, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.endswith(".parquet") and not f.startswith("."):
                pq.read_metadata(os.path.join(dirpath, f))
    cmd = [sys.executable, "-m", "flows.cli", *args]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run(cmd[:cmd.index("--output") + 1] + [str(clean)] + cmd[cmd.index("--output") + 2:],
                   cwd=ROOT, check=True, capture_output=True)
    for f in ("coreset.parquet", "rejects.parquet"):
        assert (out / f).read_bytes() == (clean / f).read_bytes()


# -- clustering -----------------------------------------------------------------------
def test_two_level_kmeans_close_to_flat():
    rng = np.random.default_rng(11)
    d, k_true = 64, 300
    centers = unit(rng.standard_normal((k_true, d)))
    x = unit(centers[rng.integers(0, k_true, 30_000)] + 0.5 * rng.standard_normal((30_000, d)) / np.sqrt(d))
    flat = cluster.train(x, 256, seed=0, niter=10)
    two = cluster.train(x, 256, seed=0, niter=10, two_level=True, nprobe=8)
    assert two.coarse is not None and two.k == 256 and flat.coarse is None
    _, cos_flat = cluster.assign(flat, x)
    lab_two, cos_two = cluster.assign(two, x)
    assert cos_two.mean() >= 0.97 * cos_flat.mean()
    exact = np.argmax(x @ two.fine.T, 1)
    assert (lab_two == exact).mean() >= 0.95


def test_pipelines_import_without_prefect():
    code = ("import sys; import pipelines.select, pipelines.readers, pipelines.synth.embeddings, "
            "pipelines.manifest; assert 'prefect' not in sys.modules, 'pipelines imported prefect'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_fsspec_output_matches_local(tmp_path):
    """An fsspec URL as output (here memory://: no memory maps, parts read whole) gives
    the same bytes as a local folder."""
    import fsspec
    src = str(tmp_path / "src")
    synth.generate(synth.SynthConfig(n=6000, dim=64, shards=2, avg_cluster=1000, seed=3), src,
                   progress=False)
    cfg = select.SelectConfig(k=6, avg_cluster=1000, train_sample=6000)
    local = select.run(cfg, src, str(tmp_path / "out"), progress=False)
    remote = select.run(cfg, src, "memory://warren-test/out", progress=False)
    fs = fsspec.filesystem("memory")
    try:
        assert remote["coreset_rows"] == local["coreset_rows"] > 0
        for f in ("coreset.parquet", "rejects.parquet"):
            assert fs.cat(f"/warren-test/out/{f}") == (tmp_path / "out" / f).read_bytes()
    finally:
        fs.rm("/warren-test", recursive=True)
