"""Downloading images with img2dataset: the pool (to embed it) and the coreset (to train).

img2dataset installs signal handlers, which Python allows only on the main thread, so
it always runs in a subprocess of its own (`python -m pipelines.download ARGS.json`);
that also keeps its spawn pool, wandb and albumentations imports out of the caller.

Steps, each resumable (completion markers under the work folder):
- `split_input`: LAION-style metadata (url, caption, uid) -> fixed parts of
  `shard_rows` rows, checked (columns, null or duplicate uids); rows without a URL, or
  whose URL scheme is not allowed (http and https unless `url_schemes` adds others:
  img2dataset's urllib would otherwise read `file:///etc/...` or `ftp://`), become
  rejects before anything is fetched. The split fixes the shard -> task mapping for
  every later step.
- `download_part`: one part through img2dataset (parquet output, incremental, the uid
  carried as an additional column), then folded into one table per part: the images
  (schema IMAGES + url, caption) and the failures as rejects with a reason. Rows are
  sorted by uid, so a part's output does not depend on download order.
- `merge_images`: coreset parts -> one IMAGES table for the trainer, plus the coreset
  rows whose image could not be fetched.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import lifeline, schemas, storage
from pipelines.errors import ConfigError, InputError, MissingDependencyError, WarrenError


# Rows of one download part: the pool table and the coreset parts share it.
POOL = pa.schema(list(schemas.IMAGES) + [pa.field("url", pa.string()),
                                         pa.field("caption", pa.string())])
PART = pa.schema([pa.field("uid", pa.string(), nullable=False), pa.field("url", pa.string()),
                  pa.field("caption", pa.string())])

# Reject reasons of the download stage.
DEAD_LINK = "dead_link"          # HTTP error status, refused connection, unknown host
TIMEOUT = "timeout"
CORRUPT = "corrupt_image"        # fetched, but not an image anyone can decode
FILTERED = "filtered_image"      # too small, too large, bad aspect ratio (config filters)
DISALLOWED = "disallowed"        # X-Robots-Tag: noai and friends
FAILED = "download_error"        # anything else; the message is counted in the stats
MISSING_URL = "missing_url"
BAD_URL_SCHEME = "bad_url_scheme"  # not one of the allowed schemes (file:, ftp:, data:, a bare path)

DEFAULT_SCHEMES = ("http", "https")
# "scheme://" at the start of a URL (RFC 3986 scheme characters)
_SCHEME = r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://"


@dataclass(frozen=True)
class DownloadConfig:
    """img2dataset settings Warren uses (names follow img2dataset where they exist)."""
    threads: int = 32                 # download threads per process
    processes: int = 1                # img2dataset processes per part
    timeout: int = 10                 # seconds per request
    retries: int = 0
    subshard_rows: int = 1000         # img2dataset shard size inside a part (its resume unit)
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border"] = "no"
    image_size: int = 256             # ignored when resize_mode is "no"
    resize_only_if_bigger: bool = True
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float | None = None   # null: no limit
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] | None = None   # None: img2dataset's default
    url_schemes: tuple[str, ...] = DEFAULT_SCHEMES   # others (e.g. s3) only if img2dataset reads them

    def __post_init__(self):
        p = []
        for name in ("threads", "processes", "timeout", "subshard_rows"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.retries < 0:
            p.append("retries must be >= 0")
        if self.resize_mode not in ("no", "keep_ratio", "center_crop", "border"):
            p.append(f"resize_mode must be no, keep_ratio, center_crop or border "
                     f"(got {self.resize_mode!r})")
        if self.image_size < 8:
            p.append("image_size must be >= 8")
        if not 1 <= self.encode_quality <= 100:
            p.append("encode_quality must be in [1, 100]")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            p.append(f"max_aspect_ratio must be >= 1 or null (got {self.max_aspect_ratio})")
        bad = [x for x in self.url_schemes if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", str(x))]
        if bad or not self.url_schemes:
            p.append(f"url_schemes must be scheme names such as http, https, s3 (got {list(self.url_schemes)})")
        if p:
            raise ConfigError(p, source="download config")

    def to_dict(self) -> dict:
        return asdict(self)


# -- input -------------------------------------------------------------------------------
def _input_files(path: str) -> list[str]:
    if storage.exists(path) and not str(path).endswith(".parquet"):
        files = storage.listdir(path, "*.parquet")
        if not files:
            raise InputError("no *.parquet metadata files in this folder", path=path)
        return files
    if not storage.exists(path):
        raise InputError("metadata file not found", path=path)
    return [str(path)]


def url_checks(url: pa.ChunkedArray | pa.Array, schemes: Sequence[str] = DEFAULT_SCHEMES):
    """(missing, bad_scheme): boolean arrays over `url`. Missing: null or blank; bad
    scheme: a URL whose `scheme://` is absent or not in `schemes` (case-insensitive)."""
    trimmed = pc.utf8_trim_whitespace(url)
    missing = pc.fill_null(pc.equal(trimmed, ""), True)
    scheme = pc.struct_field(pc.extract_regex(trimmed, _SCHEME), [0])
    allowed = pa.array(sorted({str(x).lower() for x in schemes}), pa.string())
    ok = pc.fill_null(pc.is_in(pc.utf8_lower(scheme), value_set=allowed), False)
    return missing, pc.and_(pc.invert(missing), pc.invert(ok))


def split_input(metadata: str, work: str, shard_rows: int, uid_column: str = "uid",
                url_column: str = "url", caption_column: str | None = "caption",
                schemes: Sequence[str] = DEFAULT_SCHEMES) -> dict:
    """Cut the metadata (a Parquet file or a folder of them) into parts of `shard_rows`.

    Writes `work/parts/part_{i:05d}.parquet` (uid, url, caption) and
    `work/rejects/input.parquet` (rows without a URL, and rows whose URL scheme is not
    in `schemes`). Null or duplicate uids are an input error naming the file and row.
    Returns {"parts": n, "rows": total, "missing_url": m, "bad_url_scheme": b,
    "part_rows": [rows of each part]}."""
    if storage.is_done(work, "split"):
        return storage.done_info(work, "split")
    if shard_rows < 1:
        raise ConfigError(f"shard_rows must be >= 1 (got {shard_rows})", source="download")
    files = _input_files(metadata)
    buf: list[pa.Table] = []
    buffered = 0
    parts = 0
    rows = 0
    hashes, origins = [], []
    bad_uids: list[str] = []
    bad_reasons: list[str] = []
    part_rows: list[int] = []
    from pipelines.bands import uid_hash_arrow

    def flush(final: bool):
        nonlocal buf, buffered, parts
        while buffered >= shard_rows or (final and buffered):
            t = pa.concat_tables(buf)
            head, rest = t.slice(0, shard_rows), t.slice(shard_rows)
            storage.write_table(head, storage.join(work, "parts", f"part_{parts:05d}.parquet"), PART)
            part_rows.append(head.num_rows)
            parts += 1
            buf, buffered = ([rest] if rest.num_rows else []), rest.num_rows

    for f in files:
        fs, fp = storage.filesystem(f)
        try:
            with fs.open(fp, "rb") as fh:
                pf_schema = pq.ParquetFile(fh).schema_arrow
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"unreadable Parquet ({e})", path=f) from None
        need = [uid_column, url_column] + ([caption_column] if caption_column else [])
        missing = [c for c in need if c not in pf_schema.names]
        if missing:
            raise InputError(f"missing column '{missing[0]}' (has: {', '.join(pf_schema.names)}); "
                             "set source.uid_column / url_column / caption_column",
                             path=f, field=missing[0])
        t = storage.read_table(f, columns=need)
        uid = t.column(uid_column).cast(pa.string())
        if uid.null_count:
            row = int(np.flatnonzero(uid.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError("uid is null", path=f, row=row, field=uid_column)
        url = t.column(url_column).cast(pa.string())
        cap = (t.column(caption_column).cast(pa.string()) if caption_column
               else pa.nulls(t.num_rows, pa.string()))
        hashes.append(uid_hash_arrow(uid))
        origins.append((f, t.num_rows))
        no_url, bad_scheme = url_checks(url, schemes)
        for mask, why in ((no_url, MISSING_URL), (bad_scheme, BAD_URL_SCHEME)):
            dropped = uid.filter(mask).to_pylist()
            bad_uids += dropped
            bad_reasons += [why] * len(dropped)
        keep = pc.invert(pc.or_(no_url, bad_scheme))
        buf.append(pa.table({"uid": uid.filter(keep), "url": url.filter(keep),
                             "caption": cap.filter(keep)}, schema=PART))
        buffered += buf[-1].num_rows
        rows += t.num_rows
        flush(False)
    _check_unique_uids(files, origins, hashes, uid_column)
    flush(True)
    rej = _rejects(bad_uids, "input", bad_reasons)
    storage.write_table(rej, storage.join(work, "rejects", "input.parquet"), schemas.REJECTS)
    info = {"parts": parts, "rows": rows, "missing_url": bad_reasons.count(MISSING_URL),
            "bad_url_scheme": bad_reasons.count(BAD_URL_SCHEME), "part_rows": part_rows}
    storage.mark_done(work, "split", info)
    return info


def _check_unique_uids(files, origins, hashes, uid_column) -> None:
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    vals, first, counts = np.unique(h, return_index=True, return_counts=True)
    if (counts == 1).all():
        return
    dup = vals[counts > 1][0]
    where = np.flatnonzero(h == dup)[:2]
    bounds = np.cumsum([0] + [n for _, n in origins])

    def locate(i):
        k = int(np.searchsorted(bounds, i, side="right") - 1)
        return origins[k][0], int(i - bounds[k])
    (f0, r0), (f1, r1) = locate(where[0]), locate(where[1])
    raise InputError(f"duplicate uid (also at {f0} row {r0}); uids must be unique",
                     path=f1, row=r1, field=uid_column)


def read_parts(work: str) -> list[str]:
    return storage.listdir(storage.join(work, "parts"), "part_*.parquet")


def split_table(table_path: str, work: str, shard_rows: int,
                schemes: Sequence[str] = DEFAULT_SCHEMES) -> dict:
    """Cut a table with uid, url, caption (a coreset) into download parts. Rows without
    a URL or with a scheme not in `schemes` are not fetched: they go to
    `work/rejects/input.parquet` with their reason."""
    if storage.is_done(work, "split"):
        return storage.done_info(work, "split")
    t = storage.read_table(table_path)
    cols = {"uid": t.column("uid"),
            "url": t.column("url") if "url" in t.column_names else pa.nulls(t.num_rows, pa.string()),
            "caption": t.column("caption") if "caption" in t.column_names
            else pa.nulls(t.num_rows, pa.string())}
    t = pa.table(cols).cast(PART)
    no_url, bad_scheme = url_checks(t.column("url"), schemes)
    reasons = pc.if_else(no_url, MISSING_URL, BAD_URL_SCHEME)
    drop = pc.or_(no_url, bad_scheme)
    storage.write_table(_rejects(t.column("uid").filter(drop).to_pylist(), "coreset_images",
                                 reasons.filter(drop).to_pylist()),
                        storage.join(work, "rejects", "input.parquet"), schemas.REJECTS)
    t = t.filter(pc.invert(drop))
    for n, s in enumerate(range(0, t.num_rows, shard_rows)):
        storage.write_table(t.slice(s, shard_rows),
                            storage.join(work, "parts", f"part_{n:05d}.parquet"), PART)
    part_rows = [min(shard_rows, t.num_rows - s) for s in range(0, t.num_rows, shard_rows)]
    info = {"parts": len(part_rows), "rows": t.num_rows, "part_rows": part_rows,
            "not_fetched": int(pc.sum(drop).as_py() or 0)}
    storage.mark_done(work, "split", info)
    return info


class NothingDownloaded(WarrenError):
    """Every download of a run failed: the images are unreachable, not the data bad."""


def check_downloaded(split: dict, infos: Sequence[dict]) -> None:
    """Stop a run whose downloads all failed (a server that is down, a proxy, a typo in
    the URLs) instead of going on to select from nothing."""
    attempted = sum(i["rows"] for i in infos)
    if sum(i["images"] for i in infos) > 0:
        return
    if attempted == 0:
        raise NothingDownloaded(
            f"none of the {split['rows']:,} metadata rows has a URL to download "
            f"({MISSING_URL} {split.get('missing_url', 0):,}, {BAD_URL_SCHEME} "
            f"{split.get('bad_url_scheme', 0):,}; allowed schemes: download.url_schemes)")
    first = next((i["first_error"] for i in infos if i.get("first_error")), "none recorded")
    raise NothingDownloaded(f"0 of {attempted:,} downloads succeeded (first error: {first}); "
                            "check that the image server is reachable, then rerun the same "
                            "command to resume")


# -- img2dataset in a subprocess -----------------------------------------------------------
def img2dataset_args(part: str, out: str, cfg: DownloadConfig) -> dict:
    """Keyword arguments for img2dataset.download for one part."""
    args = {
        "url_list": part, "output_folder": out, "input_format": "parquet",
        "url_col": "url", "caption_col": "caption", "save_additional_columns": ["uid"],
        "output_format": "parquet", "encode_format": "jpg", "incremental_mode": "incremental",
        "processes_count": cfg.processes, "thread_count": cfg.threads,
        "number_sample_per_shard": cfg.subshard_rows, "timeout": cfg.timeout,
        "retries": cfg.retries, "resize_mode": cfg.resize_mode, "image_size": cfg.image_size,
        "resize_only_if_bigger": cfg.resize_only_if_bigger,
        "encode_quality": cfg.encode_quality, "min_image_size": cfg.min_image_size,
        "enable_wandb": False, "extract_exif": False, "compute_hash": None,
        "user_agent_token": cfg.user_agent_token,
    }
    if cfg.max_aspect_ratio is not None:
        args["max_aspect_ratio"] = cfg.max_aspect_ratio
    if cfg.disallowed_header_directives is not None:
        args["disallowed_header_directives"] = list(cfg.disallowed_header_directives)
    return args


PROGRESS = "@rows "   # a line of the download subprocess: rows finished so far in this run


def run_img2dataset(args: dict, log_path: str,
                    progress: Callable[[int], None] | None = None) -> None:
    """img2dataset.download(**args) in a fresh Python process that dies with this one;
    its output goes to log_path, and `progress(rows)` hears how many rows it finished."""
    import importlib.util
    if importlib.util.find_spec("img2dataset") is None:
        raise MissingDependencyError("img2dataset", "downloading images")
    env = lifeline.child_env({**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1",
                              "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
                              "PYTHONUNBUFFERED": "1"})
    storage.makedirs(os.path.dirname(log_path))
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.download", json.dumps(args)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            for line in proc.stdout:
                if line.startswith(PROGRESS.encode()):
                    if progress is not None:
                        try:
                            progress(int(line[len(PROGRESS):]))
                        except ValueError:
                            pass
                    continue
                logf.write(line)
            proc.wait()
        finally:
            if proc.poll() is None:     # we are being interrupted: take the child with us
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        with open(log_path, "rb") as f:
            tail = f.read()[-1500:].decode(errors="replace").strip().splitlines()[-1:]
        raise WarrenError(f"img2dataset failed (exit {proc.returncode}) on {args['url_list']}: "
                          f"{tail[0] if tail else 'no output'}; full log: {log_path}")


# -- one part ------------------------------------------------------------------------------
def download_part(part: str, work: str, images_out: str, rejects_out: str,
                  cfg: DownloadConfig, stage: str = "download",
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Download one part and fold img2dataset's shards into `images_out` (POOL schema,
    sorted by uid) and `rejects_out` (REJECTS, one row per failed uid, with a reason).

    `work` is this part's own folder (img2dataset output, log, completion marker);
    `progress(done, total)` hears the rows finished as img2dataset goes."""
    if storage.is_done(work, "part"):
        return storage.done_info(work, "part")
    # img2dataset writes its shards in place; the folder is hidden (like every temporary
    # here) because a killed run leaves a partial shard in it, redone on the next run
    raw = storage.join(work, ".img2dataset")
    _drop_unfinished_shards(raw)
    want = storage.read_table(part, schema=PART)
    total = want.num_rows
    report = None if progress is None else (lambda done: progress(min(done, total), total))
    run_img2dataset(img2dataset_args(part, raw, cfg), storage.join(work, "img2dataset.log"), report)
    got = _read_img2dataset(raw, part)
    ok = pc.equal(got.column("status"), "success")
    images = got.filter(ok)
    images = pa.table({"uid": images.column("uid"), "jpg": images.column("jpg"),
                       "width": images.column("width"), "height": images.column("height"),
                       "url": images.column("url"), "caption": images.column("caption")})
    images = images.take(pc.sort_indices(images, [("uid", "ascending")]))
    failed = got.filter(pc.invert(ok))
    f_uids = failed.column("uid").to_pylist()
    reasons = [reason(s, m) for s, m in zip(failed.column("status").to_pylist(),
                                            failed.column("error_message").to_pylist())]
    seen = set(got.column("uid").to_pylist())
    lost = [u for u in want.column("uid").to_pylist() if u not in seen]
    rej = _rejects(f_uids + lost, stage, reasons + [FAILED] * len(lost))
    rej = rej.take(pc.sort_indices(rej, [("uid", "ascending")]))
    if images.num_rows + rej.num_rows != want.num_rows:
        raise WarrenError(f"{part}: {want.num_rows} rows in, but {images.num_rows} images + "
                          f"{rej.num_rows} failures out (a uid appears twice); this is a bug")
    storage.write_table(images, images_out, POOL)
    storage.write_table(rej, rejects_out, schemas.REJECTS)
    messages: dict[str, int] = {}
    for m in failed.column("error_message").to_pylist():
        key = _short(m)
        messages[key] = messages.get(key, 0) + 1
    first = None
    if failed.num_rows:     # the failure of the smallest uid: the same on every rerun
        i = pc.index(failed.column("uid"), pc.min(failed.column("uid"))).as_py()
        first = f"{failed.column('url')[i].as_py()}: {_short(failed.column('error_message')[i].as_py())}"
    elif lost:
        first = f"img2dataset returned no row for uid {min(lost)}"
    info = {"part": os.path.basename(part), "rows": want.num_rows, "images": images.num_rows,
            "failed": dict(sorted(_count(reasons + [FAILED] * len(lost)).items())),
            "messages": messages, "first_error": first}
    storage.mark_done(work, "part", info)
    return info


def _drop_unfinished_shards(raw: str) -> None:
    """img2dataset writes a shard's Parquet in place and its `_stats.json` last: a shard
    without stats is from a killed run and is redone (incremental mode skips the rest)."""
    if not storage.exists(raw):
        return
    fs, p = storage.filesystem(raw)
    for f in storage.listdir(raw, "*.parquet"):
        stats = f[:-len(".parquet")] + "_stats.json"
        if not storage.exists(stats):
            fs.rm(storage.filesystem(f)[1])


def _read_img2dataset(raw: str, part: str) -> pa.Table:
    tables = []
    for f in storage.listdir(raw, "*.parquet"):
        if not storage.exists(f[:-len(".parquet")] + "_stats.json"):
            continue
        t = storage.read_table(f)
        cols = {"uid": t.column("uid").cast(pa.string()), "url": t.column("url"),
                "caption": t.column("caption") if "caption" in t.column_names
                else pa.nulls(t.num_rows, pa.string()),
                "status": t.column("status"), "error_message": t.column("error_message"),
                "width": t.column("width"), "height": t.column("height"),
                "jpg": t.column("jpg")}
        tables.append(pa.table(cols).cast(pa.schema([
            ("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
            ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
            ("height", pa.int32()), ("jpg", pa.binary())])))
    if not tables:
        raise WarrenError(f"img2dataset wrote no finished shard for {part}; see the log next "
                          "to its output")
    return pa.concat_tables(tables)


_HTTP = re.compile(r"HTTP Error (\d{3})")


def reason(status: str | None, message: str | None) -> str:
    """A short reject reason from img2dataset's status and error message."""
    m = (message or "").lower()
    if status == "failed_to_resize":
        if "decod" in m or "cannot identify" in m:
            return CORRUPT
        if "too small" in m or "too large" in m or "aspect ratio" in m:
            return FILTERED
        return CORRUPT
    if "timed out" in m or "timeout" in m:
        return TIMEOUT
    if "x-robots-tag" in m:
        return DISALLOWED
    if _HTTP.search(message or "") or "refused" in m or "name or service" in m \
            or "no address" in m or "nodename" in m or "unreachable" in m:
        return DEAD_LINK
    return FAILED


def _short(message: str | None) -> str:
    return (message or "none").split("\n")[0][:80]


def _count(xs: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def _rejects(uids: Sequence[str], stage: str, reasons: Sequence[str]) -> pa.Table:
    n = len(uids)
    return pa.table({"uid": pa.array(list(uids), pa.string()),
                     "stage": pa.array([stage] * n, pa.string()),
                     "reason": pa.array(list(reasons), pa.string()),
                     "kept_uid": pa.nulls(n, pa.string())}, schema=schemas.REJECTS)


# -- the coreset's images -------------------------------------------------------------------
def merge_images(parts: Sequence[str], part_rejects: Sequence[str], images_out: str,
                 missing_out: str) -> dict:
    """Stream the downloaded coreset parts into one IMAGES table (sorted by uid within
    each part, parts in order) and gather the failures into `missing_out`."""
    fs, p = storage.filesystem(images_out)
    rows = 0
    with storage.atomic_open(images_out) as f, pq.ParquetWriter(f, schemas.IMAGES,
                                                                 compression="zstd") as w:
        for part in parts:
            t = storage.read_table(part, columns=schemas.IMAGES.names, schema=schemas.IMAGES)
            if t.num_rows:
                w.write_table(t, row_group_size=1024)
            rows += t.num_rows
    missing = pa.concat_tables([storage.read_table(r, schema=schemas.REJECTS)
                                for r in part_rejects] or [schemas.REJECTS.empty_table()])
    storage.write_table(missing, missing_out, schemas.REJECTS)
    by_reason = _count(missing.column("reason").to_pylist())
    return {"images": rows, "missing": missing.num_rows, "missing_by_reason": by_reason}


def gather_from_pool(uids_table: str, pool: Sequence[str], images_out: str,
                     missing_out: str) -> dict:
    """The coreset's images taken from already-downloaded pool tables (no network)."""
    want = storage.read_table(uids_table, columns=["uid"]).column("uid")
    wanted = pa.array(sorted(set(want.to_pylist())), pa.string())
    rows, found = 0, set()
    with storage.atomic_open(images_out) as f, pq.ParquetWriter(f, schemas.IMAGES,
                                                                 compression="zstd") as w:
        for path in pool:
            t = storage.read_table(path, columns=schemas.IMAGES.names, schema=schemas.IMAGES)
            t = t.filter(pc.is_in(t.column("uid"), value_set=wanted))
            if t.num_rows:
                w.write_table(t, row_group_size=1024)
                found.update(t.column("uid").to_pylist())
            rows += t.num_rows
    lost = [u for u in wanted.to_pylist() if u not in found]
    storage.write_table(_rejects(lost, "coreset_images", ["not_in_pool"] * len(lost)),
                        missing_out, schemas.REJECTS)
    return {"images": rows, "missing": len(lost),
            "missing_by_reason": {"not_in_pool": len(lost)} if lost else {}}


def _download_inline(args: dict) -> None:
    """img2dataset's own Reader, Resizer, Downloader and Parquet writer, run in this
    process, one shard after another.

    `img2dataset.download` starts a logger process and a spawn pool even for one
    process; each re-imports img2dataset (~4 s here), which dominated small parts
    (33 s for 1,000 local images, against 7 s this way). Used when processes_count is
    1; the same shards, files and stats come out."""
    import fsspec
    from img2dataset.downloader import Downloader
    from img2dataset.reader import Reader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    out = os.path.abspath(args["output_folder"])
    fs, out_path = fsspec.core.url_to_fs(out)
    fs.makedirs(out_path, exist_ok=True)
    tmp = out + "/_tmp"
    fs.makedirs(tmp, exist_ok=True)
    done = {int(x.split("/")[-1].split("_")[0]) for x in fs.glob(out_path + "/*.json")}
    directives = args.get("disallowed_header_directives",
                          ["noai", "noimageai", "noindex", "noimageindex"])
    reader = Reader(os.path.abspath(args["url_list"]), args["input_format"], args["url_col"],
                    args["caption_col"], None, None, list(args["save_additional_columns"]),
                    args["number_sample_per_shard"], done, tmp, 0)
    resizer = Resizer(image_size=args["image_size"], resize_mode=args["resize_mode"],
                      resize_only_if_bigger=args["resize_only_if_bigger"],
                      encode_quality=args["encode_quality"], encode_format="jpg",
                      min_image_size=args["min_image_size"],
                      max_aspect_ratio=args.get("max_aspect_ratio", float("inf")))
    done_rows = [0]

    class CountingWriter(ParquetSampleWriter):
        """Reports every row written (image or failure) to the parent, at most ~4x a second."""
        last = [0.0]

        def write(self, *a, **kw):
            super().write(*a, **kw)
            done_rows[0] += 1
            now = time.monotonic()
            if now - self.last[0] >= 0.25:
                self.last[0] = now
                print(f"{PROGRESS}{done_rows[0]}", flush=True)

    downloader = Downloader(
        sample_writer_class=CountingWriter, resizer=resizer,
        thread_count=args["thread_count"], save_caption=True, extract_exif=False,
        output_folder=out, column_list=reader.column_list, timeout=args["timeout"],
        number_sample_per_shard=args["number_sample_per_shard"], oom_shard_count=5,
        compute_hash=None, verify_hash_type=None, encode_format="jpg",
        retries=args["retries"], user_agent_token=args["user_agent_token"],
        disallowed_header_directives=directives or None)
    for row in reader:
        before = done_rows[0]
        ok, _ = downloader(row)
        if not ok:
            done_rows[0] = before
            ok, _ = downloader(row)   # img2dataset's max_shard_retry=1
        print(f"{PROGRESS}{done_rows[0]}", flush=True)
        print(f"shard {row[0]}: {'done' if ok else 'failed'}", flush=True)
    fs.rm(tmp, recursive=True)


def _main(argv: list[str]) -> int:
    """Subprocess entry: download one part with the img2dataset arguments in argv[0]."""
    args = json.loads(argv[0])
    # a SIGKILLed parent takes this download with it, and img2dataset's own processes too
    if args["processes_count"] == 1:
        lifeline.from_env()
    else:
        lifeline.take_children_along()
        lifeline.from_env(signal.SIGTERM)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import img2dataset
    except ImportError:
        print("img2dataset is not installed: pip install img2dataset", file=sys.stderr)
        return 3
    if args["processes_count"] == 1:
        _download_inline(args)
    else:
        img2dataset.download(**args)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
