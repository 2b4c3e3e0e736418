"""Every path goes through here: fsspec file systems, atomic writes, completion markers.

Writes land in a temporary sibling and are renamed into place, so a killed run never
leaves a partial file under the final name. Completion markers (datatrove-style) let a
rerun skip finished units of work.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import InputError

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
    fs.makedirs(p, exist_ok=True)
    return str(path)


def listdir(path: str, pattern: str = "*") -> list[str]:
    """Sorted paths under `path` matching a glob pattern (protocol kept)."""
    fs, p = filesystem(path)
    found = sorted(fs.glob(join(p, pattern)))
    proto = str(path).split("://", 1)[0] + "://" if "://" in str(path) else ""
    return [proto + f if proto and not f.startswith(proto) else f for f in found]


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of `path`; rename it over `path` only on success."""
    fs, p = filesystem(path)
    parent = os.path.dirname(p)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{os.path.basename(p)}.tmp-{uuid.uuid4().hex[:8]}" if parent \
        else f".{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, p)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


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
                row_group_size: int = 64_000) -> None:
    """Write a Parquet file atomically, cast to the explicit `schema` when given."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    with atomic_open(path, "wb") as f:
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
