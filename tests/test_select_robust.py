"""`warren select` against stale runs, overlapping folders, bad text, hash collisions and
failing writes: each case is one line on stderr and exit 2, or a reject with a reason."""
import contextvars
import errno
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows import cli
from pipelines import bands, runkey, select, storage
from pipelines.errors import InputError, set_setting_style
from tests.embedding_fixtures import check_accounting, unit, write_laion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTINUE = "pass --restart to start over, or choose another output folder"


def source(root, n=1200, d=32, shards=2, seed=0, uids=None, **kw):
    rng = np.random.default_rng(seed)
    img = unit(rng.standard_normal((n, d)))
    img[10:14] = unit(img[10] + 0.05 * rng.standard_normal((4, d)))   # one duplicate group
    txt = unit(img + rng.standard_normal((n, d)))
    write_laion(str(root), img, txt, uids, shards=shards, **kw)
    return str(root)


def warren(capsys, *args):
    """`warren select ...` in this process: (exit code, stderr lines)."""
    capsys.readouterr()
    ctx = contextvars.copy_context()      # the command may set the setting style
    rc = ctx.run(cli.main, ["select", *map(str, args), "--k", "2", "--quiet"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return rc, err


def files(path):
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


# -- runs keyed by their input ---------------------------------------------------------
def test_changed_input_with_the_same_rows_is_refused_then_restart(tmp_path, capsys):
    src, out = source(tmp_path / "src"), tmp_path / "out"
    assert warren(capsys, "--input", src, "--output", out)[0] == 0
    first = (out / "coreset.parquet").read_bytes()
    # unchanged input: the rerun resumes (nothing redone) to the same bytes
    assert warren(capsys, "--input", src, "--output", out)[0] == 0
    assert (out / "coreset.parquet").read_bytes() == first
    # same shape, same row count, other vectors: the old code kept the old coreset
    rng = np.random.default_rng(9)
    np.save(os.path.join(src, "img_emb", "img_emb_0001.npy"),
            unit(rng.standard_normal((600, 32))).astype(np.float16))
    rc, err = warren(capsys, "--input", src, "--output", out)
    assert rc == 2 and len(err) == 1
    assert err[0] == (f"warren select: error: {out} holds a run made from a different input "
                      f"(input: changed img_emb/img_emb_0001.npy); {CONTINUE}")
    assert (out / "coreset.parquet").read_bytes() == first        # nothing was touched
    # --restart starts over: the result is a fresh run's on the new input
    assert warren(capsys, "--input", src, "--output", out, "--restart")[0] == 0
    assert warren(capsys, "--input", src, "--output", tmp_path / "fresh")[0] == 0
    for f in ("coreset.parquet", "rejects.parquet"):
        assert (out / f).read_bytes() == (tmp_path / "fresh" / f).read_bytes()
    assert (out / "coreset.parquet").read_bytes() != first
    man = select.storage.read_json(str(out / "manifest.json"))
    fp = runkey.fingerprint([src])[src]
    assert man["config"]["source"] == src
    assert man["config"]["input"]["input"]["digest"] == fp["digest"]


def test_added_shard_and_changed_config_are_refused(tmp_path, capsys):
    src, out = source(tmp_path / "src"), tmp_path / "out"
    assert warren(capsys, "--input", src, "--output", out)[0] == 0
    rc, err = warren(capsys, "--input", src, "--output", out, "--threshold", "0.9")
    assert rc == 2 and err == [f"warren select: error: select: {out} holds a run with another "
                               f"config (differs in threshold); {CONTINUE}"]
    source(tmp_path / "more", shards=3)
    os.replace(tmp_path / "more" / "img_emb" / "img_emb_0002.npy",
               os.path.join(src, "img_emb", "img_emb_0002.npy"))
    rc, err = warren(capsys, "--input", src, "--output", out)
    assert rc == 2 and err == [f"warren select: error: {out} holds a run made from a different "
                               f"input (input: added img_emb/img_emb_0002.npy); {CONTINUE}"]


def test_input_changed_during_the_run_is_refused_at_finish(tmp_path):
    src, out = source(tmp_path / "src"), str(tmp_path / "out")
    cfg = select.SelectConfig(k=2)
    p = select.plan(cfg, src, out)
    for s in range(p["shards"]):
        select.stage_validate(cfg, src, out, s)
    select.stage_train(cfg, src, out)
    for s in range(p["shards"]):
        select.stage_assign(cfg, src, out, s)
    for b in range(p["buckets"]):
        select.stage_dedup(cfg, src, out, b)
    t = pq.read_table(os.path.join(src, "metadata", "metadata_0000.parquet"))
    pq.write_table(t.set_column(2, "caption", pa.array(["edited"] * t.num_rows)),
                   os.path.join(src, "metadata", "metadata_0000.parquet"))
    with pytest.raises(runkey.StaleRunError, match="changed metadata/metadata_0000.parquet"):
        select.stage_finish(cfg, src, out)
    assert not os.path.exists(os.path.join(out, "coreset.parquet"))


# -- output and input apart --------------------------------------------------------------
@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_output_overlapping_the_input_is_refused(tmp_path, capsys, where):
    src = source(tmp_path / "data" / "src")
    before = files(src)
    out = {"same": src, "inside": os.path.join(src, "img_emb"),
           "contains": str(tmp_path / "data")}[where]
    rc, err = warren(capsys, "--input", src, "--output", out)
    expected = {"same": f"--output {out} is the input {src}: choose a separate folder",
                "inside": f"--output {out} lies inside the input {src}: choose a folder outside it",
                "contains": f"--output {out} contains the input {src}: choose a folder that "
                            "does not hold the input"}[where]
    assert rc == 2 and err == [f"warren select: error: {expected}"]
    assert files(src) == before            # nothing written into the input


def test_only_warrens_own_temporaries_are_deleted(tmp_path, capsys):
    src, out = source(tmp_path / "src"), tmp_path / "out"
    (out / "_work" / "assign").mkdir(parents=True)
    user = [out / "notes.tmp-1", out / "keep.tmp-abcdef12", out / ".hidden.tmp-abcdef12",
            out / "_work" / "mine.tmp-12345678", out / "_work" / ".x.tmp-123"]
    for f in user:
        f.write_text("user data")
    ours = out / "_work" / "assign" / ".s00000.parquet.tmp-0123abcd"   # what a kill leaves
    ours.write_bytes(b"partial")
    assert warren(capsys, "--input", src, "--output", out)[0] == 0
    assert all(f.read_text() == "user data" for f in user)
    assert not ours.exists()
    assert storage.TEMP_NAME.match(ours.name) and not any(storage.TEMP_NAME.match(f.name)
                                                          for f in user[:2] + user[3:])


def test_restart_deletes_only_the_selection(tmp_path, capsys):
    src, out = source(tmp_path / "src"), tmp_path / "out"
    assert warren(capsys, "--input", src, "--output", out)[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "_work" / "download").mkdir()
    (out / "_work" / "download" / "part.parquet").write_text("curate's")
    assert warren(capsys, "--input", src, "--output", out, "--restart")[0] == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "_work" / "download" / "part.parquet").read_text() == "curate's"


# -- column types at validate ----------------------------------------------------------------
def rewrite_meta(src, shard, **cols):
    p = os.path.join(src, "metadata", f"metadata_{shard:04d}.parquet")
    t = pq.read_table(p)
    for name, arr in cols.items():
        i = t.column_names.index(name) if name in t.column_names else None
        t = t.set_column(i, name, arr) if i is not None else t.append_column(name, arr)
    pq.write_table(t, p)


def test_non_utf8_text_is_a_reject_with_a_reason(tmp_path):
    src = source(tmp_path / "src", n=600)
    caps = [f"caption u{i:06d}".encode() for i in range(300, 600)]
    caps[5] = b"bad \xff\xfe caption"
    urls = [f"http://x.invalid/u{i:06d}".encode() for i in range(300, 600)]
    urls[7] = b"http://x.invalid/\xc3("
    rewrite_meta(src, 1, caption=pa.array(caps, pa.binary()).view(pa.string()),
                 url=pa.array(urls, pa.binary()))      # url as bytes: cast back to text
    out = str(tmp_path / "out")
    select.run(select.SelectConfig(k=2, clip_band=None, centroid_band=None), src, out,
               progress=False)
    r = pq.read_table(os.path.join(out, "rejects.parquet")).to_pylist()
    assert [(x["uid"], x["reason"]) for x in r if x["stage"] == "validate"] == [
        ("u000305", "bad_caption"), ("u000307", "bad_url")]
    uids = [f"u{i:06d}" for i in range(600)]
    core, _ = check_accounting(uids, out)
    c = pq.read_table(os.path.join(out, "coreset.parquet"))
    c.column("caption").validate(full=True)
    assert c.schema.field("url").type == pa.string() and len(core) == 600 - 2 - 3


@pytest.mark.parametrize("case", ["carried", "caption"])
def test_a_column_type_that_differs_between_shards_is_one_line(tmp_path, capsys, case):
    src = source(tmp_path / "src", n=600, extra={"width": list(range(600))})
    if case == "carried":
        rewrite_meta(src, 1, width=pa.array([str(i) for i in range(300)]))
        msg = (f"{src}/metadata/metadata_0001.parquet, field 'width': type string differs from "
               f"int64 in {src}/metadata/metadata_0000.parquet; a column must have the same "
               "type in every shard")
    else:
        rewrite_meta(src, 1, caption=pa.array(np.arange(300)))
        msg = f"{src}/metadata/metadata_0001.parquet, field 'caption': caption must be text (string), not int64"
    out = tmp_path / "out"
    rc, err = warren(capsys, "--input", src, "--output", out)
    assert rc == 2 and err == [f"warren select: error: {msg}"]
    assert not (out / "_work" / "plan.json").exists()     # refused before any work


def test_uid_that_is_not_utf8_is_an_input_error(tmp_path):
    src = source(tmp_path / "src", n=600)
    uids = [f"u{i:06d}".encode() for i in range(300)]
    uids[4] = b"u\xff"
    rewrite_meta(src, 0, key=pa.array(uids, pa.binary()).view(pa.string()))
    with pytest.raises(InputError, match=r"metadata_0000\.parquet, row 4, field 'key': "
                                         "uid is not valid UTF-8"):
        select.run(select.SelectConfig(k=2), src, str(tmp_path / "out"), progress=False)


# -- accounting when 64-bit hashes collide ------------------------------------------------
def test_colliding_uid_hashes_keep_exact_accounting(tmp_path, monkeypatch):
    """At LAION-2B's 2.3B rows some pair of 64-bit uid hashes collides (~14 %): forced
    here by squeezing the hash into 5 values. The run must succeed, account exactly,
    and still not depend on the sharding (sample ties broken by uid)."""
    n = 1200
    uids = [f"c{i:05d}" for i in range(n)]
    src3 = source(tmp_path / "s3", n=n, shards=3, uids=uids)
    src1 = source(tmp_path / "s1", n=n, shards=1, uids=uids)
    cfg = select.SelectConfig(k=2, target=30, seed=1)
    clean = select.run(cfg, src3, str(tmp_path / "clean"), progress=False)
    real = bands.uid_hash
    monkeypatch.setattr(bands, "uid_hash", lambda u: real(u) % np.uint64(5))
    assert len(np.unique(bands.uid_hash(uids))) == 5
    a = select.run(cfg, src3, str(tmp_path / "a"), progress=False)
    select.run(cfg, src1, str(tmp_path / "b"), progress=False)
    core, rej = check_accounting(uids, str(tmp_path / "a"))
    assert a["coreset_rows"] == len(core) == 30 and len(rej) == n - 30
    for f in ("coreset.parquet", "rejects.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    # dedup and bands never read the hash: before the sample the funnel is unchanged
    assert {k: v for k, v in a["funnel"].items() if k != "sample"} == \
        {k: v for k, v in clean["funnel"].items() if k != "sample"}


# -- writes -----------------------------------------------------------------------------------
def test_atomic_write_fsyncs_file_then_renames_then_fsyncs_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.realpath(
        f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))),
                                                     real_replace(a, b))[1])
    target = tmp_path / "sub" / "x.json"
    storage.write_json(str(target), {"a": 1})
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert storage.TEMP_NAME.match(os.path.basename(events[0][1]))     # the temporary
    assert events[1][1] == str(target) and events[2][1] == str(tmp_path / "sub")


def failing_open(monkeypatch, err, where):
    """Files opened for writing under a path containing `where` fail with `err` on write
    (what a full disk or a read-only remount does mid-run)."""
    import builtins

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(err, os.strerror(err))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)
        return Full(f) if "w" in mode and where in str(path) else f
    monkeypatch.setattr(storage, "open", fake, raising=False)


@pytest.mark.parametrize("err,reason", [(errno.ENOSPC, "no space left on device"),
                                        (errno.EROFS, "read-only file system")])
def test_a_failing_write_is_one_line_then_the_rerun_resumes(tmp_path, capsys, monkeypatch,
                                                              err, reason):
    src, out = source(tmp_path / "src"), tmp_path / "out"
    failing_open(monkeypatch, err, f"{os.sep}assign{os.sep}")
    rc, lines = warren(capsys, "--input", src, "--output", out)
    assert rc == 2 and len(lines) == 1
    head = f"warren select: error: cannot write {out}/_work/assign/"
    assert lines[0].startswith(head) and lines[0].endswith(
        f": {reason}; free space (or fix the folder) and rerun the same command to resume")
    assert not [f for f in files(out) if "assign" in f and not f.startswith("_work/_completions")
                and storage.TEMP_NAME.match(os.path.basename(f))]   # no temporary left
    monkeypatch.undo()
    assert warren(capsys, "--input", src, "--output", out)[0] == 0
    assert warren(capsys, "--input", src, "--output", tmp_path / "clean")[0] == 0
    for f in ("coreset.parquet", "rejects.parquet"):
        assert (out / f).read_bytes() == (tmp_path / "clean" / f).read_bytes()


def test_output_that_is_a_file_or_under_a_file(tmp_path, capsys):
    src = source(tmp_path / "src")
    (tmp_path / "afile").write_text("x")
    rc, err = warren(capsys, "--input", src, "--output", tmp_path / "afile")
    assert rc == 2 and err == [f"warren select: error: cannot write {tmp_path}/afile: it is a "
                               "file, not a folder; free space (or fix the folder) and rerun the "
                               "same command to resume"]
    rc, err = warren(capsys, "--input", src, "--output", tmp_path / "afile" / "sub")
    assert rc == 2 and err == [f"warren select: error: cannot write {tmp_path}/afile/sub: a part "
                               "of the path is a file, not a folder; free space (or fix the "
                               "folder) and rerun the same command to resume"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through folder permissions")
def test_unwritable_output_folder(tmp_path, capsys):
    src = source(tmp_path / "src")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        rc, err = warren(capsys, "--input", src, "--output", tmp_path / "ro" / "out")
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert rc == 2 and err[0].startswith(f"warren select: error: cannot write {tmp_path}/ro/out")


def test_cli_failures_print_no_traceback(tmp_path):
    """The same refusals through a real `warren` process (no in-process capture)."""
    src = source(tmp_path / "src")
    p = subprocess.run([sys.executable, "-m", "flows.cli", "select", "--input", src,
                        "--output", src, "--k", "2", "--quiet"], capture_output=True, text=True,
                       cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"warren select: error: --output {src} is the input {src}: choose a separate folder")


# -- hints name the flag of the command in use ---------------------------------------------
def test_hints_name_the_setting_as_the_command_takes_it(tmp_path):
    src = source(tmp_path / "src", n=600)

    def message(style):
        def go():
            set_setting_style(style)
            with pytest.raises(InputError) as e:
                select.run(select.SelectConfig(k=5000), src, str(tmp_path / style), progress=False)
            return str(e.value)
        return contextvars.copy_context().run(go)
    assert message("flag").endswith("only 600 valid rows for k=5000 clusters; lower --k")
    assert message("set").endswith("only 600 valid rows for k=5000 clusters; lower --set select.k=")
