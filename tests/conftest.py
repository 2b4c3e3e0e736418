"""Shared fixtures. Keep this small and generic.

- `prefect_api`: one real `prefect server start` on 127.0.0.1 for the whole session,
  with its own PREFECT_HOME in a temporary folder. Flows in this process see it through
  Prefect's settings; subprocesses and Dask workers through PREFECT_API_URL in
  os.environ. Stopped (and its process group killed) at the end of the session.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log) as f:
                raise RuntimeError(f"prefect server exited ({proc.returncode}):\n{f.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout}s; see {log}")


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM a process started with start_new_session=True and its children, SIGKILL
    them after `grace` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """The URL of a real Prefect API server for this test session."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": url}
    log = str(home / "server.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([os.path.join(BIN, "prefect"), "server", "start", "--host",
                                 "127.0.0.1", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
    try:
        _wait_healthy(url, proc, log)
        os.environ["PREFECT_API_URL"] = url
        os.environ["PREFECT_HOME"] = str(home)
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_HOME: str(home)}):
            yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_group(proc)


# -- a small LAION-like pool on 127.0.0.1, and one finished curation run of it ----------------
SMALL_POOL = 180          # rows; 3 shards of 60


@pytest.fixture(scope="session")
def demo_pool(tmp_path_factory):
    """(root, base_url, metadata path) of a small generated pool served on 127.0.0.1."""
    from pipelines.synth import demo_pool

    root = str(tmp_path_factory.mktemp("demo-pool"))
    demo_pool.build(root, demo_pool.DemoDataConfig(n=SMALL_POOL, seed=1))
    with demo_pool.serve(root) as base:
        yield root, base, demo_pool.write_metadata(root, base)


def small_curate_config(meta: str, out: str, *sets: str):
    """The demo config, scaled to the small pool."""
    from flows import curate

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return curate.load_config(os.path.join(here, "configs", "curate", "demo.yaml"),
                              [f"source.path={meta}", "source.shard_rows=60",
                               "source.coreset_shard_rows=100", "select.k=4", "select.buckets=4",
                               "embed.batch_size=32", *sets], output=out)


@pytest.fixture(scope="session")
def curate_small(prefect_api, demo_pool, tmp_path_factory):
    """A finished curation run of `demo_pool` from URLs on the local runner:
    (run folder, summary). Other runs of the same pool must reproduce its coreset."""
    from flows import curate
    from pipelines import embed

    out = str(tmp_path_factory.mktemp("curate-small") / "run")
    try:
        summary = curate.run_local(small_curate_config(demo_pool[2], out))
    finally:
        embed.shutdown()
    return out, summary
