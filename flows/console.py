"""What a person at the terminal sees while a flow runs.

- `Progress`: rows done of one stage over all its shards, with rows/s and ETA — a tqdm
  bar on a terminal (as `warren select` shows), a line every `interval` seconds and one
  when the stage ends otherwise (logs, pipes). Tasks running in this process report rows as they go
  (`report(stage, shard, done)`); shards finished elsewhere (Dask workers) count when
  the flow collects them (`shard_done`).
- `setup_logging(verbose)`: Warren's own loggers at INFO; third-party ones (open_clip's
  `INFO root:` lines, httpx's request lines, uvicorn) only from ERROR up unless -v; and
  Prefect's console lines kept out of the way: its run/task chatter and its copies of an
  error (the traceback and "Finished in state Failed") go to the Prefect API as before,
  and the command prints the error once. `-v` shows everything.
"""
from __future__ import annotations

import logging
import sys
import threading
import time

OUR_LOGGERS = ("flows", "pipelines", "mllm")
_ENABLED = [False]
_PREFECT_LEVEL = [None]     # None: Prefect's records stay off the terminal (unless -v)
_BARS: dict[str, "Progress"] = {}
_LOCK = threading.Lock()


def enable(on: bool = True) -> None:
    """Progress on stderr for flows run by this process (the CLI turns it on)."""
    _ENABLED[0] = on


def enabled() -> bool:
    return _ENABLED[0]


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Rows of one stage over its shards (thread-safe)."""

    def __init__(self, stage: str, shard_rows: dict[int, int], stream=None,
                 interval: float = 10.0, tty: bool | None = None, unit: str = "rows"):
        self.stage = stage
        self.unit = unit
        self.total = int(sum(shard_rows.values()))
        self.shards = dict(shard_rows)
        self.done: dict[int, int] = {}
        self.finished: set[int] = set()
        self.stream = stream or sys.stderr
        self.interval = interval
        self.t0 = time.monotonic()
        self.last_line = self.t0
        self.lock = threading.Lock()
        tty = self.stream.isatty() if tty is None else tty
        self.bar = None
        if tty:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc=stage, unit=unit.rstrip("s"), file=self.stream,
                            mininterval=0.5, leave=True, dynamic_ncols=True)

    def rows(self) -> int:
        return sum(self.done.values())

    def update(self, shard: int, done: int) -> None:
        with self.lock:
            done = min(int(done), self.shards.get(shard, done))
            if done <= self.done.get(shard, 0):
                return
            self.done[shard] = done
            self._show(force=False)

    def shard_done(self, shard: int, rows: int | None = None) -> None:
        with self.lock:
            if shard in self.finished:
                return
            self.finished.add(shard)
            self.done[shard] = self.shards.get(shard, rows or 0) if rows is None else rows
            self._show(force=len(self.finished) == len(self.shards))

    def line(self) -> str:
        n, dt = self.rows(), max(time.monotonic() - self.t0, 1e-9)
        rate = n / dt
        eta = (self.total - n) / rate if rate > 0 else None
        shards = f" ({len(self.finished)}/{len(self.shards)} shards)" if self.unit == "rows" else ""
        rate_s = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2f}"
        return (f"{self.stage}: {n:,}/{self.total:,} {self.unit}{shards}, {rate_s} {self.unit}/s, "
                + (f"ETA {_fmt_s(eta)}" if eta is not None and n < self.total else
                   f"{_fmt_s(dt)} elapsed"))

    def _show(self, force: bool) -> None:
        if self.bar is not None:
            self.bar.n = self.rows()
            if self.unit == "rows":
                self.bar.set_postfix_str(f"{len(self.finished)}/{len(self.shards)} shards",
                                         refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if force or now - self.last_line >= self.interval:
            self.last_line = now
            # write, not print: flows with log_prints=True turn print() into log records
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def start(stage: str, shard_rows: dict[int, int], unit: str = "rows") -> Progress | None:
    """A progress display for `stage` when progress is on in this process."""
    if not _ENABLED[0] or not shard_rows:
        return None
    p = Progress(stage, shard_rows, unit=unit)
    with _LOCK:
        old = _BARS.pop(stage, None)
        _BARS[stage] = p
    if old is not None:
        old.close()
    return p


def stop(stage: str) -> None:
    with _LOCK:
        p = _BARS.pop(stage, None)
    if p is not None:
        p.close()


def report(stage: str, shard: int, done: int) -> None:
    """Rows done of one shard, from a task in this process (no-op elsewhere)."""
    p = _BARS.get(stage)
    if p is not None:
        p.update(shard, done)


def shard_done(stage: str, shard: int, rows: int | None = None) -> None:
    p = _BARS.get(stage)
    if p is not None:
        p.shard_done(shard, rows)


# -- logging ------------------------------------------------------------------------------
class _ConsoleFilter(logging.Filter):
    """Unless -v, the terminal gets Warren's own records, and third-party ones only from
    ERROR up. Prefect's records (run and task chatter, its copies of an error with their
    tracebacks, "Finished in state Failed") stay off it entirely: the Prefect API still
    receives them, and the command prints the error once."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name.split(".")[0] in OUR_LOGGERS or name == "__main__":
            return True
        if name.startswith("prefect") or "/prefect/" in (record.pathname or ""):
            return _PREFECT_LEVEL[0] is not None and record.levelno >= _PREFECT_LEVEL[0]
        return record.levelno >= logging.ERROR


def show_prefect(level: int | None = logging.INFO) -> None:
    """Let Prefect's own records from `level` up reach the terminal (`warren serve`,
    whose console is a server log); None hides them again."""
    _PREFECT_LEVEL[0] = level


def setup_logging(verbose: bool = False) -> None:
    """Configure the console for a `warren` command (see the module docstring)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_warren", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._warren = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    if not verbose:
        handler.addFilter(_ConsoleFilter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for name in ("faiss.loader", "httpx", "httpcore", "uvicorn", "uvicorn.access",
                     "distributed", "urllib3", "PIL", "matplotlib"):
            logging.getLogger(name).setLevel(logging.WARNING)


def quiet_prefect(verbose: bool = False) -> None:
    """After Prefect is imported: its loggers send to the API as configured, and reach
    the console only through our handler's filter (Prefect's own console handler, where
    it installed one, gets the same filter)."""
    if verbose:
        return
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for h in logging.getLogger(name).handlers:
            if type(h).__name__ == "PrefectConsoleHandler" and \
                    not any(isinstance(f, _ConsoleFilter) for f in h.filters):
                h.addFilter(_ConsoleFilter())
