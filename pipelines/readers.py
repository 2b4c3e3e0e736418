"""Streaming readers for embedding sources.

Two layouts are understood, detected from the folder:
- LAION / clip-retrieval: `img_emb/img_emb_{i:04d}.npy`, `text_emb/text_emb_{i:04d}.npy`,
  `metadata/metadata_{i:04d}.parquet` (same row order; uid column `key` by default).
  Arrays are memory-mapped and read in row ranges, never whole.
- Warren Parquet tables: `*.parquet` files with `img_emb`/`txt_emb` fixed-size-list columns.

A shard is read in batches of rows; a batch is float32 and not yet validated (that is
the validate stage's job, which turns bad rows into rejects).
"""
from __future__ import annotations

import base64
import contextlib
import os
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc  # noqa: F401 (pa.ipc)
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import InputError, setting

_NPY_INDEX = re.compile(r"_(\d+)\.npy$")
EMBEDDINGS = ("img_emb", "txt_emb")
# Text columns with a fixed place in the coreset, and the reject reason for a row whose
# value there is not valid UTF-8.
TEXT = {"caption": "bad_caption", "url": "bad_url"}


@dataclass(frozen=True)
class Shard:
    index: int
    rows: int
    meta: str                 # metadata Parquet (LAION) or the table itself (Warren)
    img: str | None = None    # npy (LAION layout only)
    txt: str | None = None


@dataclass
class Batch:
    start: int                # first row of the batch within its shard
    img: np.ndarray           # (m, d) float32, as stored
    txt: np.ndarray | None
    bad_dim: np.ndarray | None = None   # rows whose stored vector had the wrong length


class EmbeddingSource:
    """An opened, checked embedding folder. Cheap to construct: reads headers only."""

    def __init__(self, root: str, uid_column: str = "key"):
        self.root = str(root)
        self.uid_column = uid_column
        if storage.exists(storage.join(self.root, "img_emb")):
            self.layout = "laion"
            self.shards, self.dim, self.has_text = self._open_laion()
        else:
            self.layout = "parquet"
            self.uid_column = uid_column if uid_column != "key" else "uid"
            self.shards, self.dim, self.has_text = self._open_parquet()
        if not self.shards:
            raise InputError("no embedding shards found (expected img_emb/*.npy + metadata/*.parquet, "
                             "or Parquet tables with an img_emb column)", path=self.root)
        self.columns = _carried_schema(self.shards, self._schemas, self.uid_column)
        del self._schemas

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    # -- a record of the opened source, so each task reopens it without a listing ------
    def to_record(self) -> dict:
        return {"root": self.root, "uid_column": self.uid_column, "layout": self.layout,
                "dim": self.dim, "has_text": self.has_text,
                "shards": [[s.meta, s.img, s.txt, s.rows] for s in self.shards],
                "columns": base64.b64encode(self.columns.serialize().to_pybytes()).decode()}

    @classmethod
    def from_record(cls, rec: dict) -> "EmbeddingSource":
        """The source as `to_record` saw it (no file is opened): per-shard and per-bucket
        tasks at LAION's 2,300 shards must not each list and open every shard."""
        self = cls.__new__(cls)
        self.root, self.uid_column, self.layout = rec["root"], rec["uid_column"], rec["layout"]
        self.dim, self.has_text = rec["dim"], rec["has_text"]
        self.shards = [Shard(i, rows, meta, img, txt)
                       for i, (meta, img, txt, rows) in enumerate(rec["shards"])]
        self.columns = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(rec["columns"])))
        return self

    # -- layout detection -------------------------------------------------------------
    def _open_laion(self):
        imgs = storage.listdir(storage.join(self.root, "img_emb"), "*.npy")
        shards, dim, has_text = [], None, True
        self._schemas = []
        for i, img in enumerate(imgs):
            m = _NPY_INDEX.search(img)
            tag = m.group(1) if m else f"{i:04d}"
            meta = storage.join(self.root, "metadata", f"metadata_{tag}.parquet")
            txt = storage.join(self.root, "text_emb", f"text_emb_{tag}.npy")
            n, d = _npy_shape(img)
            if dim is None:
                dim = d
            elif d != dim:
                raise InputError(f"embedding dimension {d} differs from the first shard's {dim}",
                                 path=img, field="img_emb")
            if not storage.exists(meta):
                raise InputError("metadata file for this embedding shard is missing", path=meta)
            meta_rows = _parquet_rows(meta)
            if meta_rows != n:
                raise InputError(f"{meta_rows} metadata rows but {n} embedding rows in {img}",
                                 path=meta)
            schema = _parquet_schema(meta)
            _require_columns(meta, [self.uid_column], schema)
            self._schemas.append(schema)
            if storage.exists(txt):
                tn, td = _npy_shape(txt)
                if (tn, td) != (n, d):
                    raise InputError(f"text embeddings are {tn}x{td} but image embeddings are {n}x{d}",
                                     path=txt)
            else:
                has_text, txt = False, None
            shards.append(Shard(i, n, meta, img, txt))
        if not has_text:
            shards = [Shard(s.index, s.rows, s.meta, s.img, None) for s in shards]
        return shards, dim, has_text

    def _open_parquet(self):
        files = storage.listdir(self.root, "*.parquet")
        shards, dim, has_text = [], None, None
        self._schemas = []
        for i, path in enumerate(files):
            schema = _parquet_schema(path)
            _require_columns(path, [self.uid_column, "img_emb"], schema)
            self._schemas.append(pa.schema([f for f in schema if f.name not in EMBEDDINGS]))
            t = schema.field("img_emb").type
            d = t.list_size if pa.types.is_fixed_size_list(t) else None
            if d is not None:
                if dim is None:
                    dim = d
                elif d != dim:
                    raise InputError(f"embedding dimension {d} differs from the first table's {dim}",
                                     path=path, field="img_emb")
            text = "txt_emb" in schema.names
            has_text = text if has_text is None else (has_text and text)
            shards.append(Shard(i, _parquet_rows(path), path))
        if shards and dim is None:  # variable-length lists everywhere: take the commonest length
            dim = _modal_list_length(shards[0].meta)
        return shards, dim, bool(has_text)

    # -- reading ----------------------------------------------------------------------
    def metadata(self, shard: Shard, columns: list[str] | None = None) -> pa.Table:
        """The shard's non-embedding columns (all of them unless `columns`)."""
        if columns is None:
            names = _parquet_schema(shard.meta).names
            columns = [c for c in names if c not in EMBEDDINGS]
        return storage.read_table(shard.meta, columns=columns)

    def bad_text(self, shard: Shard) -> dict[str, np.ndarray]:
        """Rows whose text is not valid UTF-8, per reason (`bad_caption`, `bad_url`,
        `bad_text` for any other text column): such a row cannot be written to the
        coreset (Parquet strings are UTF-8), so validation rejects it."""
        names = {f.name: f.type for f in _parquet_schema(shard.meta)}
        # caption and url in any text type; other columns only when typed as strings
        # (a binary column is carried as bytes, valid UTF-8 or not)
        cols = [c for c, t in names.items() if c not in EMBEDDINGS and c != self.uid_column
                and (_is_text(t) if c in TEXT else pa.types.is_string(t) or pa.types.is_large_string(t))]
        if not cols:
            return {}
        t = self.metadata(shard, cols)
        out: dict[str, list] = {}
        for c in cols:
            bad = _invalid_utf8(t.column(c))
            if len(bad):
                out.setdefault(TEXT.get(c, "bad_text"), []).append(bad)
        return {r: np.unique(np.concatenate(v)) for r, v in out.items()}

    def uids(self, shard: Shard) -> pa.StringArray:
        """The shard's uids as one Arrow string array (no Python string per row)."""
        col = storage.read_table(shard.meta, columns=[self.uid_column]).column(0)
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError("uid is null", path=shard.meta, row=row, field=self.uid_column)
        if _is_text(col.type):
            bad = _invalid_utf8(col)
            if len(bad):
                raise InputError("uid is not valid UTF-8", path=shard.meta, row=int(bad[0]),
                                 field=self.uid_column)
        return col.cast(pa.string()).combine_chunks()

    def batches(self, shard: Shard, batch_rows: int = 65_536,
                rows: np.ndarray | None = None, native: bool = False) -> Iterator[Batch]:
        """Row batches of a shard, in order. With `rows`, only those rows (sorted), one batch.
        `native` leaves npy rows in their stored dtype (float16 or float32) for checks
        that read bits and need no float32 copy."""
        if self.layout == "laion":
            yield from self._laion_batches(shard, batch_rows, rows, native)
        else:
            yield from self._parquet_batches(shard, batch_rows, rows)

    def _laion_batches(self, shard, batch_rows, rows, native):
        if rows is not None:
            img = _npy_open(shard.img)
            txt = _npy_open(shard.txt) if shard.txt else None
            yield Batch(0, to_float32(img[rows]), None if txt is None else to_float32(txt[rows]))
            return
        # Plain reads of row ranges, not a memory map: mapped pages would stay in the
        # resident set for the life of the map, and LAION shards are ~1M rows (3 GB).
        conv = (lambda a: a) if native else to_float32
        with _NpyRows(shard.img) as img, \
                (_NpyRows(shard.txt) if shard.txt else contextlib.nullcontext()) as txt:
            for s in range(0, shard.rows, batch_rows):
                e = min(shard.rows, s + batch_rows)
                yield Batch(s, conv(img.read(s, e)), None if txt is None else conv(txt.read(s, e)))

    def _parquet_batches(self, shard, batch_rows, rows):
        cols = ["img_emb"] + (["txt_emb"] if self.has_text else [])
        fs, p = storage.filesystem(shard.meta)
        try:
            with fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                start = 0
                wanted = None if rows is None else np.asarray(rows)
                for rb in pf.iter_batches(batch_size=batch_rows, columns=cols):
                    n = rb.num_rows
                    if wanted is not None:
                        sel = wanted[(wanted >= start) & (wanted < start + n)] - start
                        rb = rb.take(pa.array(sel))
                    img, bad = _list_to_array(rb.column(0), self.dim)
                    txt = None
                    if self.has_text:
                        txt, bad_t = _list_to_array(rb.column(1), self.dim)
                        bad = bad | bad_t
                    if wanted is None or rb.num_rows:
                        yield Batch(start, img, txt, bad)
                    start += n
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"unreadable Parquet ({e})", path=shard.meta) from None


def open_source(path: str, uid_column: str = "key") -> EmbeddingSource:
    return EmbeddingSource(path, uid_column)


# -- helpers ----------------------------------------------------------------------------
class _NpyRows:
    """Reads row ranges of a 2-D C-order .npy file through an fsspec file object."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        fs, p = storage.filesystem(self.path)
        self.f = fs.open(p, "rb")
        try:
            version = np.lib.format.read_magic(self.f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = header(self.f)
        except (ValueError, OSError, EOFError) as e:
            self.f.close()
            raise InputError(f"unreadable npy ({e})", path=self.path) from None
        if fortran or len(shape) != 2:
            self.f.close()
            raise InputError("expected a 2-D C-order array", path=self.path)
        self.offset, self.dtype, self.dim = self.f.tell(), dtype, shape[1]
        self.row_bytes = dtype.itemsize * shape[1]
        return self

    def read(self, start: int, stop: int) -> np.ndarray:
        self.f.seek(self.offset + start * self.row_bytes)
        out = np.empty((stop - start, self.dim), self.dtype)   # writable, for torch.from_numpy
        if self.f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise InputError(f"truncated npy: rows {start}-{stop} missing", path=self.path)
        return out

    def __exit__(self, *exc):
        self.f.close()


def to_float32(a: np.ndarray) -> np.ndarray:
    """`a` as float32 (itself when it already is); float16 goes through torch
    (vectorised F16C, about twice numpy's speed)."""
    if a.dtype == np.float16:
        import torch
        return torch.from_numpy(np.ascontiguousarray(a)).float().numpy()
    return a if a.dtype == np.float32 else a.astype(np.float32)


def to_float16(a: np.ndarray) -> np.ndarray:
    """float16 copy of a float32 array (through torch: 4x numpy's speed)."""
    if a.dtype == np.float32:
        import torch
        return torch.from_numpy(np.ascontiguousarray(a)).half().numpy()
    return np.array(a, np.float16)


def row_flags(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(finite, nonzero) per row of a float16/float32 array, read off the bit patterns
    (NaN and inf have an all-ones exponent; zero has no bit set but the sign): integer
    operations on a view, no float copy."""
    if a.dtype == np.float16:
        bits, exp, mag = a.view(np.uint16), np.uint16(0x7C00), np.uint16(0x7FFF)
    else:
        a = np.ascontiguousarray(a, np.float32)
        bits, exp, mag = a.view(np.uint32), np.uint32(0x7F800000), np.uint32(0x7FFFFFFF)
    return ((bits & exp) != exp).all(1), ((bits & mag) != 0).any(1)


def _npy_open(path: str) -> np.ndarray:
    fs, p = storage.filesystem(path)
    try:
        if fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol:
            return np.load(p, mmap_mode="r")
        with fs.open(p, "rb") as f:
            return np.load(f)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"unreadable npy ({e})", path=path) from None


def _npy_shape(path: str) -> tuple[int, int]:
    arr = _npy_open(path)
    if arr.ndim != 2:
        raise InputError(f"expected a 2-D array, got shape {arr.shape}", path=path)
    if arr.dtype not in (np.float16, np.float32):
        raise InputError(f"expected float16 or float32, got {arr.dtype}", path=path)
    return int(arr.shape[0]), int(arr.shape[1])


def _is_text(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t))


def _invalid_utf8(col) -> np.ndarray:
    """Rows of a string or binary column that are not valid UTF-8. The whole column is
    checked in C++ first; rows are looked at one by one only when that fails."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    try:
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            col.cast(pa.large_string() if pa.types.is_large_binary(col.type) else pa.string())
        else:
            col.validate(full=True)
        return np.zeros(0, np.int64)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    raw = col.view(pa.large_binary() if pa.types.is_large_string(col.type)
                   or pa.types.is_large_binary(col.type) else pa.binary())
    bad = []
    for i, v in enumerate(raw.to_pylist()):
        if v is not None:
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(i)
    return np.asarray(bad, np.int64)


def _carried_schema(shards: list[Shard], schemas: list[pa.Schema], uid: str) -> pa.Schema:
    """The metadata columns over all shards, in order of first appearance. A column must
    have one type in every shard that has it (an all-null column typed `null` fits any);
    `caption` and `url` must be text. A mismatch is found here, when the source is
    opened, before any work is done: found in the finish stage it cost the whole run."""
    fields: dict[str, pa.Field] = {}
    first: dict[str, str] = {}
    for sh, schema in zip(shards, schemas):
        for f in schema:
            if f.name == uid:
                continue
            if f.name in TEXT and not (_is_text(f.type) or pa.types.is_null(f.type)):
                raise InputError(f"{f.name} must be text (string), not {f.type}",
                                 path=sh.meta, field=f.name)
            old = fields.get(f.name)
            if old is None or pa.types.is_null(old.type):
                fields[f.name] = f
                first.setdefault(f.name, sh.meta)
                continue
            same = old.type.equals(f.type) or pa.types.is_null(f.type) or (
                f.name in TEXT and _is_text(old.type) and _is_text(f.type))
            if not same:
                raise InputError(f"type {f.type} differs from {old.type} in {first[f.name]}; "
                                 "a column must have the same type in every shard",
                                 path=sh.meta, field=f.name)
    return pa.schema(list(fields.values()))


def _parquet_schema(path: str) -> pa.Schema:
    fs, p = storage.filesystem(path)
    try:
        with fs.open(p, "rb") as f:
            return pq.ParquetFile(f).schema_arrow
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"unreadable Parquet ({e})", path=path) from None


def _parquet_rows(path: str) -> int:
    fs, p = storage.filesystem(path)
    try:
        with fs.open(p, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"unreadable Parquet ({e})", path=path) from None


def _require_columns(path: str, columns: list[str], schema: pa.Schema | None = None) -> None:
    names = (schema or _parquet_schema(path)).names
    for c in columns:
        if c not in names:
            raise InputError(f"missing column '{c}' (has: {', '.join(names)}); pass "
                             f"{setting('source.uid_column')} if the uid has another name",
                             path=path, field=c)


def _list_to_array(col: pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, dim) float32 from a list column; rows of the wrong length come back zero
    and flagged, so validation can reject them with a reason."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        if col.type.list_size == dim and col.null_count == 0:
            flat = col.flatten().to_numpy(zero_copy_only=False)
            return flat.astype(np.float32, copy=False).reshape(n, dim), np.zeros(n, bool)
        col = col.cast(pa.list_(col.type.value_type))
    lengths = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    bad = lengths != dim
    out = np.zeros((n, dim), np.float32)
    good = np.flatnonzero(~bad)
    if len(good):
        offs = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False).astype(np.float32)
        idx = offs[good][:, None] + np.arange(dim)[None, :]
        out[good] = values[idx]
    return out, bad


def _modal_list_length(path: str) -> int:
    col = storage.read_table(path, columns=["img_emb"]).column(0).combine_chunks()
    lengths = col.value_lengths().drop_null().to_numpy(zero_copy_only=False)
    if not len(lengths):
        raise InputError("cannot infer the embedding dimension from an empty table", path=path)
    vals, counts = np.unique(lengths, return_counts=True)
    return int(vals[np.argmax(counts)])


def shard_name(path: str) -> str:
    return os.path.basename(str(path))
