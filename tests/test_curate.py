"""The curate flow: configs, the end-to-end run from a local HTTP server, resume."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import polars as pl
import pyarrow.parquet as pq
import pytest

from conftest import small_curate_config
from flows import curate
from pipelines import manifest
from pipelines.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIGS = os.path.join(REPO, "configs", "curate")


# -- configs ---------------------------------------------------------------------------------
def _config_files():
    found = []
    for dirpath, _, files in os.walk(CONFIGS):
        found += [os.path.join(dirpath, f) for f in files if f.endswith((".yaml", ".yml"))]
    return sorted(found)


def test_every_curate_config_loads_and_starts_with_its_command():
    files = _config_files()
    assert len(files) >= 3
    for f in files:
        with open(f) as fh:
            first = fh.readline()
        assert first.startswith("# warren "), f
        cfg = curate.load_config(f, ["source.path=x"] if "demo" in f else [])
        assert cfg.output and cfg.source.path


def test_bunny_config_has_the_papers_numbers():
    c = curate.load_config(os.path.join(CONFIGS, "laion2b_bunny.yaml"))
    s = c.select
    assert (s.k, s.threshold, s.clip_band, s.centroid_band, s.target, s.keep) == \
        (100_000, 0.86, (0.40, 0.60), (0.15, 0.35), 2_000_000, "middle")
    assert c.embed.model == "ViT-L-14" and c.source.kind == "embeddings"
    assert s.uid_column == "key" and c.runner.uses_dask


def test_overrides_and_every_problem_at_once(tmp_path):
    c = curate.load_config(os.path.join(CONFIGS, "demo.yaml"),
                           ["source.path=m.parquet", "select.k=7", "select.clip_band=null",
                            "embed.batch_size=3"], output=str(tmp_path),
                           dask_address="tcp://127.0.0.1:8786")
    assert (c.select.k, c.select.clip_band, c.embed.batch_size) == (7, None, 3)
    assert c.output == str(tmp_path) and c.runner.dask_address == "tcp://127.0.0.1:8786"
    with pytest.raises(ConfigError) as e:
        curate.load_config(os.path.join(CONFIGS, "demo.yaml"),
                           ["source.path=", "select.threshold=2", "embed.workers=-1",
                            "download.bogus=1", "nonsense=1"])
    msg = str(e.value)
    for part in ("source.path: expected a string, got null", "select: threshold must be in (0, 1)",
                 "embed: workers must be >= 0", "download.bogus: unknown key", "nonsense: unknown key"):
        assert part in msg, part
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        curate.apply_overrides({}, ["select.k"])


def test_pipelines_never_imports_prefect():
    code = ("import sys; import pipelines.download, pipelines.embed, pipelines.report, "
            "pipelines.synth.demo_pool, pipelines.select; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'prefect'], 'prefect'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# -- end to end ------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_from_local_server(curate_small, demo_pool):
    out, summary = curate_small
    root = demo_pool[0]
    truth = pl.read_parquet(f"{root}/truth.parquet")
    meta = pl.read_parquet(demo_pool[2])
    # polars reads every table of the run
    core = pl.read_parquet(f"{out}/coreset.parquet")
    rej = pl.read_parquet(f"{out}/rejects.parquet")
    images = pl.read_parquet(f"{out}/images/coreset_images.parquet")
    for f in sorted(os.listdir(f"{out}/embeddings")) + sorted(os.listdir(f"{out}/pool")):
        sub = "embeddings" if f.startswith("emb") else "pool"
        pl.read_parquet(f"{out}/{sub}/{f}")
    assert len(os.listdir(f"{out}/embeddings")) == 3
    # accounting: every input uid in exactly one of coreset / rejects
    assert core["uid"].n_unique() == len(core) and rej["uid"].n_unique() == len(rej)
    assert set(core["uid"]).isdisjoint(rej["uid"])
    assert set(core["uid"]) | set(rej["uid"]) == set(meta["uid"])
    assert len(core) + len(rej) == len(meta) == 180
    # dead links and corrupt files are rejects with their reason
    fate = {u: (s, r) for u, s, r in rej.select("uid", "stage", "reason").iter_rows()}
    for kind, reason in (("dead_link", "dead_link"), ("corrupt", "corrupt_image")):
        uids = truth.filter(pl.col("kind") == kind)["uid"]
        assert len(uids) > 0
        assert {fate[u] for u in uids} == {("download", reason)}
    # duplicates point at a kept uid that survived dedup
    dups = rej.filter(pl.col("stage") == "dedup")
    assert len(dups) > 0 and dups["kept_uid"].null_count() == 0
    assert set(dups["kept_uid"]).isdisjoint(dups["uid"])
    # the coreset carries url/caption and the image size; its images are all there
    assert {"url", "caption", "cluster", "clip_score", "centroid_cos", "width"} <= set(core.columns)
    assert set(images["uid"]) == set(core["uid"]) and len(core) > 0
    m = manifest.load(f"{out}/manifest.json")
    assert m.entry("coreset")["rows"] == len(core)
    assert m.images("coreset") == {"kind": "parquet",
                                   "path": os.path.join(out, "images/coreset_images.parquet")}
    # funnel adds up
    f = summary["funnel"]
    assert f["input"] == 180 and f["downloaded"] == 180 - 5 - 3 == f["embedded"]
    assert f["sample"] == len(core) == f["with_image"]
    # report.html is one file: charts and thumbnails inline, nothing fetched
    page = open(f"{out}/report.html").read()
    assert page.count("data:image/png;base64,") >= 4
    assert page.count("data:image/jpeg;base64,") >= min(24, len(core))
    assert not re.search(r"""(src|href)=['"]?https?://""", page)
    for section in ("Funnel", "Rejects by stage and reason", "Cluster sizes", "Score bands",
                    "Duplicate groups", "Kept samples", "randomly initialised"):
        assert section in page, section


@pytest.mark.slow
def test_prefect_artifacts_and_cli_report(curate_small, prefect_api):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def keys():
        async with get_client() as c:
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(like_="curate-")))
            return {a.key: a for a in arts}
    found = asyncio.run(keys())
    for k in ("curate-funnel", "curate-rejects", "curate-summary", "curate-download",
              "curate-embed", "curate-dedup"):
        assert k in found, k
    assert found["curate-funnel"].type == "table"
    out, _ = curate_small
    r = subprocess.run([sys.executable, "-m", "flows.cli", "report", out, "--output",
                        f"{out}/again.html"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(f"{out}/again.html") > 10_000


def test_rerun_with_another_config_is_refused(tmp_path):
    from flows.curate_config import check_run
    meta = tmp_path / "m.parquet"
    meta.write_bytes(b"x")
    out = str(tmp_path / "run")
    check_run(small_curate_config(str(meta), out))
    check_run(small_curate_config(str(meta), out, "runner.max_workers=3"))
    with pytest.raises(ConfigError, match=r"differs in select\.k\); pass --restart"):
        check_run(small_curate_config(str(meta), out, "select.k=5"))


# -- kill and resume -------------------------------------------------------------------------
DRIVER = '''
import json, sys, time
from pipelines import embed, select
from flows import curate

def park():
    """Wait here until killed: the kill lands at a known point, however busy the machine."""
    while True:
        time.sleep(60)

mode, cfg = sys.argv[1], json.loads(sys.argv[2])
if mode == "park-embed":
    # shard 0 embeds; shards 1 and 2 stop at their first batch
    real = embed.embed_shard
    def parked(c, images, out, rejects, progress=None):
        shard = int(out.rsplit("_", 1)[1].split(".")[0])
        def p(done, total):
            if shard > 0:
                park()
            if progress:
                progress(done, total)
        return real(c, images, out, rejects, p)
    embed.embed_shard = parked
elif mode == "park-dedup":
    real = select.stage_dedup
    def parked(c, src, out, bucket):
        if bucket > 0:
            park()
        return real(c, src, out, bucket)
    select.stage_dedup = parked
if __name__ == "__main__":
    curate.run_local(cfg)
    print("FINISHED")
'''


def _start(tmp_path, mode, cfg):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.Popen([sys.executable, str(driver), mode, json.dumps(cfg.to_dict())],
                            cwd=REPO, stdout=open(tmp_path / f"{mode}.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(proc, cond, timeout=600):
    """SIGKILL the run (its whole process group) once `cond()` holds; the run parks
    itself at that point, so only a generous deadline bounds the wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        assert proc.poll() is None, "the run ended before the kill point"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("kill point never reached")


def _visible_files_are_whole(out):
    """Every file a reader would take (not hidden) is complete: Parquet and JSON parse.
    Hidden files and folders are temporaries; a kill may legitimately leave some."""
    for dirpath, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.startswith("."):
                continue
            p = os.path.join(dirpath, f)
            if f.endswith(".parquet"):
                pq.read_metadata(p)
            elif f.endswith(".json"):
                json.load(open(p))


@pytest.mark.slow
def test_sigkill_during_embed_and_dedup_then_resume(curate_small, demo_pool, prefect_api, tmp_path):
    ref_out, _ = curate_small
    out = str(tmp_path / "run")
    cfg = small_curate_config(demo_pool[2], out)
    emb = lambda i: os.path.exists(f"{out}/embeddings/emb_{i:05d}.parquet")  # noqa: E731

    # 1. killed while embedding: shard 0 done, shards 1 and 2 parked mid-shard
    p = _start(tmp_path, "park-embed", cfg)
    _kill_when(p, lambda: emb(0))
    assert not emb(1) and not emb(2) and not os.path.exists(f"{out}/coreset.parquet")
    _visible_files_are_whole(out)

    # 2. resumed, killed while deduplicating: bucket 0 done, the others parked
    done = lambda b: os.path.exists(f"{out}/_work/_completions/dedup-{b:05d}.json")  # noqa: E731
    p = _start(tmp_path, "park-dedup", cfg)
    _kill_when(p, lambda: done(0))
    assert all(emb(i) for i in range(3))
    assert not any(done(b) for b in range(1, 4)) and not os.path.exists(f"{out}/coreset.parquet")
    _visible_files_are_whole(out)

    # 3. resumed to the end: the same coreset and rejects as the uninterrupted run
    p = _start(tmp_path, "plain", cfg)
    assert p.wait(timeout=600) == 0, open(tmp_path / "plain.log").read()[-3000:]
    for t in ("coreset.parquet", "rejects.parquet", "images/coreset_images.parquet"):
        assert pq.read_table(f"{out}/{t}").equals(pq.read_table(f"{ref_out}/{t}")), t
    _visible_files_are_whole(out)


@pytest.mark.slow
def test_from_precomputed_embeddings_downloads_only_the_coreset(curate_small, demo_pool, tmp_path):
    """LAION layout (npy + metadata with `key`) made from the URL run's embeddings: the
    embeddings mode selects the same coreset and then fetches only its images."""
    import numpy as np

    ref, _ = curate_small
    src = tmp_path / "laion"
    for sub in ("img_emb", "text_emb", "metadata"):
        (src / sub).mkdir(parents=True)
    for i in range(3):
        t = pl.read_parquet(f"{ref}/embeddings/emb_{i:05d}.parquet")
        np.save(src / "img_emb" / f"img_emb_{i:04d}.npy", np.asarray(t["img_emb"].to_list(), np.float16))
        np.save(src / "text_emb" / f"text_emb_{i:04d}.npy", np.asarray(t["txt_emb"].to_list(), np.float16))
        t.select(pl.col("uid").alias("key"), "url", "caption", "width", "height").write_parquet(
            src / "metadata" / f"metadata_{i:04d}.parquet")
    out = str(tmp_path / "run")
    cfg = small_curate_config("x", out, "source.kind=embeddings", f"source.path={src}",
                              "source.uid_column=key")
    summary = curate.run_local(cfg)
    core = pl.read_parquet(f"{out}/coreset.parquet")
    assert core["uid"].to_list() == pl.read_parquet(f"{ref}/coreset.parquet")["uid"].to_list()
    images = pl.read_parquet(f"{out}/images/coreset_images.parquet")
    assert sorted(images["uid"]) == sorted(core["uid"])
    assert not os.path.exists(f"{out}/pool") and not os.path.exists(f"{out}/embeddings")
    # img2dataset was asked for the coreset's URLs only
    parts = pl.concat([pl.read_parquet(f"{out}/_work/coreset_download/parts/{f}")
                       for f in sorted(os.listdir(f"{out}/_work/coreset_download/parts"))])
    assert sorted(parts["uid"]) == sorted(core["uid"])
    rej = pl.read_parquet(f"{out}/rejects.parquet")
    assert len(core) + len(rej) == summary["funnel"]["input"] == 180 - 8
    assert manifest.load(f"{out}/manifest.json").images("coreset")["kind"] == "parquet"


def test_cli_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# warren curate --config bad.yaml\nsource: {kind: ftp}\nselect: {k: 0}\n")
    r = subprocess.run([sys.executable, "-m", "flows.cli", "curate", "--config", str(bad)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warren curate: error: ")
    for part in ("source.kind: 'ftp' is not one of ['urls', 'embeddings']",
                 "select: k must be >= 1 (got 0)", "output is required"):
        assert part in lines[0], part
    assert "Traceback" not in r.stderr


# -- runs keyed by their input; errors inside flow runs -----------------------------------------
SMALL_SETS = ["source.shard_rows=60", "source.coreset_shard_rows=100", "select.k=4",
              "select.buckets=4", "embed.batch_size=32"]


def test_a_changed_input_is_refused_and_restart_starts_over(tmp_path):
    from flows.curate_config import INPUT_FILE, prepare
    from pipelines.runkey import StaleRunError

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "m1.parquet").write_bytes(b"one")
    out = tmp_path / "run"
    c = small_curate_config(str(meta), str(out))
    prepare(c)                                          # the first run records its input
    (out / "notes.txt").write_text("mine")
    (out / "_work").mkdir()
    (out / "coreset.parquet").write_bytes(b"old")
    prepare(c)                                          # same input: resumes
    (meta / "m2.parquet").write_bytes(b"two")
    expect = (f"{out} holds a run made from a different input ({meta}: added m2.parquet); "
              "pass --restart to start over, or choose another output folder")
    with pytest.raises(StaleRunError) as e:
        prepare(c)
    assert str(e.value) == expect
    # the command says the same in one line, before Prefect starts
    args = [sys.executable, "-m", "flows.cli", "curate", "--config", os.path.join(CONFIGS, "demo.yaml"),
            "--set", f"source.path={meta}", "--output", str(out)]
    for s in SMALL_SETS:
        args += ["--set", s]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"warren curate: error: {expect}"]
    # a rewritten file is a change too
    prepare(c, restart_run=True)
    assert sorted(os.listdir(out)) == sorted(["notes.txt", INPUT_FILE, "curate_config.json"])
    time.sleep(0.01)
    (meta / "m1.parquet").write_bytes(b"ONE")
    with pytest.raises(StaleRunError, match=r"changed m1\.parquet"):
        prepare(c)


@pytest.mark.slow
def test_error_inside_the_flow_is_one_line_and_fails_the_run(demo_pool, prefect_api, tmp_path):
    """Every download fails (the image server is gone): the command stops after the download
    stage with one line (no Prefect traceback), exit 2, and Prefect records the flow runs as
    Failed with that message."""
    import asyncio
    import socket

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    t = pq.read_table(demo_pool[2])
    base = demo_pool[1]
    urls = [u.replace(base, f"http://127.0.0.1:{dead}") for u in t.column("url").to_pylist()]
    import pyarrow as pa
    meta = tmp_path / "gone.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("url"), "url", pa.array(urls)), meta)
    out = str(tmp_path / "run")
    args = [sys.executable, "-m", "flows.cli", "curate", "--config", os.path.join(CONFIGS, "demo.yaml"),
            "--set", f"source.path={meta}", "--output", out]
    for s in SMALL_SETS:
        args += ["--set", s]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PREFECT_API_URL": prefect_api})
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Finished in state" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    uids = t.column("uid").to_pylist()
    first_dead = urls[uids.index(min(uids[:60]))]     # shard 0's smallest uid (any URL is dead)
    msg = (f"0 of 180 downloads succeeded (first error: {first_dead}: <urlopen error [Errno 111] "
           "Connection refused>); check that the image server is reachable, then rerun the same "
           "command to resume")
    assert lines[-1] == f"warren curate: error: {msg}"
    assert r.stderr.count("downloads succeeded") == 1
    # the other lines are the random-weights note and the download progress
    assert all(x.startswith(("note: ", "download: ")) for x in lines[:-1]), lines
    assert any(x.startswith("download: 180/180 rows (3/3 shards)") for x in lines), lines

    async def failed_messages():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.FAILED]))))
            return {fr.name: fr.state.message for fr in runs if msg in (fr.state.message or "")}
    failed = asyncio.run(failed_messages())
    assert len(failed) == 2, failed          # `curate` and its sub-flow `curate-run`
