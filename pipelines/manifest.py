"""manifest.json: the tables a run produced, with row counts and sha256, plus the
config and code version. The trainer reads only what a manifest lists.

Layout (paths are relative to the manifest's folder unless absolute or a URL):

    {"warren_manifest": 1, "created": "...", "code_version": "...", "config": {...},
     "tables": {"coreset": {"path": "coreset.parquet", "rows": 123, "sha256": "...",
                            "images": {"kind": "parquet", "path": "images/images.parquet"}},
                "mix": {...}, "stage1": {...}}}

`images` on a table says where its `image` references resolve:
kind "parquet" (IMAGES schema, looked up by uid), "files" (a folder; image is a relative
path under it) or "webdataset" (a folder of tar shards keyed by uid).
"""
from __future__ import annotations

import datetime as _dt
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import ManifestError

VERSION = 1


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        v = version("warren")
    except PackageNotFoundError:
        v = "unknown"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return f"{v}+{sha}" if sha else v


def table_entry(path: str, base: str, images: dict | None = None) -> dict:
    """Describe one Parquet table: relative path, rows and sha256."""
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    rel = os.path.relpath(path, base) if "://" not in str(path) else str(path)
    entry = {"path": rel, "rows": rows, "sha256": storage.sha256(path)}
    if images:
        entry["images"] = dict(images)
    return entry


def write(path: str, tables: dict[str, str], config: dict | None = None,
          images: dict[str, dict] | None = None, extra: dict | None = None) -> dict:
    """Write manifest.json at `path` listing `tables` (name -> Parquet path)."""
    base = os.path.dirname(str(path))
    doc = {
        "warren_manifest": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "config": config or {},
        "tables": {name: table_entry(p, base, (images or {}).get(name))
                   for name, p in tables.items()},
    }
    doc.update(extra or {})
    storage.write_json(path, doc)
    return doc


@dataclass
class Manifest:
    path: str
    doc: dict = field(repr=False)

    @property
    def base(self) -> str:
        return os.path.dirname(str(self.path))

    def resolve(self, rel: str) -> str:
        return rel if os.path.isabs(rel) or "://" in rel else os.path.join(self.base, rel)

    def table_path(self, name: str) -> str:
        return self.resolve(self.entry(name)["path"])

    def entry(self, name: str) -> dict[str, Any]:
        try:
            return self.doc["tables"][name]
        except KeyError:
            raise ManifestError(f"{self.path}: no table '{name}' "
                                f"(has: {sorted(self.doc['tables'])})") from None

    def images(self, name: str) -> dict | None:
        img = self.entry(name).get("images")
        return None if img is None else {**img, "path": self.resolve(img["path"])}


def load(path: str, verify: bool = True) -> Manifest:
    """Read a manifest; with `verify`, refuse it if any table's sha256 or rows differ."""
    try:
        doc = storage.read_json(path)
    except Exception as e:  # noqa: BLE001 — any read failure is a manifest problem
        raise ManifestError(f"cannot read manifest: {e}") from None
    if not isinstance(doc, dict) or doc.get("warren_manifest") != VERSION or "tables" not in doc:
        raise ManifestError(f"{path}: not a Warren manifest (version {VERSION} with 'tables')")
    m = Manifest(str(path), doc)
    if verify:
        for name, entry in doc["tables"].items():
            p = m.resolve(entry["path"])
            if not storage.exists(p):
                raise ManifestError(f"{path}: table '{name}' is missing at {p}")
            digest = storage.sha256(p)
            if digest != entry["sha256"]:
                raise ManifestError(f"{path}: table '{name}' ({p}) does not match its sha256 "
                                    f"(manifest {entry['sha256'][:12]}…, file {digest[:12]}…): "
                                    "it changed after the manifest was written; rebuild it")
    return m
