"""Child processes that do not outlive their parent.

A SIGKILLed `warren` runs no cleanup, so its children must notice by themselves. Each
child Warren starts calls one of these first thing:

- `from_env()` in a child started with `child_env()` (img2dataset's subprocess, the
  Prefect API server): Linux's parent-death signal (prctl PR_SET_PDEATHSIG) delivers
  SIGKILL when the parent dies; the parent's pid in the environment closes the race
  where the parent died before the child asked.
- `worker_init(pid)` in pool workers whose direct parent is a helper (the forkserver
  the embed step's decoding pool uses): the parent-death signal covers the helper, and
  a watchdog thread polls the original process (pid and start time, so a reused pid
  does not count).

`python -m pipelines.lifeline CMD ARGS...` runs any command under the same rule.
No dependency beyond ctypes; elsewhere than Linux the signal part is skipped.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

ENV = "WARREN_PARENT_PID"
PR_SET_PDEATHSIG = 1


def parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (thread) exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if fields and fields[0] in ("Z", "X"):     # a zombie is dead
        return None
    return fields[19] if len(fields) > 19 else None


def alive(pid: int, started: str | None = None) -> bool:
    if sys.platform.startswith("linux"):
        now = start_time(pid)
        return now is not None and (started is None or now == started)
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """This process dies with its parent. `parent_pid`: who the parent should be; if it
    is already gone (we were reparented), die now."""
    parent_death_signal(sig)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def watch(pid: int, interval: float = 0.5, sig: int = signal.SIGKILL) -> threading.Thread:
    """A daemon thread that kills this process once `pid` is gone."""
    started = start_time(pid) if sys.platform.startswith("linux") else None

    def loop():
        while alive(pid, started):
            time.sleep(interval)
        os.kill(os.getpid(), sig)

    t = threading.Thread(target=loop, name=f"lifeline-{pid}", daemon=True)
    t.start()
    return t


def child_env(env: dict | None = None) -> dict:
    """The environment for a child that calls `from_env()`."""
    return {**(os.environ if env is None else env), ENV: str(os.getpid())}


def from_env(sig: int = signal.SIGKILL) -> None:
    """In a child started with `child_env()`: die (`sig`) with the parent that started us."""
    pid = os.environ.pop(ENV, None)
    if pid and pid.isdigit():
        die_with_parent(int(pid), sig)


def take_children_along() -> None:
    """For a child that starts processes of its own (img2dataset's pool): on SIGTERM,
    kill every multiprocessing child, then exit. Pair with `from_env(signal.SIGTERM)`."""
    import multiprocessing

    def die(signum, frame):
        for p in multiprocessing.active_children():
            p.kill()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, die)


def worker_init(main_pid: int) -> None:
    """Pool-worker initializer: die with the direct parent and with `main_pid`."""
    parent_death_signal()
    if not alive(main_pid):
        os.kill(os.getpid(), signal.SIGKILL)
    watch(main_pid)


def _main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m pipelines.lifeline CMD [ARGS...]", file=sys.stderr)
        return 2
    from_env()
    os.execvp(argv[0], argv)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
