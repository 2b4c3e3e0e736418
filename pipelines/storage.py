"""Every path goes through here: fsspec file systems, atomic writes, completion markers.

Writes land in a temporary sibling and are renamed into place, so a killed run never
leaves a partial file under the final name. Completion markers (datatrove-style) let a
rerun skip finished units of work.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import uuid
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import InputError, OutputError

COMPLETIONS = "_completions"


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system for `path` and the path stripped of its protocol."""
    fs, _, paths = fsspec.get_fs_token_paths(str(path))
    return fs, paths[0]


def is_local(path: str) -> bool:
    """Whether `path` is on the local file system (so it can be memory-mapped)."""
    protocol = filesystem(path)[0].protocol
    return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))


def join(base: str, *parts: str) -> str:
    base = str(base)
    return "/".join([base.rstrip("/")] + [str(p).strip("/") for p in parts])


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def makedirs(path: str) -> str:
    fs, p = filesystem(path)
    try:
        fs.makedirs(p, exist_ok=True)
    except OSError as e:
        raise write_failure(path, e) from None
    return str(path)


def listdir(path: str, pattern: str = "*") -> list[str]:
    """Sorted paths under `path` matching a glob pattern (protocol kept)."""
    fs, p = filesystem(path)
    found = sorted(fs.glob(join(p, pattern)))
    proto = str(path).split("://", 1)[0] + "://" if "://" in str(path) else ""
    return [proto + f if proto and not f.startswith(proto) else f for f in found]


# The name of every temporary Warren writes: `.{final name}.tmp-{8 hex}`. Cleanup of a
# killed run's leftovers deletes only names of exactly this form (never a user's
# `notes.tmp-1`), and only inside Warren's own work folder.
TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")

_REASONS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
            errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EISDIR: "it is a folder", errno.EEXIST: "a file is in the way of the output folder",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}


def write_failure(path: str, err: OSError) -> OutputError:
    """The one-line error for an output that could not be written."""
    reason = _REASONS.get(err.errno) or (os.strerror(err.errno).lower() if err.errno
                                          else str(err) or type(err).__name__)
    return OutputError(str(path), reason)


class _Guarded:
    """A file whose write errors (ENOSPC, EROFS, ...) name the output being written. A
    raw OSError from a write would otherwise reach the user as a traceback, or be
    confused with an unreadable input read inside the same `with` block."""

    def __init__(self, f, path: str):
        self._f, self._path = f, path

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            raise write_failure(self._path, e) from None

    def flush(self):
        try:
            return self._f.flush()
        except OSError as e:
            raise write_failure(self._path, e) from None

    def __getattr__(self, name):
        return getattr(self._f, name)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(p: str) -> str:
    parent, base = os.path.split(p)
    name = f".{base}.tmp-{uuid.uuid4().hex[:8]}"
    return f"{parent}/{name}" if parent else name


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", durable: bool = True) -> Iterator[Any]:
    """Open a temporary sibling of `path`; rename it over `path` only on success.

    On the local file system the file is fsynced before the rename and its folder after
    it, so a finished write survives a power cut, not only a kill (`durable=False` skips
    both: for scratch files a step rewrites from scratch whenever it runs). Any failure
    to write (no space, read-only, a file where a folder should be) raises OutputError."""
    fs, p = filesystem(path)
    parent = os.path.dirname(p)
    local = is_local(path)
    tmp = temp_name(p)
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        f = open(tmp, mode) if local else fs.open(tmp, mode)
    except OSError as e:
        raise write_failure(path, e) from None
    try:
        failed = True
        try:
            yield _Guarded(f, str(path))
            try:
                f.flush()
                if local and durable:
                    os.fsync(f.fileno())
            except OSError as e:
                raise write_failure(path, e) from None
            failed = False
        finally:
            # After a failed write, close() flushes the same bytes again and fails too;
            # its bare OSError must not replace the error that names the file.
            try:
                f.close()
            except OSError as e:
                if not failed:
                    raise write_failure(path, e) from None
        try:
            if local:
                os.replace(tmp, p)
                if durable:
                    _fsync_dir(parent)
            else:
                fs.mv(tmp, p)
        except OSError as e:
            raise write_failure(path, e) from None
    finally:
        try:
            if (os.path.lexists(tmp) if local else fs.exists(tmp)):
                os.remove(tmp) if local else fs.rm(tmp)
        except OSError:     # cleaning up after a failed write must not hide its error
            pass


def remove_temporaries(folder: str) -> int:
    """Delete the temporaries a killed run left under `folder` (names of TEMP_NAME's
    form only); returns how many. Call it only on a folder Warren owns."""
    fs, p = filesystem(folder)
    n = 0
    if fs.isdir(p):
        for f in fs.find(p):
            if TEMP_NAME.match(f.rsplit("/", 1)[-1]):
                fs.rm(f)
                n += 1
    return n


def write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str) -> Any:
    fs, p = filesystem(path)
    try:
        with fs.open(p, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise InputError("file not found", path=path) from None
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg} at line {e.lineno})", path=path) from None


def write_table(table: pa.Table, path: str, schema: pa.Schema | None = None,
                row_group_size: int = 64_000, durable: bool = True) -> None:
    """Write a Parquet file atomically, cast to the explicit `schema` when given."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    with atomic_open(path, "wb", durable) as f:
        pq.write_table(table, f, row_group_size=row_group_size, compression="zstd")


def read_table(path: str, columns: list[str] | None = None,
               schema: pa.Schema | None = None) -> pa.Table:
    """Read a Parquet file; corrupt or missing files raise InputError naming the file."""
    fs, p = filesystem(path)
    try:
        with fs.open(p, "rb") as f:
            table = pq.read_table(f, columns=columns)
    except FileNotFoundError:
        raise InputError("file not found", path=path) from None
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"unreadable Parquet ({e})", path=path) from None
    if schema is not None:
        missing = [n for n in (columns or schema.names) if n not in table.column_names]
        if missing:
            raise InputError(f"missing column(s) {missing}", path=path, field=missing[0])
        table = table.select(columns or schema.names).cast(
            pa.schema([schema.field(n) for n in (columns or schema.names)]))
    return table


def sha256(path: str, chunk: int = 1 << 20) -> str:
    fs, p = filesystem(path)
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def marker_path(root: str, name: str) -> str:
    return join(root, COMPLETIONS, f"{name}.json")


def is_done(root: str, name: str) -> bool:
    return exists(marker_path(root, name))


def mark_done(root: str, name: str, info: dict | None = None) -> None:
    """Record that unit `name` finished; written last, after its outputs are in place."""
    write_json(marker_path(root, name), info or {})


def done_info(root: str, name: str) -> dict:
    return read_json(marker_path(root, name))
