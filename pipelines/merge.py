"""External k-way merge of sorted runs into one sorted Parquet file.

Each run is read a few thousand rows at a time. Runs written for the merge (by
`RunWriter`, and the merge's own intermediate runs) are Arrow IPC streams of RUN_ROWS-row
record batches: a stream is read a batch at a time with nothing else held, whereas a
Parquet reader holds the file's whole footer, about 5 KB per row group (a 2M-row run of
2,048-row groups: 5 MB, for each of up to FAN_IN open runs) -- which made the merge's
memory grow with the row count. Parquet runs (the earlier stages' per-bucket rejects)
are read row group by row group; those files are bounded by the bucket size.

A round takes, from every run's buffer, the rows not after the smallest "last key"
among the buffers (every row up to there is final: no run can still produce a smaller
one), sorts just those with Arrow (stable, so equal keys keep run order) and appends
them to the output; the run whose buffer ran out reads its next rows. Memory is (runs x buffer) rows, whatever the total; more runs than
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
RUN_ROWS = 2048     # batch (or Parquet row group) size of a run: a reader decodes a whole
                    # one, so this (not BUFFER) bounds what each open run holds
WIDE_RUN_ROWS = 512   # the same for wide rows (the coreset's text and carried columns)
OUTPUT_ROWS = 64_000      # row group size of a merged Parquet output
WIDE_OUTPUT_ROWS = 16_384  # ... of wide rows: the writer holds a row group while encoding
FAN_IN = 64
RUN_SUFFIX = ".arrow"     # runs written as Arrow IPC streams (see module doc)


def _batches(f, path: str, columns: list[str] | None, batch: int):
    if path.endswith(RUN_SUFFIX):
        for b in pa.ipc.open_stream(f):
            yield b.select(columns) if columns is not None else b
        return
    pf = pq.ParquetFile(f)
    for i in range(pf.num_row_groups):
        yield from pf.read_row_group(i, columns=columns).to_batches(max_chunksize=batch)


class _Run:
    def __init__(self, path: str, columns: list[str] | None, batch: int,
                 schema: pa.Schema | None = None):
        fs, p = storage.filesystem(path)
        self._f = fs.open(p, "rb")
        self._it = _batches(self._f, path, columns, batch)
        self._schema = schema
        self.buf: pa.Table | None = None
        self.done = False
        self.fill()

    def fill(self) -> None:
        while not self.done and (self.buf is None or self.buf.num_rows == 0):
            try:
                self.buf = pa.Table.from_batches([next(self._it)])
                if self._schema is not None:     # runs of both kinds agree on nullability
                    self.buf = self.buf.cast(self._schema)
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
           batch: int | None = None, schema: pa.Schema | None = None):
    """Sorted tables, in order, that together are the merge of the sorted runs (cast to
    `schema` when given)."""
    order = [(k, "ascending") for k in keys]
    runs = [r for r in (_Run(p, columns, batch or BUFFER, schema) for p in paths) if not r.done]
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

    def __init__(self, path: str, schema: pa.Schema, row_group_size: int = OUTPUT_ROWS,
                 durable: bool = True):
        self.schema, self.size = schema, row_group_size
        self._ctx = storage.atomic_open(path, "wb", durable)
        self._f = self._ctx.__enter__()
        self._w = self._open(self._f, schema)
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
        self._put(head)
        self.rows += head.num_rows

    @staticmethod
    def _open(f, schema: pa.Schema):
        return pq.ParquetWriter(f, schema, compression="zstd")

    def _put(self, t: pa.Table) -> None:
        self._w.write_table(t, row_group_size=self.size)

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


class RunWriter(RowGroupWriter):
    """A sorted run for `merge`: an Arrow IPC stream (zstd) of `batch_rows`-row batches;
    its path must end in RUN_SUFFIX."""

    def __init__(self, path: str, schema: pa.Schema, batch_rows: int = RUN_ROWS,
                 durable: bool = False):
        if not path.endswith(RUN_SUFFIX):
            raise ValueError(f"a run's path must end in {RUN_SUFFIX}: {path}")
        super().__init__(path, schema, batch_rows, durable)

    @staticmethod
    def _open(f, schema: pa.Schema):
        return pa.ipc.new_stream(f, schema, options=pa.ipc.IpcWriteOptions(compression="zstd"))

    def _put(self, t: pa.Table) -> None:
        for b in t.to_batches():
            self._w.write_batch(b)


def merge(paths: Sequence[str], out: str, keys: list[str], schema: pa.Schema,
          tmp_dir: str, on_chunk: Callable[[pa.Table], None] | None = None,
          row_group_size: int = OUTPUT_ROWS, run_rows: int = RUN_ROWS) -> int:
    """Merge sorted runs into `out`; returns the row count. `on_chunk` sees every sorted
    chunk in order (to count or check on the way). `run_rows`: the runs' row group size
    (intermediate runs are written with it; runs are read that many rows at a time)."""
    batch = min(BUFFER, run_rows)
    paths = list(paths)
    level = 0
    while len(paths) > FAN_IN:             # bounded open runs: merge in rounds
        nxt = []
        for g in range(0, len(paths), FAN_IN):
            p = storage.join(tmp_dir, f"merge-{level}-{g // FAN_IN:05d}{RUN_SUFFIX}")
            with RunWriter(p, schema, run_rows) as w:
                for t in merged(paths[g:g + FAN_IN], keys, schema.names, batch, schema):
                    w.write(t)
            nxt.append(p)
        _remove([p for p in paths if os.path.basename(p).startswith("merge-")])
        paths, level = nxt, level + 1
    with RowGroupWriter(out, schema, row_group_size) as w:
        for t in merged(paths, keys, schema.names, batch, schema):
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
