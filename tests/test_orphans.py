"""No orphans: SIGKILL the main `warren` process (only it, not its process group) in the
middle of a run, and every process it had started — Warren's temporary Prefect server,
img2dataset subprocesses, the embed step's decoding workers (and their forkserver) —
goes too (pipelines/lifeline.py).

The kill lands at a point the run cannot pass by itself (its remaining downloads hang on
a deliberately slow server), and the check polls up to a generous deadline before it
asserts, so neither depends on how busy the machine is."""
from __future__ import annotations

import functools
import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import lifeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "curate", "demo.yaml")


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, start time, command line) of every process visible in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if fields[0] in ("Z", "X"):
            continue
        out[int(name)] = (int(fields[1]), fields[19], cmd)
    return out


def descendants(pid: int) -> dict[int, tuple[str, str]]:
    """pid -> (start time, command line) of every living descendant of `pid`."""
    table = process_table()
    found, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, (ppid, start, cmd) in table.items():
            if ppid == p and child not in found:
                found[child] = (start, cmd)
                frontier.append(child)
    return found


def kill_and_check_no_child_left(main: subprocess.Popen, children: dict, deadline_s: float = 120):
    """SIGKILL `main` alone; every child it had must be gone within the deadline."""
    os.kill(main.pid, signal.SIGKILL)
    main.wait()
    t0 = time.monotonic()
    left = dict(children)
    while left and time.monotonic() - t0 < deadline_s:
        left = {p: v for p, v in left.items() if lifeline.alive(p, v[0])}
        time.sleep(0.1)
    took = time.monotonic() - t0
    for p in left:          # do not leave them behind for the next test
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"still running {took:.0f} s after the kill: {[v[1] for v in left.values()]}"
    return took


def wait_for(proc: subprocess.Popen, cond, log: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = descendants(proc.pid)
        if cond(kids):
            return kids
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill point:\n{open(log).read()[-3000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"kill point never reached:\n{open(log).read()[-3000:]}")


def has(kids, text):
    return any(text in cmd for _, cmd in kids.values())


@pytest.fixture
def slow_pool(demo_pool, tmp_path):
    """The demo pool behind a server that answers /slow/... only when the test ends:
    metadata whose first 60 rows are served at once and the rest never (until teardown)."""
    root, _, meta = demo_pool
    release = threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/slow/"):
                release.wait()
                self.path = self.path[len("/slow"):]
            return super().do_GET()

        def log_message(self, *a):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass        # clients killed mid-response are the point of these tests

    server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=root))
    server.request_queue_size = 256
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    t = pq.read_table(meta)
    old = t.column("url").to_pylist()
    path_of = [u.split("/", 3)[3] for u in old]
    urls = [f"{base}/{p}" if i < 60 else f"{base}/slow/{p}" for i, p in enumerate(path_of)]
    out = tmp_path / "slow_meta.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("url"), "url", pa.array(urls)), out)
    try:
        yield str(out)
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def _env(tmp_path):
    """No PREFECT_API_URL: the command starts its own temporary server (in a fresh home)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


@pytest.mark.slow
def test_sigkill_of_warren_curate_leaves_no_process(slow_pool, tmp_path):
    out = str(tmp_path / "run")
    log = str(tmp_path / "curate.log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "curate", "--config", DEMO,
             "--set", f"source.path={slow_pool}", "--set", "source.shard_rows=60",
             "--set", "select.k=4", "--set", "download.timeout=600", "--output", out],
            cwd=REPO, env=_env(tmp_path), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # shard 0 embedded (decoding workers up) while shards 1 and 2 are still downloading
        kids = wait_for(proc, lambda k: os.path.exists(f"{out}/embeddings/emb_00000.parquet")
                        and has(k, "pipelines.download") and has(k, "flows.apiserver"), log)
        kids = descendants(proc.pid)
        assert has(kids, "flows.apiserver") and has(kids, "pipelines.download")
        assert has(kids, "forkserver"), [c for _, c in kids.values()]
        took = kill_and_check_no_child_left(proc, kids)
        print(f"{len(kids)} children gone {took:.1f} s after the SIGKILL")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigkill_of_warren_demo_leaves_no_process(tmp_path):
    out = str(tmp_path / "demo")
    log = str(tmp_path / "demo.log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "demo", "--output", out, "--n", "400",
             "--set", "source.shard_rows=200"],
            cwd=REPO, env=_env(tmp_path), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        kids = wait_for(proc, lambda k: has(k, "pipelines.download") and has(k, "flows.apiserver"), log)
        took = kill_and_check_no_child_left(proc, kids)
        print(f"{len(kids)} children gone {took:.1f} s after the SIGKILL")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_lifeline_child_dies_with_its_parent(tmp_path):
    """The mechanism alone: a middle process starts a child with `child_env`, the child
    calls `from_env`; SIGKILL the middle one and the child goes."""
    code = ("import os, subprocess, sys, time\n"
            "from pipelines import lifeline\n"
            "c = subprocess.Popen([sys.executable, '-c', 'from pipelines import lifeline; "
            "lifeline.from_env(); import time; time.sleep(600)'], env=lifeline.child_env())\n"
            "print(c.pid, flush=True)\n"
            "time.sleep(600)\n")
    mid = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(mid.stdout.readline())
    started = lifeline.start_time(child)
    assert lifeline.alive(child, started)
    kill_and_check_no_child_left(mid, {child: (started, "child")}, deadline_s=60)


DOWNLOAD_DRIVER = """
import sys
from pipelines import download
part, work = sys.argv[1], sys.argv[2]
download.download_part(part, work + "/p", work + "/images.parquet", work + "/rej.parquet",
                       download.DownloadConfig(processes=2, threads=2, subshard_rows=20))
"""


@pytest.mark.slow
def test_img2dataset_processes_go_with_the_download(slow_pool, tmp_path):
    """With download.processes > 1, img2dataset starts a pool of its own: killing the
    process that started the download takes the download and that pool along."""
    from pipelines import download
    work = str(tmp_path / "w")
    download.split_input(slow_pool, work, 1000)
    part = download.read_parts(work)[0]
    driver = tmp_path / "driver.py"
    driver.write_text(DOWNLOAD_DRIVER)
    log = str(tmp_path / "driver.log")
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, str(driver), part, work], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the download subprocess and img2dataset's pool (spawned workers) are up
        kids = wait_for(proc, lambda k: has(k, "pipelines.download")
                        and sum("multiprocessing" in c for _, c in k.values()) >= 2, log)
        took = kill_and_check_no_child_left(proc, descendants(proc.pid))
        print(f"{len(kids)} children gone {took:.1f} s after the SIGKILL")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
