"""Warren's own temporary Prefect API server: one that dies with the command.

Without PREFECT_API_URL, Prefect starts a temporary server itself (a `uvicorn`
subprocess, stopped by an atexit hook), so a SIGKILLed `warren curate` left it running
for ever. Prefect has no hook to change how that child is started, so commands that run
flows start the same server themselves, before Prefect is imported:

    with apiserver.api():          # PREFECT_API_URL set (to it, or to the user's server)
        from flows import curate   # Prefect sees the URL; no temporary server of its own
        ...

The child is `python -m flows.apiserver PORT`: it asks for the parent-death signal
(pipelines/lifeline.py), then runs Prefect's app under uvicorn on 127.0.0.1, exactly as
Prefect's temporary server does (same database under PREFECT_HOME, UI off). A server
given by the user (PREFECT_API_URL already set) is used as it is.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator

from pipelines import lifeline
from pipelines.errors import WarrenError

STARTUP_TIMEOUT = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 180))


class ServerError(WarrenError):
    """The temporary Prefect API server did not start."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start(timeout: float = STARTUP_TIMEOUT) -> tuple[subprocess.Popen, str, str]:
    """Start the server; returns (process, API URL, log path) once it answers."""
    log = tempfile.NamedTemporaryFile(prefix="warren-prefect-server-", suffix=".log", delete=False)
    for _attempt in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        env = lifeline.child_env({**os.environ, "PREFECT_UI_ENABLED": "0",
                                  "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
                                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        env.pop("PREFECT_API_URL", None)
        proc = subprocess.Popen([sys.executable, "-m", "flows.apiserver", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _healthy(url):
                return proc, url, log.name
            time.sleep(0.2)
        if proc.poll() is None:             # timed out
            stop(proc)
            raise ServerError(f"the temporary Prefect server did not answer within {timeout:.0f} s "
                              f"(log: {log.name}); start one with `prefect server start` and "
                              "set PREFECT_API_URL")
        if proc.returncode != 3:            # 3: the port was taken meanwhile; try another
            break
    with open(log.name, errors="replace") as f:
        tail = [x for x in f.read().strip().splitlines() if x.strip()][-1:]
    raise ServerError(f"the temporary Prefect server exited ({proc.returncode}): "
                      f"{tail[0] if tail else 'no output'} (log: {log.name})")


def stop(proc: subprocess.Popen, grace: float = 5) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def api() -> Iterator[str]:
    """PREFECT_API_URL for the body: the user's, or a temporary server of ours that
    stops at the end (and dies with this process, however it ends)."""
    given = os.environ.get("PREFECT_API_URL")
    if given:
        yield given
        return
    proc, url, log = start()
    os.environ["PREFECT_API_URL"] = url
    try:
        _point_prefect_at(url)
        yield url
    finally:
        _drain_prefect()
        os.environ.pop("PREFECT_API_URL", None)
        stop(proc)
        with contextlib.suppress(OSError):
            os.remove(log)


def _drain_prefect() -> None:
    """Send Prefect's queued logs and events while the server is still up (otherwise its
    exit hook retries a closed port for a minute and prints an error)."""
    for module, name in (("prefect.logging.handlers", "APILogWorker"),
                         ("prefect.events.worker", "EventsWorker")):
        if module in sys.modules:
            worker = getattr(sys.modules[module], name, None)
            if worker is not None:
                with contextlib.suppress(Exception):
                    worker.drain_all(timeout=15)


def _point_prefect_at(url: str) -> None:
    """If Prefect was imported already, its settings were read: update them too."""
    if "prefect.settings" not in sys.modules:
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings
    ctx = temporary_settings(updates={PREFECT_API_URL: url})
    ctx.__enter__()  # for the rest of this process (the server lives as long)


def _main(argv: list[str]) -> int:
    """The server process: dies with its parent, then serves Prefect's API app."""
    lifeline.from_env()
    import uvicorn
    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                port=int(argv[0]), log_level="error", lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
