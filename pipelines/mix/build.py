"""Build an instruction mix from a recipe: two stages, memory bounded.

    prepare (per source)  stream the file in one pass; parse, normalise, validate,
                          filter, tag by task (a source's `task`); the image files'
                          header checks run in threads LOOKAHEAD records ahead of the
                          writer; write the valid candidates and the rejects (file
                          order) to `_work/` in row groups
    assemble (once)       exact duplicates across the whole mix, then the seeded
                          count/fraction per source; stream the candidates into
                          mix.parquet and every drop into rejects.parquet; stats.json,
                          manifest.json

Every record keeps its own `id` (ids repeat in the real files: LLaVA-665K uses a COCO
image id as the record id in each of its VQA parts) and gets a unique `uid`,
"<source name>:<row>". Duplicates are found by content, never by id.

Memory: prepare holds one row group of records plus the lookahead; assemble holds a few
small columns of the candidates (id, uid, 16-byte digest, 8-byte sampling key), never
the conversations.
Every input element ends up in exactly one of mix.parquet and rejects.parquet: per
source, input = kept + rejected (checked before anything is written); every reject row
names its file, row and uid, and carries the record's raw text.

Runs are keyed by their input. Each prepared source records what it was made from: its
settings, its file (size, mtime: `pipelines.runkey`), and — when any of its records
reached the image checks — the image root's fingerprint (every file's name, size and
mtime). A rerun into the same folder resumes only when all of these are unchanged;
otherwise `run` refuses in one line naming the change (e.g. "source llava: images:
removed coco/x.jpg") and `restart_run` (`--restart`) starts over. Sources without
images do not depend on the image root. Assemble always runs, so mix.parquet always
follows the current inputs. All files are written atomically. (`prepare` itself still
re-prepares a stale source it is handed, so the Prefect flow's tasks are safe alone.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import json
import logging
import os
import re
import threading
import time
from collections import Counter, deque
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import manifest, runkey, schemas, storage
from pipelines.errors import InputError, OutputError, WarrenError
from pipelines.mix import images as image_files
from pipelines.mix import readers, tasks, validate
from pipelines.mix.readers import Bad, Record
from pipelines.mix.recipe import Recipe, Rule, Source

log = logging.getLogger(__name__)

WORK = "_work"
BATCH = 16_384                     # records per row group while streaming
LOOKAHEAD = 2_048                  # records judged ahead of the writer while their images are checked
HIST_EDGES = [0, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
VERSION = 3                        # of the prepared files: a change redoes every source

# Internal work table: MIX plus what assemble needs without re-reading the text.
CANDIDATES = pa.schema(list(schemas.MIX) + [
    pa.field("row", pa.int64(), nullable=False),       # element index in the source file
    pa.field("digest", pa.binary(), nullable=False),   # validate.digest (16 bytes)
    pa.field("key", pa.uint64(), nullable=False),      # validate.sample_key
    pa.field("chars", pa.int64(), nullable=False),
    pa.field("task", pa.string()),                     # identifier in the text; null: untagged
    pa.field("norm", pa.uint8(), nullable=False),      # readers.NORM_NAMES bits
    pa.field("offset", pa.int64()),                    # the raw text in the file, for the
    pa.field("nbytes", pa.int64()),                    # rejects table (bytes)
])
_KEPT = schemas.MIX.names + ["chars", "task", "norm"]


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0]


def uid(source: Source, row: int) -> str:
    """The unique id of a source's element: "<source name>:<row>"."""
    return f"{source.name}:{row}"


# ------------------------------------------------------------------------ helpers

class _Writer:
    """Rows (tuples in schema order) appended one at a time, written in row groups of
    BATCH into an open file."""

    def __init__(self, f, schema: pa.Schema):
        self.schema = schema
        self.writer = pq.ParquetWriter(f, schema, compression="zstd")
        self.buf: list[tuple] = []
        self.rows = 0

    def add(self, *row) -> None:
        self.buf.append(row)
        if len(self.buf) >= BATCH:
            self.flush()

    def write_table(self, table: pa.Table) -> None:
        self.flush()
        if table.num_rows:
            self.writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.rows += table.num_rows

    def flush(self) -> None:
        if self.buf:
            cols = zip(*self.buf)           # one transpose per row group, not an append per cell
            self.writer.write_table(pa.Table.from_arrays(
                [pa.array(c, type=f.type) for c, f in zip(cols, self.schema)], schema=self.schema))
            self.rows += len(self.buf)
            self.buf = []

    def close(self) -> None:
        self.flush()
        self.writer.close()

    def abort(self) -> None:
        """Close without flushing, while the file is still open: otherwise the writer's
        finaliser writes its footer into a closed file at exit (two tracebacks after
        the user's one-line error)."""
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 — the file is being discarded anyway
            pass


class _Matcher:
    def __init__(self, rule: Rule):
        self.rule = rule
        self.id = re.compile(rule.id) if rule.id is not None else None
        self.image = re.compile(rule.image) if rule.image is not None else None

    def __call__(self, rec: Record) -> bool:
        r = self.rule
        if r.has_image is not None and (rec.image is not None) != r.has_image:
            return False
        if self.id is not None and not self.id.fullmatch(rec.id):
            return False
        if self.image is not None and (rec.image is None or not self.image.search(rec.image)):
            return False
        return all(rec.raw.get(k) == v for k, v in r.fields.items())


def work_paths(output: str, source: Source) -> tuple[str, str]:
    base = storage.join(output, WORK, source.name)
    return base + ".candidates.parquet", base + ".rejects.parquet"


def inputs_of(recipe: Recipe) -> list[str]:
    """Every path the mix reads: the source files and the image root."""
    return [s.path for s in recipe.sources] + ([recipe.image_root] if recipe.image_root else [])


def check_paths(recipe: Recipe, output: str, export_path: str | None = None) -> None:
    """Refuse an output folder (or LLaVA export file) that is, holds or lies inside an
    input: writing there would change or destroy what the mix reads."""
    runkey.check_apart(output, inputs_of(recipe))
    if export_path:
        runkey.check_apart(export_path, inputs_of(recipe), what="--export-llava")


def settings(recipe: Recipe, source: Source) -> dict:
    """What a prepared source depends on besides its file and the images."""
    doc = {"source": dataclasses.asdict(source), "limits": dataclasses.asdict(recipe.limits),
           "image_root": recipe.image_root, "check_images": recipe.check_images,
           "seed": recipe.seed, "version": VERSION, "task_rules": tasks.RULES_VERSION}
    return json.loads(json.dumps(doc, default=str))       # as the marker stores it (lists, not tuples)


def file_fingerprint(path: str) -> dict:
    """runkey's fingerprint of one source file (size, mtime); for a remote file the
    same from its listing entry."""
    path = str(path)
    if "://" not in path or path.startswith("file://"):
        fp = runkey.fingerprint([path])
        if not fp[path]["files"]:
            raise InputError("source file not found", path=path)
        return fp
    fs, p = storage.filesystem(path)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        raise InputError("source file not found", path=path) from None
    stamp = str(info.get("mtime", info.get("LastModified", info.get("ETag", info.get("created")))))
    return {path: {"files": 1, "bytes": info.get("size"), "digest": stamp,
                   "listing": [[os.path.basename(p), info.get("size"), stamp]]}}


class Images:
    """The image root of a run, listed and fingerprinted at most once, on first use
    (a run whose sources are all reused and text-only never walks it)."""

    def __init__(self, recipe: Recipe):
        self.root = recipe.image_root if recipe.check_images else None
        self._index: image_files.ImageIndex | None = None
        self._fp: dict | None = None
        self._lock = threading.Lock()       # the prepare tasks of a flow share one Images

    def _require_root(self) -> None:
        if not storage.exists(self.root):
            raise InputError("image root not found (set image_root in the recipe or pass --image-root)",
                             path=self.root)

    @property
    def index(self) -> image_files.ImageIndex:
        with self._lock:
            if self._index is None:
                self._require_root()
                t = time.perf_counter()
                self._index = image_files.ImageIndex(self.root)
                log.info("image root %s: %d files listed in %.1f s", self.root, len(self._index),
                         time.perf_counter() - t)
            return self._index

    @property
    def fingerprint(self) -> dict:
        with self._lock:
            if self._fp is None:
                self._require_root()
                self._fp = {self.root: image_files.fingerprint(self.root)}
            return self._fp

    def stats(self) -> dict | None:
        """Listed, checked and unreadable files (None when the root was never listed)."""
        return self._index.stats() if self._index is not None else None

    def close(self) -> None:
        if self._index is not None:
            self._index.close()


def _stale(info: dict, recipe: Recipe, source: Source, images: Images) -> str | None:
    """Why a prepared source's recorded inputs differ from the current ones, or None."""
    if info.get("version") != VERSION or "settings" not in info:
        return "it was prepared by another version of Warren"
    was, now = info["settings"], settings(recipe, source)
    if was != now:
        keys = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        return f"its settings changed ({', '.join(keys)})"
    change = runkey.describe_change(info["file"], file_fingerprint(source.path))
    if change:
        return change
    if info.get("uses_images") and images.root is not None:
        change = runkey.describe_change(info["images"], images.fingerprint)
        if change:
            return f"images: {change}"
    return None


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, unit=" rec", unit_scale=True, mininterval=1.0, leave=False)


@contextlib.contextmanager
def _no_cyclic_gc():
    """Parsed records hold no reference cycles, so reference counting frees them; but
    with thousands alive at once (the records staged for one bulk image check, the row
    group being written) every pass of the cyclic collector walks them all: about a
    fifth of the run's time, for nothing."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ------------------------------------------------------------------------ prepare

def prepare(recipe: Recipe, source: Source, output: str, images: Images | None = None,
            progress: bool = False) -> dict:
    """Stage 1 for one source: stream, validate, filter. Writes the candidates and
    rejects under `<output>/_work/` and returns counts (input, candidates, by reason).
    Skipped (returning the recorded counts) when the source's inputs are unchanged
    since it was last prepared into `output` (see the module docstring)."""
    images = images if images is not None else Images(recipe)
    marker = f"prepare-{source.name}"
    if storage.is_done(output, marker):
        info = storage.done_info(output, marker)
        why = _stale(info, recipe, source, images)
        if why is None:
            return info["stats"]
        log.info("%s: %s since it was prepared; preparing it again", source.name, why)
    file_fp = file_fingerprint(source.path)
    cand_path, rej_path = work_paths(output, source)
    includes = [_Matcher(r) for r in source.include]
    excludes = [_Matcher(r) for r in source.exclude]
    check_images = images.root is not None
    reasons: Counter = Counter()
    n_input = 0
    uses_images = False
    t0 = time.perf_counter()
    file = str(source.path)

    index = images.index if check_images else None
    # Every record is judged in one pass, as it is read, except for its image file: that
    # verdict is computed by the checking threads, a LOOKAHEAD of records ahead of the
    # writer, and applied when the record leaves this queue (file order).
    pending: deque = deque()      # (row, id, raw text, image to check, reason, candidate row)

    def emit(row, rid, text, ref, reason, cand_row) -> None:
        if ref is not None:
            why = validate.image_problem(ref, index)     # waits only if not checked yet
            if why is not None:
                reason = f"{why[0]}: {why[1]}"           # the image comes before the task checks
        if reason is None:
            cand.add(*cand_row)
            return
        reasons[reason_code(reason)] += 1
        rej.add(readers.safe_text(rid, None), source.name, readers.safe_text(reason, None),
                readers.safe_text(text), uid(source, row), file, row)                  # MIX_REJECTS

    with storage.atomic_open(cand_path) as fc, storage.atomic_open(rej_path) as fr, _no_cyclic_gc():
        cand = _Writer(fc, CANDIDATES)
        rej = _Writer(fr, schemas.MIX_REJECTS)
        try:
            for item in _progress(readers.read(source.path, source.format, source.name), progress, source.name):
                n_input += 1
                if len(pending) >= LOOKAHEAD:
                    emit(*pending.popleft())
                if isinstance(item, Bad):
                    rid = None if item.id is None else source.id_prefix + item.id
                    pending.append((item.row, rid, item.text, None, item.message, None))
                    continue
                rec: Record = item
                rid = source.id_prefix + rec.id
                why = validate.check(rec, recipe.limits)
                if why is not None:
                    pending.append((rec.row, rid, rec.text, None, f"{why[0]}: {why[1]}", None))
                    continue
                if includes and not any(m(rec) for m in includes):
                    pending.append((rec.row, rid, rec.text, None, "excluded: matches no include rule", None))
                    continue
                hit = next((m for m in excludes if m(rec)), None)
                if hit is not None:
                    pending.append((rec.row, rid, rec.text, None, f"excluded: {hit.rule.label}", None))
                    continue
                ref = rec.image if check_images else None
                if ref is not None:
                    uses_images = True
                    index.prefetch(ref)                 # its header check starts in a thread
                conv, task = rec.conversations, None
                if source.task is not None:
                    # Tag here, before duplicates and sampling, so a record that cannot be
                    # tagged is a reject like any invalid one and `count` stays exact.
                    try:
                        conv = tasks.tag(rec.conversations, rec.image is not None, source.name, source.task)
                    except InputError as e:
                        pending.append((rec.row, rid, rec.text, ref, f"bad_task: {e}", None))
                        continue
                    task = tasks.task_in(conv[0]["value"])      # validated: turn 0 is human
                chars = validate.text_chars(conv, rec.system)
                if chars > recipe.limits.max_chars:             # only the identifier can do this
                    pending.append((rec.row, rid, rec.text, ref, f"too_long: {chars} characters with the "
                                    f"task identifier (limit {recipe.limits.max_chars})", None))
                    continue
                # The duplicate key is taken on the text as read, not as tagged: it finds the
                # same sample in two release files (SVIT-mix and LLaVA-665K share their VQA
                # part) even when one source tags it and the other does not; and apart from
                # bad_task rejects, which records survive does not depend on the `task`
                # settings (they change the text, not the selection).
                d = validate.digest(rec.image, rec.conversations, rec.system)
                pending.append((rec.row, rid, rec.text, ref, None, (
                    rid, source.name, rec.image, conv, len(conv), rec.image is not None,   # MIX
                    f"{source.name}:{rec.row}", rec.system,
                    rec.row, d, validate.sample_key(recipe.seed, source.name, rid, d),      # + work
                    chars, task, rec.norm, *(rec.span or (None, None)))))
            while pending:
                emit(*pending.popleft())
        except BaseException:
            cand.abort()
            rej.abort()
            raise
        cand.close()
        rej.close()

    stats = {"input": n_input, "candidates": cand.rows, "rejected": rej.rows,
             "reasons": dict(sorted(reasons.items())), "seconds": round(time.perf_counter() - t0, 3)}
    if n_input != cand.rows + rej.rows:   # pragma: no cover — an accounting bug, not bad input
        raise WarrenError(f"{source.name}: {n_input} records read but {cand.rows} candidates + "
                          f"{rej.rows} rejects written")
    uses_images = uses_images and check_images
    storage.mark_done(output, marker, {
        "version": VERSION, "settings": settings(recipe, source), "file": file_fp,
        "uses_images": uses_images, "images": images.fingerprint if uses_images else None,
        "stats": stats})
    return stats


# ------------------------------------------------------------------------ assemble

def _decide(recipe: Recipe, output: str) -> list[tuple[np.ndarray, pl.DataFrame]]:
    """For each source: a keep mask over its candidate rows, and the dropped rows with
    their reasons (duplicate, sampled_out). Reads four small columns."""
    frames = []
    for i, s in enumerate(recipe.sources):
        cand_path, _ = work_paths(output, s)
        t = storage.read_table(cand_path, columns=["id", "uid", "digest", "key"])
        frames.append(pl.from_arrow(t).with_columns(
            pl.lit(i, pl.Int32).alias("src"), pl.int_range(pl.len(), dtype=pl.Int64).alias("crow")))
    df = pl.concat(frames, how="vertical") if frames else pl.DataFrame()
    # Exact duplicates by content: the first occurrence (recipe order, file order) wins;
    # only the (few) repeats look up what they repeat.
    first = pl.col("digest").is_first_distinct() if recipe.dedup == "exact" else pl.lit(True)
    df = df.with_columns(first.alias("first"))
    repeats = df.filter(~pl.col("first")).join(
        df.filter(pl.col("first")).select("digest", pl.col("uid").alias("kept_uid"), pl.col("id").alias("kept_id")),
        on="digest", how="left")
    out = []
    for i, s in enumerate(recipe.sources):
        mine = df.filter(pl.col("src") == i)
        keep = np.zeros(mine.height, dtype=bool)
        drops = [repeats.filter(pl.col("src") == i).select(
            "crow", pl.format("duplicate: same image and conversations as {} (id {})", "kept_uid", "kept_id")
            .alias("reason"))]
        survivors = mine.filter(pl.col("first"))
        m = survivors.height
        k = m
        if s.count is not None:
            if s.count > m:
                raise InputError(f"recipe asks for count {s.count} but the source has only {m} valid, "
                                 "unique records; lower count or use fraction", path=s.path, field="count")
            k = s.count
        elif s.fraction is not None:
            k = int(round(s.fraction * m))
        if k < m:
            # the k smallest seeded keys; the source row breaks (astronomically rare) ties
            order = survivors.sort(["key", "crow"])
            drops.append(order.slice(k).select(
                "crow", pl.lit(f"sampled_out: not among the {k} of {m} drawn with seed {recipe.seed}")
                .alias("reason")))
            survivors = order.head(k)
        keep[survivors["crow"].to_numpy()] = True
        dropped = pl.concat(drops).sort("crow")
        out.append((keep, dropped))
    return out


def _hist(chars: np.ndarray) -> dict:
    edges = HIST_EDGES + [np.iinfo(np.int64).max]
    counts, _ = np.histogram(chars, bins=np.array(edges, dtype=np.float64))
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(HIST_EDGES[:-1], HIST_EDGES[1:])] + [f">={HIST_EDGES[-1]}"]
    return {"unit": "characters per record (all turns)", "bins": dict(zip(labels, counts.tolist()))}


def _iter_batches(path: str, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH, columns=columns)


def _dropped_rows(cand_path: str, dropped: pl.DataFrame, source: Source) -> Iterator[pa.Table]:
    """The candidates dropped by assemble as rejects rows, with their raw text read back
    from the source file (the candidates keep only where it is: offset, bytes)."""
    if not dropped.height:
        return
    crow = dropped["crow"].to_numpy()
    reasons = dropped["reason"].to_list()
    start = j = 0
    for batch in _iter_batches(cand_path, ["id", "uid", "row", "offset", "nbytes"]):
        end = start + batch.num_rows
        k = int(np.searchsorted(crow, end))
        if k > j:
            t = pa.Table.from_batches([batch]).take(pa.array(crow[j:k] - start))
            spans = list(zip(t.column("offset").to_pylist(), t.column("nbytes").to_pylist()))
            yield pa.table({"id": t.column("id"), "source": pa.array([source.name] * t.num_rows, pa.string()),
                            "reason": pa.array(reasons[j:k], pa.string()),
                            "record": pa.array(readers.raw_texts(source.path, spans), pa.string()),
                            "uid": t.column("uid"), "file": pa.array([str(source.path)] * t.num_rows, pa.string()),
                            "row": t.column("row")})
            j = k
        start = end
        if j == len(crow):
            return


def assemble(recipe: Recipe, output: str, prepared: dict[str, dict], progress: bool = False,
             inputs: dict | None = None, image_stats: dict | None = None) -> dict:
    """Stage 2: decide duplicates and samples over all sources, then stream mix.parquet,
    rejects.parquet, stats.json and manifest.json into `output`."""
    t0 = time.perf_counter()
    decisions = _decide(recipe, output)
    mix_path = storage.join(output, "mix.parquet")
    rej_path = storage.join(output, "rejects.parquet")
    per_source = {}
    reasons_total: Counter = Counter()
    tasks_total: Counter = Counter()
    norm_total: Counter = Counter()
    kept_chars = []
    text_only = kept_total = 0
    turns_hist: dict[int, int] = {}
    with storage.atomic_open(mix_path) as fm, storage.atomic_open(rej_path) as fr:
        mix = _Writer(fm, schemas.MIX)
        rej = _Writer(fr, schemas.MIX_REJECTS)
        try:
            for s, (keep, dropped) in zip(recipe.sources, decisions):
                cand_path, prep_rej_path = work_paths(output, s)
                info = prepared[s.name]
                for batch in _iter_batches(prep_rej_path):
                    rej.write_table(pa.Table.from_batches([batch]))
                for t in _dropped_rows(cand_path, dropped, s):
                    rej.write_table(t)
                start = 0
                kept = 0
                by_task: Counter = Counter()
                by_norm: Counter = Counter()
                pend, pend_rows = [], 0
                for batch in _progress(_iter_batches(cand_path, _KEPT), progress, f"write {s.name}"):
                    mask = keep[start:start + batch.num_rows]
                    start += batch.num_rows
                    if not mask.any():
                        continue
                    t = pa.Table.from_batches([batch]).filter(pa.array(mask))
                    kept += t.num_rows
                    kept_chars.append(t.column("chars").to_numpy())
                    if s.task is not None:
                        by_task.update(x or "none" for x in t.column("task").to_pylist())
                    norm = t.column("norm").to_numpy()
                    for bit, name in readers.NORM_NAMES.items():
                        by_norm[name] += int(np.count_nonzero(norm & bit))
                    text_only += t.num_rows - int(np.count_nonzero(t.column("has_image").to_numpy(zero_copy_only=False)))
                    for v, c in zip(*np.unique(t.column("n_turns").to_numpy(), return_counts=True)):
                        turns_hist[int(v)] = turns_hist.get(int(v), 0) + int(c)
                    pend.append(t.select(schemas.MIX.names))
                    pend_rows += t.num_rows
                    if pend_rows >= BATCH:
                        mix.write_table(pa.concat_tables(pend))
                        pend, pend_rows = [], 0
                if pend:
                    mix.write_table(pa.concat_tables(pend))
                by_reason = Counter(info["reasons"])
                by_reason.update(reason_code(r) for r in dropped["reason"].to_list())
                rejected = info["rejected"] + dropped.height
                if info["input"] != kept + rejected:
                    raise WarrenError(f"{s.name}: accounting broken: input {info['input']} != kept {kept} "
                                      f"+ rejected {rejected}")
                per_source[s.name] = {"input": info["input"], "kept": kept, "rejected": rejected,
                                      "reasons": dict(sorted(by_reason.items())),
                                      "normalised": {n: by_norm[n] for n in readers.NORM_NAMES.values()}}
                if s.task is not None:
                    # kept records per identifier in their text ("none": text-only, untagged)
                    per_source[s.name]["tasks"] = dict(sorted(by_task.items()))
                    tasks_total.update(by_task)
                reasons_total.update(by_reason)
                norm_total.update(by_norm)
                kept_total += kept
        except BaseException:
            mix.abort()
            rej.abort()
            raise
        mix.close()
        rej.close()
    chars = np.concatenate(kept_chars) if kept_chars else np.zeros(0, np.int64)
    stats = {
        "recipe": recipe.name, "seed": recipe.seed, "dedup": recipe.dedup,
        "input": sum(v["input"] for v in per_source.values()), "kept": kept_total,
        "rejected": sum(v["rejected"] for v in per_source.values()),
        "sources": per_source, "reasons": dict(sorted(reasons_total.items())),
        # kept records that normalisation changed (see pipelines.mix.readers)
        "normalised": {n: norm_total[n] for n in readers.NORM_NAMES.values()},
        "tasks": dict(sorted(tasks_total.items())),          # over the sources that set `task`
        "text_only": text_only, "text_only_share": round(text_only / kept_total, 6) if kept_total else 0.0,
        "images_checked": recipe.check_images and recipe.image_root is not None,
        "length_histogram": _hist(chars),
        "chars": {"mean": float(chars.mean()) if chars.size else 0.0,
                  "p50": int(np.percentile(chars, 50)) if chars.size else 0,
                  "p99": int(np.percentile(chars, 99)) if chars.size else 0,
                  "max": int(chars.max()) if chars.size else 0},
        "turns_histogram": {str(k): v for k, v in sorted(turns_hist.items())},
        "seconds": {"prepare": round(sum(v.get("seconds", 0.0) for v in prepared.values()), 3),
                    "assemble": round(time.perf_counter() - t0, 3)},
    }
    if image_stats is not None:
        stats["images"] = image_stats
    if inputs is not None:
        stats["inputs"] = inputs
    storage.write_json(storage.join(output, "stats.json"), stats)
    images = None
    if recipe.image_root is not None:
        root = recipe.image_root if "://" in recipe.image_root else os.path.abspath(recipe.image_root)
        images = {"mix": {"kind": "files", "path": root}}
    manifest.write(storage.join(output, "manifest.json"), {"mix": mix_path},
                   config={"mix": recipe.to_dict()}, images=images,
                   extra={"inputs": inputs} if inputs is not None else None)
    return stats


# ------------------------------------------------------------------------ run

def inputs_summary(recipe: Recipe, images: Images | None = None) -> dict:
    """The fingerprint of every input (source files, image root), without listings:
    recorded in stats.json and manifest.json."""
    out = {}
    for s in recipe.sources:
        out.update(file_fingerprint(s.path))
    if images is not None and images.root is not None and storage.exists(images.root):
        out.update(images.fingerprint)
    return {k: {f: v.get(f) for f in ("files", "bytes", "digest")} for k, v in out.items()}


def restart(output: str) -> None:
    """Forget what an earlier run prepared in `output`: the `_work/` folder and the
    prepare markers (nothing Warren did not write)."""
    paths = [storage.join(output, WORK)]
    if storage.exists(storage.join(output, storage.COMPLETIONS)):
        paths += storage.listdir(storage.join(output, storage.COMPLETIONS), "prepare-*.json")
    for path in paths:
        fs, p = storage.filesystem(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


@contextlib.contextmanager
def writing_to(output: str):
    """Failures to write the output (a file where the folder should be, a full or
    read-only disk) as one OutputError line instead of a traceback."""
    try:
        yield
    except (FileExistsError, NotADirectoryError) as e:
        raise OutputError(str(e.filename or output), "a file is in the way of the output folder") from None
    except OSError as e:
        inside = e.filename is not None and os.path.abspath(str(e.filename)).startswith(
            os.path.abspath(str(output)))
        if e.errno in _WRITE_ERRNOS or (inside and e.errno == errno.EACCES):
            raise OutputError(str(e.filename or output), e.strerror or str(e)) from None
        raise


def check_unchanged(recipe: Recipe, output: str) -> None:
    """Refuse, in one line naming what changed, to resume a run in `output` whose
    prepared sources were made from other inputs (source files, settings, the image root's
    listing). `--restart` starts over."""
    if not storage.exists(storage.join(output, storage.COMPLETIONS)):
        return
    images = Images(recipe)
    try:
        for s in recipe.sources:
            marker = f"prepare-{s.name}"
            if not storage.is_done(output, marker):
                continue
            why = _stale(storage.done_info(output, marker), recipe, s, images)
            if why is not None:
                raise runkey.StaleRunError(
                    f"{output} holds a mix prepared from other inputs (source {s.name}: {why}); "
                    "pass --restart to start over, or choose another output folder")
    finally:
        images.close()


def run(recipe: Recipe, output: str, progress: bool = False, restart_run: bool = False) -> dict:
    """Build the mix described by `recipe` into the folder `output`; returns the stats
    (also in `<output>/stats.json`). A rerun resumes (finished sources are reused) only
    when every input is unchanged, else it raises StaleRunError naming the change;
    `restart_run` starts over."""
    check_paths(recipe, output)
    if not restart_run:
        check_unchanged(recipe, output)
    with writing_to(output):
        return _run(recipe, output, progress, restart_run)


def _run(recipe: Recipe, output: str, progress: bool, restart_run: bool) -> dict:
    storage.makedirs(output)
    if restart_run:
        restart(output)
    t0 = time.perf_counter()
    images = Images(recipe)
    try:
        prepared = {s.name: prepare(recipe, s, output, images=images, progress=progress) for s in recipe.sources}
    finally:
        images.close()
    inputs = inputs_summary(recipe, images)
    image_stats = images.stats()
    stats = assemble(recipe, output, prepared, progress=progress, inputs=inputs, image_stats=image_stats)
    stats["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    stats["records_per_s"] = round(stats["input"] / max(stats["seconds"]["total"], 1e-9), 1)
    storage.write_json(storage.join(output, "stats.json"), stats)
    return stats
