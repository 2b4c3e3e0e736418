"""The command line's promises: one line and exit 2 for bad input (a traceback only with
-v), config errors before anything heavy is imported, `--version`, write failures."""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEMO = os.path.join(REPO, "configs", "curate", "demo.yaml")
TINY = os.path.join(REPO, "configs", "train", "tiny.yaml")


def warren(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def one_error_line(r, command: str) -> str:
    """The run failed with exit 2 and exactly one line on stderr, no traceback."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"warren {command}: error: "), lines[0]
    return lines[0][len(f"warren {command}: error: "):]


def test_version_names_the_package_and_commit():
    from importlib.metadata import version
    r = warren("--version")
    assert r.returncode == 0
    m = re.fullmatch(r"warren (\S+)(?: \(git ([0-9a-f]{4,})(-dirty)?\))?\n", r.stdout)
    assert m and m.group(1) == version("warren"), r.stdout
    if os.path.isdir(os.path.join(REPO, ".git")) or os.path.isfile(os.path.join(REPO, ".git")):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True).stdout.strip()
        assert m.group(2) == head


def test_bad_curate_config_is_reported_before_prefect_or_torch_load(tmp_path):
    """The config error comes before the expensive imports (what made it take 5-17 s)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: out\nsource: {path: m.parquet}\nselect: {k: abc}\n")
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.cli", "curate",
                        "--config", str(bad)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert imported and not {m for m in imported if m.split(".")[0] in ("prefect", "torch",
                                                                        "open_clip", "faiss")}
    assert r.stderr.strip().splitlines()[-1] == \
        f"warren curate: error: {bad}: select.k: expected an integer or null, got 'abc'"


@pytest.mark.parametrize("sets, expect", [
    (["select.k=abc"], "{cfg}: select.k: expected an integer or null, got 'abc'"),
    (["select.clip_band=[0.4,"], "select.clip_band: '[0.4,' is not a valid YAML value "
                                 "(expected the node content, but found '<stream end>' at line 1, "
                                 "column 6); quote it as a string or fix it (--set select.clip_band=...)"),
    (["select.threshold=high", "embed.batch_size=0"],
     "{cfg}: embed: batch_size must be >= 1 (got 0); select.threshold: expected a number, got 'high'"),
    (["select"], "--set 'select': expected KEY=VALUE (e.g. select.k=100)"),
    (["select.k.x=1"], "select.k.x: 'select.k' is a value, not a group"),
])
def test_curate_set_values_are_named(tmp_path, sets, expect):
    args = ["curate", "--config", DEMO, "--set", f"source.path={tmp_path / 'm.parquet'}"]
    for s in sets:
        args += ["--set", s]
    line = one_error_line(warren(*args), "curate")
    assert line == expect.format(cfg=DEMO)


def test_traceback_only_with_verbose():
    r = warren("-v", "curate", "--config", DEMO, "--set", "select.k=abc")
    assert r.returncode == 2 and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("warren curate: error: ")


@pytest.mark.parametrize("sets, expect", [
    (["stage1.max_steps=abc"], "{cfg}: stage1.max_steps: expected an integer or null, got 'abc'"),
    (["stage1.lr=[1,"], "stage1.lr: '[1,' is not a valid YAML value (expected the node content, "
                        "but found '<stream end>' at line 1, column 4); quote it as a string or "
                        "fix it (--set stage1.lr=...)"),
    (["stage1.precision=fp8"], "{cfg}: stage1.precision: 'fp8' is not one of ['bf16', 'fp32']"),
])
def test_train_set_values_are_named(tmp_path, sets, expect):
    args = ["train", "--manifest", str(tmp_path / "manifest.json"), "--config", TINY]
    for s in sets:
        args += ["--set", s]
    assert one_error_line(warren(*args), "train") == expect.format(cfg=TINY)


def test_output_that_is_a_file_or_overlaps_the_input(tmp_path):
    meta = tmp_path / "pool"
    meta.mkdir()
    (meta / "m.parquet").write_bytes(b"")
    f = tmp_path / "a_file"
    f.write_text("x")
    base = ["curate", "--config", DEMO, "--set", f"source.path={meta}"]
    cases = {
        str(f): f"output {f} is an existing file, not a folder: choose a folder",
        str(meta): f"output {meta} is the input {meta}: choose a separate folder",
        str(meta / "out"): f"output {meta / 'out'} lies inside the input {meta}: choose a folder outside it",
        str(tmp_path): f"output {tmp_path} contains the input {meta}: choose a folder that does not "
                       "hold the input",
        str(f / "sub"): f"cannot write {f / 'sub'}: {f} is a file, not a folder; free space (or fix "
                        "the folder) and rerun the same command to resume",
    }
    for out, expect in cases.items():
        assert one_error_line(warren(*base, "--output", out), "curate") == expect, out
    assert f.read_text() == "x"     # nothing was written over it


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount(target, options) a tmpfs under tmp_path (needs mount rights: root in a
    container; skipped elsewhere); unmounted afterwards."""
    mounted = []

    def mount(name: str, options: str) -> str:
        target = tmp_path / name
        target.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
        mounted.append(str(target))
        return str(target)
    yield mount
    for m in mounted:
        subprocess.run(["umount", "-l", m], capture_output=True)


def test_read_only_output_is_one_line(tmp_path, mount_tmpfs):
    ro = mount_tmpfs("ro", "ro,size=1m")
    meta = tmp_path / "m.parquet"
    meta.write_bytes(b"")
    line = one_error_line(warren("curate", "--config", DEMO, "--set", f"source.path={meta}",
                                 "--output", os.path.join(ro, "run")), "curate")
    assert line == (f"cannot write {ro}/run: read-only file system; free space (or fix the "
                    "folder) and rerun the same command to resume")


@pytest.mark.slow
def test_disk_full_mid_run_is_one_line(tmp_path, mount_tmpfs, prefect_api):
    """ENOSPC inside a Prefect task: one line naming the folder, exit 2, no traceback."""
    from pipelines.synth import embeddings as synth
    src = str(tmp_path / "emb")
    synth.generate(synth.SynthConfig(n=6000, dim=64, seed=0, shards=2, avg_cluster=300), src)
    full = mount_tmpfs("full", "size=96k")
    out = os.path.join(full, "run")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    r = warren("curate", "--config", DEMO, "--set", "source.kind=embeddings",
               "--set", f"source.path={src}", "--set", "source.uid_column=key", "--set", "select.k=4",
               "--set", "coreset_images=none",
               "--set", "report=false", "--output", out, env=env, timeout=600)
    line = one_error_line(r, "curate")
    assert line.startswith("cannot write ") and out in line, line
    assert "no space left on device" in line.lower() and line.endswith(
        "free space (or fix the folder) and rerun the same command to resume")


def test_error_line_for_os_errors():
    from flows.cli import error_line
    from pipelines.errors import InputError
    e = OSError(errno.ENOSPC, "No space left on device", "/data/run/x.parquet")
    assert error_line(e) == ("cannot write /data/run/x.parquet: No space left on device; free "
                             "space (or fix the folder) and rerun the same command to resume")
    assert error_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "/in/m")) == \
        "/in/m: No such file or directory"
    assert error_line(InputError("bad\n  thing", path="p")) == "p: bad thing"


def test_progress_lines_say_rows_rate_and_eta():
    import io

    from flows.console import Progress
    out = io.StringIO()
    p = Progress("download", {0: 100, 1: 100, 2: 50}, stream=out, interval=3600, tty=False)
    p.update(0, 40)
    p.update(0, 30)                      # never backwards
    p.update(1, 500)                     # never past a shard's rows
    assert out.getvalue() == ""          # nothing until a stage ends or `interval` passes
    assert p.rows() == 140
    assert re.fullmatch(r"download: 140/250 rows \(0/3 shards\), [\d.,]+ rows/s, ETA \d+:\d\d", p.line())
    p.shard_done(0)
    p.shard_done(1)
    p.shard_done(2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"download: 250/250 rows \(3/3 shards\), [\d.,]+ rows/s, \d+:\d\d elapsed", lines[0])
    b = Progress("dedup", {0: 1, 1: 1}, stream=io.StringIO(), tty=False, unit="buckets")
    b.shard_done(0)
    assert re.fullmatch(r"dedup: 1/2 buckets, [\d.,]+ buckets/s, ETA \d+:\d\d", b.line())


def test_a_command_or_flow_run_in_process_leaves_the_hint_style_as_it_was(tmp_path, capsys):
    """`warren curate` and the curate flow name settings as `--set select.k=`; called
    in-process (tests, notebooks) they must not change how later library errors name them."""
    from flows.cli import main
    from flows.curate import curate, curate_run
    from pipelines.errors import ConfigError, setting
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: out\nsource: {path: m.parquet}\nselect: {k: abc}\n")
    assert main(["curate", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == \
        f"warren curate: error: {bad}: select.k: expected an integer or null, got 'abc'"
    assert setting("select.k") == "--k"
    with pytest.raises(ConfigError, match="select.k: expected an integer"):
        curate.fn(config=str(bad))
    assert setting("select.k") == "--k"
    # the inner flow that run_local, the pipeline and the ablation call
    with pytest.raises(ConfigError, match="select.k: expected an integer"):
        curate_run.fn({"output": str(tmp_path / "o"), "source": {"path": "m.parquet"},
                       "select": {"k": "abc"}})
    assert setting("select.k") == "--k"
