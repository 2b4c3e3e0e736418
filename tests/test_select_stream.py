"""The streaming finish and the bounded shuffle against their in-memory counterparts:
radix-selected band boundaries = `bands.band`, the k-way merge = one sort, and the whole
finish byte-identical to ranking and sorting everything in memory."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import bands, merge, ranks, report, select, storage
from pipelines.synth import embeddings as synth
from tests.embedding_fixtures import check_accounting, unit, write_laion
from tests.reference_finish import finish_in_memory


# -- radix selection ------------------------------------------------------------------
def split(n, parts, rng):
    cuts = np.sort(rng.choice(np.arange(1, max(2, n)), size=min(parts - 1, max(0, n - 1)),
                              replace=False)) if n > 1 else []
    return np.split(np.arange(n), cuts)


@pytest.mark.parametrize("trial", range(12))
def test_band_boundaries_equal_bands_band(trial):
    """Scores with heavy ties, -0.0 next to 0.0, NaN and inf; uids in random order."""
    rng = np.random.default_rng(trial)
    n = int(rng.integers(1, 4000))
    pool = np.r_[rng.standard_normal(40).astype(np.float32), [0.0, -0.0, np.nan, np.inf, -np.inf]]
    scores = (rng.choice(pool, n) if trial % 2 else rng.standard_normal(n)).astype(np.float32)
    uids = pa.array([f"u{x:05d}" for x in rng.permutation(n)])
    parts = split(n, 7, rng)
    lo, hi = sorted(rng.uniform(0, 1, 2)) if trial % 3 else (0.0, 1.0)

    def uids_of(p):
        return lambda rows: uids.take(pa.array(p[rows]))

    def chunks():
        for p in parts:
            yield ranks.score_keys(scores[p]), uids_of(p)
    a, b = int(np.floor(lo * n)), int(np.floor(hi * n))
    first, last = ranks.boundaries(chunks, n, [a, b], 32)
    code = np.zeros(n, np.int8)
    for p in parts:
        k = ranks.score_keys(scores[p])
        code[p] = np.where(first.before(k, uids_of(p)), 1,
                           np.where(last.before(k, uids_of(p)), 0, 2))
    np.testing.assert_array_equal(code, bands.band(scores, uids, lo, hi))


@pytest.mark.parametrize("target", [0, 1, 17, 500, 999, 1000, 1500])
def test_sample_boundary_equals_bands_sample(target):
    """64-bit keys squeezed into 40 values: the cut falls inside runs of equal keys,
    which are ordered by uid."""
    rng = np.random.default_rng(target)
    n = 1000
    uids = pa.array([f"s{x:04d}" for x in rng.permutation(n)])
    hashes = (rng.integers(0, 40, n).astype(np.uint64) * np.uint64(0x0123456789ABCDEF))
    parts = split(n, 5, rng)

    def chunks():
        for p in parts:
            yield bands.mix(hashes[p], 3), lambda rows, p=p: uids.take(pa.array(p[rows]))
    (cut,) = ranks.boundaries(chunks, n, [target], 64)
    got = np.zeros(n, bool)
    for p in parts:
        got[p] = cut.before(bands.mix(hashes[p], 3), lambda rows, p=p: uids.take(pa.array(p[rows])))
    np.testing.assert_array_equal(got, bands.sample(hashes, uids, target, 3))
    assert got.sum() == min(target, n)


# -- external merge ---------------------------------------------------------------------
def test_merge_equals_one_sort_byte_for_byte(tmp_path, monkeypatch):
    """Many runs (more than the fan-in: merged in rounds), small read buffers, equal
    uids across runs: the file equals write_table of the concatenation sorted stably."""
    monkeypatch.setattr(merge, "FAN_IN", 4)
    monkeypatch.setattr(merge, "BUFFER", 37)
    rng = np.random.default_rng(0)
    runs, tables = [], []
    from pipelines import schemas
    for r in range(11):
        n = int(rng.integers(0, 400))
        t = pa.table({"uid": pa.array([f"k{x:04d}" for x in rng.integers(0, 3000, n)]),
                      "stage": pa.array(rng.choice(["dedup", "sample", "validate"], n)),
                      "reason": pa.array([f"r{r}"] * n), "kept_uid": pa.nulls(n, pa.string())})
        t = t.take(pa.compute.sort_indices(t, [("uid", "ascending"), ("stage", "ascending")]))
        # both kinds of run: Parquet (the stages' rejects) and Arrow streams (RunWriter's)
        if r % 2:
            path = str(tmp_path / f"run{r}.arrow")
            with merge.RunWriter(path, schemas.REJECTS, batch_rows=50) as w:
                w.write(t)
            with pa.ipc.open_stream(path) as rd:
                sizes = [b.num_rows for b in rd]
            assert sizes == [50] * (n // 50) + ([n % 50] if n % 50 else []), sizes
        else:
            path = str(tmp_path / f"run{r}.parquet")
            storage.write_table(t, path, row_group_size=70)
        runs.append(path)
        tables.append(t)
    whole = pa.concat_tables(tables)
    whole = whole.take(pa.compute.sort_indices(whole, [("uid", "ascending"), ("stage", "ascending")]))
    storage.write_table(whole, str(tmp_path / "ref.parquet"), schemas.REJECTS, row_group_size=500)
    seen = []
    n = merge.merge(runs, str(tmp_path / "out.parquet"), ["uid", "stage"], schemas.REJECTS,
                    str(tmp_path), on_chunk=lambda t: seen.append(t.num_rows), row_group_size=500)
    assert n == whole.num_rows == sum(seen) and pq.ParquetFile(tmp_path / "ref.parquet").num_row_groups > 3
    assert (tmp_path / "out.parquet").read_bytes() == (tmp_path / "ref.parquet").read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(p) for p in runs]
                                                  + ["out.parquet", "ref.parquet"])
    with pytest.raises(ValueError, match=r"must end in \.arrow"):
        merge.RunWriter(str(tmp_path / "run.parquet"), schemas.REJECTS)


# -- the whole finish ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    synth.generate(synth.SynthConfig(n=9000, dim=48, shards=3, avg_cluster=1000, seed=11),
                   str(root / "src"), progress=False)
    return str(root / "src")


CONFIGS = {
    "default": dict(k=6),
    "sampled": dict(k=6, target=700, seed=9),
    "no_bands": dict(k=6, clip_band=None, centroid_band=None, target=4000),
    "edges": dict(k=6, clip_band=(0.0, 1.0), centroid_band=(0.5, 1.0), keep="random", seed=2),
    "semdedup": dict(k=6, policy="semdedup", keep="far", buckets=4),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streaming_finish_is_byte_identical_to_in_memory(src, tmp_path, monkeypatch, name):
    monkeypatch.setattr(merge, "BUFFER", 113)          # many merge rounds
    # small row groups: the finish reads each bucket a row group at a time, and the
    # coreset is written in several row groups
    monkeypatch.setattr(merge, "RUN_ROWS", 40)
    monkeypatch.setattr(merge, "WIDE_OUTPUT_ROWS", 300)
    cfg = select.SelectConfig(**CONFIGS[name])
    out = str(tmp_path / "out")
    stats = select.run(cfg, src, out, progress=False)
    groups = [pq.ParquetFile(os.path.join(out, "_work", "dedup", f)).num_row_groups
              for f in os.listdir(os.path.join(out, "_work", "dedup")) if f.startswith("b")]
    assert max(groups) >= 3, groups
    finish_in_memory(out, cfg, str(tmp_path / "ref"))
    for f in ("coreset.parquet", "rejects.parquet"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    uids = pq.read_table(os.path.join(src, "truth.parquet")).column("uid").to_pylist()
    core, rej = check_accounting(uids, out)
    assert stats["coreset_rows"] == len(core) and stats["rejected_rows"] == len(rej)
    assert sum(sum(d.values()) for d in stats["rejects_by_stage"].values()) == len(rej)
    # nothing of the finish's own is left behind but its small per-bucket code files
    assert {f.split("-")[0] for f in os.listdir(os.path.join(out, "_work", "finish"))} == {"codes"}


def test_ties_in_clip_scores_are_ranked_by_uid(tmp_path):
    """Text = image for half the rows: their clip scores are 1.0 give or take a rounding,
    so thousands tie exactly; the band cuts through the tie and must follow uid order."""
    rng = np.random.default_rng(4)
    n, d = 3000, 32
    img = unit(rng.standard_normal((n, d)))
    txt = unit(img + rng.standard_normal((n, d)))
    txt[::2] = img[::2]
    uids = [f"t{x:05d}" for x in rng.permutation(n)]
    write_laion(str(tmp_path / "src"), img, txt, uids, shards=3)
    cfg = select.SelectConfig(k=3, clip_band=(0.1, 0.3), centroid_band=None)
    select.run(cfg, str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    c = pq.read_table(tmp_path / "out" / "coreset.parquet")
    top = c.column("clip_score").to_numpy()
    assert len(np.unique(top)) < len(top) / 10           # the band sits inside a tie
    finish_in_memory(str(tmp_path / "out"), cfg, str(tmp_path / "ref"))
    for f in ("coreset.parquet", "rejects.parquet"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_the_shuffle_writes_one_file_per_shard(src, tmp_path):
    cfg = select.SelectConfig(k=6, buckets=5)
    out = str(tmp_path / "out")
    select.run(cfg, src, out, progress=False)
    assert sorted(os.listdir(os.path.join(out, "_work", "assign"))) == [
        "s00000.arrow", "s00001.arrow", "s00002.arrow"]
    rows = 0
    for s in range(3):
        runs = storage.done_info(os.path.join(out, "_work"), f"assign-{s:05d}")["runs"]
        assert set(runs) <= set(range(5))
        with pa.ipc.open_file(os.path.join(out, "_work", "assign", f"s{s:05d}.arrow")) as r:
            assert r.num_record_batches == len(runs)
            rows += sum(r.get_batch(i).num_rows for i in range(len(runs)))
    assert rows == select.storage.read_json(os.path.join(out, "stats.json"))["funnel"]["valid"]


def test_report_reads_no_rejects_and_shows_every_section(src, tmp_path, monkeypatch):
    cfg = select.SelectConfig(k=6)
    out = str(tmp_path / "out")
    select.run(cfg, src, out, progress=False)
    opened = []
    real = storage.filesystem

    def spy(path):
        opened.append(str(path))
        return real(path)
    monkeypatch.setattr(storage, "filesystem", spy)
    page = open(report.write(out)).read()
    assert not [p for p in opened if p.endswith((".parquet", ".arrow"))]    # no table read
    for section in ("Funnel", "Rejects by stage and reason", "Cluster sizes", "Score bands",
                    "Duplicate groups", "Kept samples"):
        assert section in page, section
    # the figures the page states are the tables' own
    rej = pq.read_table(os.path.join(out, "rejects.parquet"))
    dups = rej.filter(pa.compute.equal(rej.column("stage"), "dedup"))
    groups = len(set(dups.column("kept_uid").to_pylist()))
    assert f"{rej.num_rows:,} rejected rows" in page
    assert f"of {groups:,} groups ({dups.num_rows:,} rows dropped as duplicates)" in page
    core = pq.read_table(os.path.join(out, "coreset.parquet"))
    at = np.unique(np.linspace(0, core.num_rows - 1, 24).astype(int))
    shown = select.storage.read_json(os.path.join(out, "stats.json"))["samples"]
    assert [r["uid"] for r in shown] == core.column("uid").take(pa.array(at)).to_pylist()
    assert all(f"<figcaption>{u} " in page for u in (r["uid"] for r in shown))
