"""External k-way merge of sorted Parquet runs into one sorted Parquet file.

Each run is read a few thousand rows at a time (runs are written in row groups of
RUN_ROWS rows, the unit Parquet decodes). A round takes, from every run's buffer,
the rows not after the smallest "last key" among the buffers (every row up to there is
final: no run can still produce a smaller one), sorts just those with Arrow (stable, so
equal keys keep run order) and appends them to the output; the run whose buffer ran out
reads its next rows. Memory is (runs x buffer) rows, whatever the total; more runs than
`FAN_IN` are merged in rounds through intermediate files.

The output is written in row groups of exactly `row_group_size` rows, each from one
contiguous chunk, so the file is byte-identical to `storage.write_table` of the same
sorted table.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage

BUFFER = 4096       # rows read from a run at a time
RUN_ROWS = 2048     # row group size of a run: Parquet decodes a row group's column chunks
                    # whole, so this (not BUFFER) bounds what each open run holds
WIDE_RUN_ROWS = 512   # the same for wide rows (the coreset's text and carried columns)
FAN_IN = 64


class _Run:
    def __init__(self, path: str, columns: list[str] | None, batch: int):
        fs, p = storage.filesystem(path)
        self._f = fs.open(p, "rb")
        self._it = pq.ParquetFile(self._f).iter_batches(batch_size=batch, columns=columns)
        self.buf: pa.Table | None = None
        self.done = False
        self.fill()

    def fill(self) -> None:
        while not self.done and (self.buf is None or self.buf.num_rows == 0):
            try:
                self.buf = pa.Table.from_batches([next(self._it)])
            except StopIteration:
                self.done, self.buf = True, None
                self._f.close()


def _key(t: pa.Table, i: int, keys: list[str]) -> tuple:
    return tuple(t.column(k)[i].as_py() for k in keys)


def _not_after(t: pa.Table, bound: tuple, keys: list[str]) -> int:
    """How many leading rows of the sorted table `t` have key <= bound."""
    le = None
    eq = None
    for k, v in zip(keys, bound):
        col = t.column(k)
        s = pa.scalar(v, col.type)
        lt_k, eq_k = pc.less(col, s), pc.equal(col, s)
        term = lt_k if eq is None else pc.and_(eq, lt_k)
        le = term if le is None else pc.or_(le, term)
        eq = eq_k if eq is None else pc.and_(eq, eq_k)
    mask = pc.or_(le, eq)
    return int(pc.sum(mask).as_py() or 0)


def merged(paths: Sequence[str], keys: list[str], columns: list[str] | None = None,
           batch: int | None = None):
    """Sorted tables, in order, that together are the merge of the sorted runs."""
    order = [(k, "ascending") for k in keys]
    runs = [r for r in (_Run(p, columns, batch or BUFFER) for p in paths) if not r.done]
    while runs:
        bound = min((_key(r.buf, r.buf.num_rows - 1, keys) for r in runs))
        parts = []
        for r in runs:
            m = _not_after(r.buf, bound, keys)
            if m:
                parts.append(r.buf.slice(0, m))
                r.buf = r.buf.slice(m)
            r.fill()
        t = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if len(parts) > 1:
            t = t.take(pc.sort_indices(t, order))
        yield t
        runs = [r for r in runs if not r.done]


class RowGroupWriter:
    """A Parquet file written in exact `row_group_size` row groups (see module doc)."""

    def __init__(self, path: str, schema: pa.Schema, row_group_size: int = 64_000,
                 durable: bool = True):
        self.schema, self.size = schema, row_group_size
        self._ctx = storage.atomic_open(path, "wb", durable)
        self._f = self._ctx.__enter__()
        self._w = pq.ParquetWriter(self._f, schema, compression="zstd")
        self._pending: list[pa.Table] = []
        self._n = 0
        self.rows = 0

    def write(self, t: pa.Table) -> None:
        if not t.num_rows:
            return
        self._pending.append(t.select(self.schema.names).cast(self.schema))
        self._n += t.num_rows
        while self._n >= self.size:
            self._emit(self.size)

    def _emit(self, n: int) -> None:
        t = pa.concat_tables(self._pending)
        self._pending = []
        head, rest = t.slice(0, n).combine_chunks(), t.slice(n)
        del t                   # the pieces go as the contiguous copy is made
        self._pending, self._n = ([rest] if rest.num_rows else []), rest.num_rows
        self._w.write_table(head, row_group_size=self.size)
        self.rows += head.num_rows

    def close(self) -> None:
        if self._n:
            self._emit(self._n)
        self._w.close()
        self._ctx.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        try:
            self._w.close()
        finally:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.close()
        else:
            self.abort(ev)


def merge(paths: Sequence[str], out: str, keys: list[str], schema: pa.Schema,
          tmp_dir: str, on_chunk: Callable[[pa.Table], None] | None = None,
          row_group_size: int = 64_000, run_rows: int = RUN_ROWS) -> int:
    """Merge sorted runs into `out`; returns the row count. `on_chunk` sees every sorted
    chunk in order (to count or check on the way). `run_rows`: the runs' row group size
    (intermediate runs are written with it; runs are read that many rows at a time)."""
    batch = min(BUFFER, run_rows)
    paths = list(paths)
    level = 0
    while len(paths) > FAN_IN:             # bounded open runs: merge in rounds
        nxt = []
        for g in range(0, len(paths), FAN_IN):
            p = storage.join(tmp_dir, f"merge-{level}-{g // FAN_IN:05d}.parquet")
            with RowGroupWriter(p, schema, run_rows, durable=False) as w:
                for t in merged(paths[g:g + FAN_IN], keys, schema.names, batch):
                    w.write(t)
            nxt.append(p)
        _remove([p for p in paths if os.path.basename(p).startswith("merge-")])
        paths, level = nxt, level + 1
    with RowGroupWriter(out, schema, row_group_size) as w:
        for t in merged(paths, keys, schema.names, batch):
            if on_chunk is not None:
                on_chunk(t)
            w.write(t)
    _remove([p for p in paths if os.path.basename(p).startswith("merge-")])
    return w.rows


def _remove(paths: list[str]) -> None:
    for p in paths:
        fs, q = storage.filesystem(p)
        if fs.exists(q):
            fs.rm(q)
