"""Build an instruction mix from a recipe: two stages, memory bounded.

    prepare (per source)  stream the file; parse, validate, filter, tag by task (a
                          source's `task`); write the valid candidates and the rejects
                          to `_work/` in row groups
    assemble (once)       ids unique and exact duplicates across the whole mix, then the
                          seeded count/fraction per source; stream the candidates into
                          mix.parquet and every drop into rejects.parquet; stats.json,
                          manifest.json

Memory: prepare holds one row group of records; assemble holds four small columns of the
candidates (id, 8-byte digest, 8-byte sampling key, source row), never the
conversations. Every input element ends up in exactly one of mix.parquet and
rejects.parquet: per source, input = kept + rejected (checked before anything is
written).

Each prepare records a completion marker keyed by a fingerprint of the source (its
`task` included), its file (size, mtime), the validation settings and the version of the
tagging rules, so a rerun into the same folder skips the sources that did not change and
redoes those that did. Tagging is a pure function of the record and the source's
settings, so a rerun tags exactly as the first run did. All files are written atomically.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import manifest, schemas, storage
from pipelines.mix import tasks
from pipelines.errors import InputError, WarrenError
from pipelines.mix import readers, validate
from pipelines.mix.readers import Bad, Record
from pipelines.mix.recipe import Recipe, Rule, Source

log = logging.getLogger(__name__)

WORK = "_work"
BATCH = 16_384                     # records per row group while streaming
HIST_EDGES = [0, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]

# Internal work table: MIX plus what assemble needs without re-reading the text.
CANDIDATES = pa.schema(list(schemas.MIX) + [
    pa.field("row", pa.int64(), nullable=False),       # element index in the source file
    pa.field("digest", pa.uint64(), nullable=False),   # validate.digest
    pa.field("key", pa.uint64(), nullable=False),      # validate.sample_key
    pa.field("chars", pa.int64(), nullable=False),
    pa.field("task", pa.string()),                     # identifier in the text; null: untagged
])


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0]


# ------------------------------------------------------------------------ helpers

class _Writer:
    """Rows appended one at a time, written in row groups of BATCH into an open file."""

    def __init__(self, f, schema: pa.Schema):
        self.schema = schema
        self.writer = pq.ParquetWriter(f, schema, compression="zstd")
        self.cols: dict[str, list] = {n: [] for n in schema.names}
        self.rows = 0

    def add(self, **row) -> None:
        for n, col in self.cols.items():
            col.append(row[n])
        if len(self.cols[self.schema.names[0]]) >= BATCH:
            self.flush()

    def write_table(self, table: pa.Table) -> None:
        self.flush()
        if table.num_rows:
            self.writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.rows += table.num_rows

    def flush(self) -> None:
        n = len(self.cols[self.schema.names[0]])
        if n:
            self.writer.write_table(pa.Table.from_pydict(self.cols, schema=self.schema))
            self.rows += n
            self.cols = {k: [] for k in self.schema.names}

    def close(self) -> None:
        self.flush()
        self.writer.close()


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


def fingerprint(recipe: Recipe, source: Source) -> str:
    """What a prepared source depends on: its settings, its file, the validation rules."""
    fs, p = storage.filesystem(source.path)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        raise InputError("source file not found", path=source.path) from None
    doc = {"source": dataclasses.asdict(source), "size": info.get("size"),
           "mtime": str(info.get("mtime", info.get("LastModified", info.get("created")))),
           "limits": dataclasses.asdict(recipe.limits), "image_root": recipe.image_root,
           "check_images": recipe.check_images, "seed": recipe.seed, "version": 2,
           "task_rules": tasks.RULES_VERSION}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def image_index(recipe: Recipe) -> validate.ImageIndex | None:
    """The image root listed once, or None when images are not checked."""
    if not recipe.check_images or recipe.image_root is None:
        return None
    if not storage.exists(recipe.image_root):
        raise InputError("image root not found (set image_root in the recipe or pass --image-root)",
                         path=recipe.image_root)
    t = time.perf_counter()
    idx = validate.ImageIndex(recipe.image_root)
    log.info("image root %s: %d files listed in %.1f s", recipe.image_root, len(idx),
             time.perf_counter() - t)
    return idx


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, unit=" rec", unit_scale=True, mininterval=1.0, leave=False)


# ------------------------------------------------------------------------ prepare

def prepare(recipe: Recipe, source: Source, output: str, images: validate.ImageIndex | None = None,
            progress: bool = False) -> dict:
    """Stage 1 for one source: stream, validate, filter. Writes the candidates and
    rejects under `<output>/_work/` and returns counts (input, candidates, by reason).
    Skipped (returning the recorded counts) when its marker matches the fingerprint."""
    fp = fingerprint(recipe, source)
    marker = f"prepare-{source.name}"
    if storage.is_done(output, marker):
        info = storage.done_info(output, marker)
        if info.get("fingerprint") == fp:
            return info["stats"]
    cand_path, rej_path = work_paths(output, source)
    includes = [_Matcher(r) for r in source.include]
    excludes = [_Matcher(r) for r in source.exclude]
    check_images = recipe.check_images and recipe.image_root is not None
    if check_images and images is None:
        images = image_index(recipe)
    reasons: dict[str, int] = {}
    n_input = 0
    t0 = time.perf_counter()

    with storage.atomic_open(cand_path) as fc, storage.atomic_open(rej_path) as fr:
        cand = _Writer(fc, CANDIDATES)
        rej = _Writer(fr, schemas.MIX_REJECTS)

        def reject(rid, reason, text):
            reasons[reason_code(reason)] = reasons.get(reason_code(reason), 0) + 1
            rej.add(id=rid, source=source.name, reason=reason, record=text)

        for item in _progress(readers.read(source.path, source.format, source.name), progress,
                              source.name):
            n_input += 1
            if isinstance(item, Bad):
                rid = None if item.id is None else source.id_prefix + item.id
                reject(rid, item.message, item.text)
                continue
            rec: Record = item
            rid = source.id_prefix + rec.id
            why = validate.check(rec, recipe.limits, images if check_images else None)
            if why is not None:
                reject(rid, f"{why[0]}: {why[1]}", readers.raw_text(rec.raw))
                continue
            if includes and not any(m(rec) for m in includes):
                reject(rid, "excluded: matches no include rule", None)
                continue
            hit = next((m for m in excludes if m(rec)), None)
            if hit is not None:
                reject(rid, f"excluded: {hit.rule.label}", None)
                continue
            conv, task = rec.conversations, None
            if source.task is not None:
                # Tag here, before duplicates and sampling, so a record that cannot be
                # tagged is a reject like any invalid one and `count` stays exact.
                try:
                    conv = tasks.tag(rec.conversations, rec.image is not None, source.name, source.task)
                except InputError as e:
                    reject(rid, f"bad_task: {e}", readers.raw_text(rec.raw))
                    continue
                task = tasks.task_in(conv[0]["value"])      # validated: turn 0 is human
            chars = validate.text_chars(conv)
            if chars > recipe.limits.max_chars:              # only the identifier can do this
                reject(rid, f"too_long: {chars} characters with the task identifier "
                            f"(limit {recipe.limits.max_chars})", readers.raw_text(rec.raw))
                continue
            # The duplicate key is taken on the text as read, not as tagged: it finds the
            # same sample in two release files (SVIT-mix and LLaVA-665K share their VQA
            # part) even when one source tags it and the other does not, or tags it
            # differently; and apart from bad_task rejects, which records survive does not
            # depend on the `task` settings (they change the text, not the selection).
            cand.add(id=rid, source=source.name, image=rec.image, conversations=conv,
                     n_turns=len(conv), has_image=rec.image is not None, row=rec.row,
                     digest=validate.digest(rec.image, rec.conversations),
                     key=validate.sample_key(recipe.seed, source.name, rid),
                     chars=chars, task=task)
        cand.close()
        rej.close()

    stats = {"input": n_input, "candidates": cand.rows, "rejected": rej.rows,
             "reasons": dict(sorted(reasons.items())), "seconds": round(time.perf_counter() - t0, 3)}
    if n_input != cand.rows + rej.rows:   # pragma: no cover — an accounting bug, not bad input
        raise WarrenError(f"{source.name}: {n_input} records read but {cand.rows} candidates + "
                          f"{rej.rows} rejects written")
    storage.mark_done(output, marker, {"fingerprint": fp, "stats": stats})
    return stats


# ------------------------------------------------------------------------ assemble

def _decide(recipe: Recipe, output: str) -> list[tuple[np.ndarray, pl.DataFrame]]:
    """For each source: a keep mask over its candidate rows, and the dropped rows with
    their reasons (duplicate_id, duplicate, sampled_out). Reads four small columns."""
    frames = []
    for i, s in enumerate(recipe.sources):
        cand_path, _ = work_paths(output, s)
        t = storage.read_table(cand_path, columns=["id", "digest", "key"])
        frames.append(pl.from_arrow(t).with_columns(
            pl.lit(i, pl.Int32).alias("src"), pl.int_range(pl.len(), dtype=pl.Int64).alias("crow")))
    df = pl.concat(frames, how="vertical") if frames else pl.DataFrame()
    # 1. ids unique across the mix: the first occurrence (recipe order, file order) wins.
    df = df.with_columns(pl.col("id").is_first_distinct().alias("id_ok"),
                         pl.col("src").first().over("id").alias("id_src"))
    # 2. exact duplicates among the id-unique rows: first occurrence wins.
    ok = df.filter(pl.col("id_ok"))
    if recipe.dedup == "exact":
        ok = ok.with_columns(pl.col("digest").is_first_distinct().alias("first"),
                             pl.col("id").first().over("digest").alias("kept_id"))
    else:
        ok = ok.with_columns(pl.lit(True).alias("first"), pl.lit(None, pl.String).alias("kept_id"))
    names = [s.name for s in recipe.sources]
    out = []
    for i, s in enumerate(recipe.sources):
        mine = df.filter(pl.col("src") == i)
        n = mine.height
        keep = np.zeros(n, dtype=bool)
        drops = [mine.filter(~pl.col("id_ok")).select(
            "crow", "id", pl.format("duplicate_id: id already used in source {}",
                                    pl.col("id_src").replace_strict(dict(enumerate(names)),
                                                                    return_dtype=pl.String)).alias("reason"))]
        src_ok = ok.filter(pl.col("src") == i)
        drops.append(src_ok.filter(~pl.col("first")).select(
            "crow", "id", pl.format("duplicate: same conversations and image as {}", "kept_id").alias("reason")))
        survivors = src_ok.filter(pl.col("first"))
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
                "crow", "id", pl.lit(f"sampled_out: not among the {k} of {m} drawn with seed {recipe.seed}")
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


def assemble(recipe: Recipe, output: str, prepared: dict[str, dict], progress: bool = False) -> dict:
    """Stage 2: decide duplicates and samples over all sources, then stream mix.parquet,
    rejects.parquet, stats.json and manifest.json into `output`."""
    t0 = time.perf_counter()
    decisions = _decide(recipe, output)
    mix_path = storage.join(output, "mix.parquet")
    rej_path = storage.join(output, "rejects.parquet")
    per_source = {}
    reasons_total: dict[str, int] = {}
    tasks_total: Counter = Counter()
    kept_chars = []
    text_only = kept_total = 0
    turns_hist: dict[int, int] = {}
    with storage.atomic_open(mix_path) as fm, storage.atomic_open(rej_path) as fr:
        mix = _Writer(fm, schemas.MIX)
        rej = _Writer(fr, schemas.MIX_REJECTS)
        for s, (keep, dropped) in zip(recipe.sources, decisions):
            cand_path, prep_rej_path = work_paths(output, s)
            info = prepared[s.name]
            for batch in _iter_batches(prep_rej_path):
                rej.write_table(pa.Table.from_batches([batch]))
            if dropped.height:
                rej.write_table(pa.Table.from_pydict({
                    "id": dropped["id"].to_arrow(), "source": pa.array([s.name] * dropped.height, pa.string()),
                    "reason": dropped["reason"].to_arrow(),
                    "record": pa.nulls(dropped.height, pa.string())}))
            start = 0
            kept = 0
            by_task: Counter = Counter()
            pend, pend_rows = [], 0
            for batch in _progress(_iter_batches(cand_path), progress, f"write {s.name}"):
                mask = keep[start:start + batch.num_rows]
                start += batch.num_rows
                if not mask.any():
                    continue
                t = pa.Table.from_batches([batch]).filter(pa.array(mask))
                kept += t.num_rows
                kept_chars.append(t.column("chars").to_numpy())
                if s.task is not None:
                    by_task.update(x or "none" for x in t.column("task").to_pylist())
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
                                  "reasons": dict(sorted(by_reason.items()))}
            if s.task is not None:
                # kept records per identifier in their text ("none": text-only, untagged)
                per_source[s.name]["tasks"] = dict(sorted(by_task.items()))
                tasks_total.update(by_task)
            for code, c in by_reason.items():
                reasons_total[code] = reasons_total.get(code, 0) + c
            kept_total += kept
        mix.close()
        rej.close()
    chars = np.concatenate(kept_chars) if kept_chars else np.zeros(0, np.int64)
    stats = {
        "recipe": recipe.name, "seed": recipe.seed, "dedup": recipe.dedup,
        "input": sum(v["input"] for v in per_source.values()), "kept": kept_total,
        "rejected": sum(v["rejected"] for v in per_source.values()),
        "sources": per_source, "reasons": dict(sorted(reasons_total.items())),
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
    storage.write_json(storage.join(output, "stats.json"), stats)
    images = None
    if recipe.image_root is not None:
        root = recipe.image_root if "://" in recipe.image_root else os.path.abspath(recipe.image_root)
        images = {"mix": {"kind": "files", "path": root}}
    manifest.write(storage.join(output, "manifest.json"), {"mix": mix_path},
                   config={"mix": recipe.to_dict()}, images=images)
    return stats


# ------------------------------------------------------------------------ run

def run(recipe: Recipe, output: str, progress: bool = False) -> dict:
    """Build the mix described by `recipe` into the folder `output`; returns the stats
    (also in `<output>/stats.json`). A rerun skips the sources already prepared."""
    storage.makedirs(output)
    t0 = time.perf_counter()
    images = None
    prepared = {}
    for s in recipe.sources:
        if images is None and recipe.check_images and recipe.image_root is not None \
                and not storage.is_done(output, f"prepare-{s.name}"):
            images = image_index(recipe)
        prepared[s.name] = prepare(recipe, s, output, images=images, progress=progress)
    stats = assemble(recipe, output, prepared, progress=progress)
    stats["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    stats["records_per_s"] = round(stats["input"] / max(stats["seconds"]["total"], 1e-9), 1)
    storage.write_json(storage.join(output, "stats.json"), stats)
    return stats
