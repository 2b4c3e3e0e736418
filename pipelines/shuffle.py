"""The shuffle from shards to cluster buckets, bounded in file count.

Each assign task writes ONE file for its shard: an Arrow IPC file whose record batches
each hold the rows of one bucket (its rows' columns plus their float16 vectors), and
records which bucket each batch belongs to. A bucket is then read as the matching
batches of every shard file. At LAION-2B (~2,300 shards) that is 2,300 files whatever
the bucket count, where one part per (shard, bucket) was 2,300 x buckets x 2.

The assign task buffers rows per bucket up to a memory budget and flushes one batch per
bucket, so a shard file has (shard bytes / budget) x buckets batches; a bucket reads a
few contiguous batches per shard. Local files are memory-mapped and only the rows a
step asks for are copied out, so memory follows what is read, not the file.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from pipelines import storage
from pipelines.errors import WarrenError

VEC = "vec"
BUDGET = 256 << 20      # bytes buffered per assign task before a flush


def vectors_of(batch) -> np.ndarray:
    """The (rows, d) float16 vectors of a batch (a view, no copy)."""
    col = batch.column(VEC)
    d = col.type.list_size
    flat = col.values.slice(col.offset * d, len(col) * d)
    return flat.to_numpy(zero_copy_only=True).reshape(len(col), d)


class ShardWriter:
    """Rows of one shard, grouped by bucket, into one IPC file (atomic, see storage)."""

    def __init__(self, path: str, schema: pa.Schema, dim: int, budget: int = BUDGET):
        self.path, self.dim, self.budget = path, dim, budget
        self.schema = schema.append(pa.field(VEC, pa.list_(pa.float16(), dim), nullable=False))
        self.pending: dict[int, list[pa.RecordBatch]] = {}
        self.size = 0
        self.runs: list[int] = []          # bucket of each written batch, in file order
        self._ctx = storage.atomic_open(path)
        self._f = self._ctx.__enter__()
        self._w = ipc.new_file(self._f, self.schema)

    def add(self, bucket: int, table: pa.Table, vecs: np.ndarray) -> None:
        """Rows of one bucket: their columns and (rows, d) float16 vectors."""
        v = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(vecs).ravel()),
                                              self.dim)
        cols = [table.column(n).combine_chunks() for n in self.schema.names[:-1]] + [v]
        rb = pa.RecordBatch.from_arrays(cols, schema=self.schema)
        self.pending.setdefault(bucket, []).append(rb)
        self.size += rb.nbytes
        if self.size >= self.budget:
            self.flush()

    def flush(self) -> None:
        for b in sorted(self.pending):
            t = pa.Table.from_batches(self.pending[b], self.schema).combine_chunks()
            for rb in t.to_batches():
                self._w.write_batch(rb)
                self.runs.append(b)
        self.pending, self.size = {}, 0

    def close(self) -> list[int]:
        self.flush()
        self._w.close()
        self._ctx.__exit__(None, None, None)
        return self.runs

    def abort(self, exc) -> None:
        self._ctx.__exit__(type(exc), exc, exc.__traceback__)


class _Open:
    """One shard file opened for random access to its batches."""

    def __init__(self, path: str):
        self.path = path
        if storage.is_local(path):
            self._src = pa.memory_map(storage.filesystem(path)[1], "r")
        else:
            fs, p = storage.filesystem(path)
            self._src = fs.open(p, "rb")
        try:
            self.reader = ipc.open_file(self._src)
        except pa.ArrowInvalid as e:
            self._src.close()
            raise WarrenError(f"{path}: unreadable shuffle file ({e}); delete its assign "
                              "completion marker and rerun") from None

    def batch(self, i: int) -> pa.RecordBatch:
        return self.reader.get_batch(i)

    def close(self) -> None:
        self._src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Bucket:
    """One bucket across the shard files: its rows' columns as one table (in shard, then
    batch order) and their vectors on request."""

    def __init__(self, paths: list[str], runs: list[list[int]], bucket: int,
                 columns: list[str] | None = None):
        self.paths = paths
        self.parts: list[tuple[int, int]] = []     # (file, batch) per part, in table order
        tables, counts = [], []
        for f, (path, r) in enumerate(zip(paths, runs)):
            want = [i for i, b in enumerate(r) if b == bucket]
            if not want:
                continue
            with _Open(path) as o:
                for i in want:
                    rb = o.batch(i)
                    keep = [c for c in (columns or rb.schema.names) if c != VEC]
                    # copied out, so the file can be closed (and unmapped)
                    tables.append(pa.Table.from_batches([rb.select(keep)]).combine_chunks())
                    self.parts.append((f, i))
                    counts.append(rb.num_rows)
        self.table = pa.concat_tables(tables) if tables else None
        self.counts = np.asarray(counts, np.int64)
        self.part = np.repeat(np.arange(len(counts)), counts)
        starts = np.r_[0, np.cumsum(counts)[:-1]] if len(counts) else np.zeros(0, np.int64)
        self.offset = np.arange(int(self.counts.sum())) - np.repeat(starts, counts)

    @property
    def rows(self) -> int:
        return int(self.counts.sum())

    def vectors(self, idx: np.ndarray, dim: int) -> np.ndarray:
        """Rows `idx` of the bucket (in that order), as one float16 array. One pass over
        the files: ask for a whole group of clusters at once, not one cluster at a time
        (a cluster's rows come from every shard)."""
        out = np.empty((len(idx), dim), np.float16)
        if not len(idx):
            return out
        part = self.part[idx]
        order = np.argsort(part, kind="stable")
        sp = part[order]
        cuts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1], True])
        current, opened = -1, None
        try:
            for s, e in zip(cuts[:-1], cuts[1:]):
                f, batch = self.parts[int(sp[s])]
                if f != current:
                    if opened is not None:
                        opened.close()
                    opened, current = _Open(self.paths[f]), f
                at = order[s:e]
                src = vectors_of(opened.batch(batch))
                out[at] = src[self.offset[idx[at]]]
                del src          # the mapped pages leave this process with the map
        finally:
            if opened is not None:
                opened.close()
        return out
