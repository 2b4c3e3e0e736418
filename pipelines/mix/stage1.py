"""A curation coreset as the stage-1 (projector pre-training) table, in the MIX schema.

Each coreset row (uid, url, caption, ...) becomes one LLaVA/Bunny pretrain-style record:

    id = uid, source = "coreset", image = uid, has_image = true,
    uid = "coreset:<row>" (the row in coreset.parquet), system = null,
    conversations = [{"from": "human", "value": "<image>\\n" + prompt},
                     {"from": "gpt",   "value": caption}]

`image` is a reference the trainer resolves through the manifest's `images` entry for
the table (kind parquet / webdataset: looked up by uid), which is carried over from the
coreset's manifest entry. The prompt is drawn per uid from short caption prompts with
a seeded hash (same seed, same prompt for a uid, whatever the row order), or fixed with
`prompt=`. Rows without a usable caption go to rejects with a reason (and the coreset
file, row and the row's uid and caption as JSON); per run, input = kept + rejected. A uid
repeated in the coreset (the curation never writes one) is not a reason by itself, as in
the mix: a row that repeats an earlier row's uid and caption is a `duplicate`, one with
another caption is kept under its own row uid.

Outputs in `output_dir`: stage1.parquet, stage1_rejects.parquet, stage1_stats.json,
and a "stage1" entry in the manifest (`cfg.manifest`, default `<output_dir>/manifest.json`;
added to it when it exists, created otherwise).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import manifest, schemas, storage
from pipelines.errors import ConfigError, InputError

TABLE = "stage1"
SOURCE = "coreset"

# Short caption requests in the style of LLaVA/Bunny pre-training data.
PROMPTS = (
    "Describe the image concisely.",
    "Give a brief description of the image.",
    "Write a short caption for this picture.",
    "Summarize the visual content of the image.",
    "What does this image show? Answer briefly.",
    "Provide a one-sentence description of the photo.",
    "Caption the image.",
    "Briefly describe what you see.",
)


@dataclass(frozen=True)
class Stage1Config:
    """How coreset captions become stage-1 records."""
    prompt: str | None = None            # fixed prompt for every record; None: seeded from prompts
    prompts: tuple[str, ...] = PROMPTS
    seed: int = 0
    max_chars: int = 2_048               # longer captions are rejected (too_long)
    uid_column: str = schemas.UID
    caption_column: str = "caption"
    manifest: str | None = None          # manifest to add the entry to; None: <output>/manifest.json
    table: str = TABLE                   # its name in the manifest

    def __post_init__(self):
        p = []
        if self.prompt is not None and (not isinstance(self.prompt, str) or not self.prompt.strip()):
            p.append("prompt must be non-empty text or null")
        if self.prompt is None and not self.prompts:
            p.append("prompts must not be empty when no fixed prompt is given")
        for q in ([self.prompt] if self.prompt else list(self.prompts)):
            if not isinstance(q, str) or not q.strip():
                p.append(f"prompt {q!r} must be non-empty text")
            elif "<image>" in q:
                p.append(f"prompt {q!r} must not contain <image> (it is added in front)")
        if self.max_chars < 1:
            p.append(f"max_chars must be >= 1 (got {self.max_chars})")
        if p:
            raise ConfigError(p)

    def choose(self, uid: str) -> str:
        if self.prompt is not None:
            return self.prompt
        h = hashlib.blake2b(f"{self.seed}\x00{uid}".encode(), digest_size=8).digest()
        return self.prompts[int.from_bytes(h, "little") % len(self.prompts)]


def _coreset_images(coreset_path: str) -> dict | None:
    """The `images` entry of table "coreset" in the manifest next to the coreset, with
    its path resolved, or None."""
    mpath = os.path.join(os.path.dirname(str(coreset_path)), "manifest.json")
    if not storage.exists(mpath):
        return None
    m = manifest.load(mpath, verify=False)
    if "coreset" not in m.doc.get("tables", {}):
        return None
    return m.images("coreset")


def add_to_manifest(manifest_path: str, name: str, table_path: str, images: dict | None = None,
                    config: dict | None = None) -> dict:
    """Add (or replace) table `name` in an existing manifest and write it back
    atomically; create a manifest with only that table when there is none. A local
    images path is stored relative to the manifest's folder."""
    base = os.path.dirname(str(manifest_path))
    if images is not None and "://" not in images["path"] and "://" not in str(manifest_path):
        images = {**images, "path": os.path.relpath(os.path.abspath(images["path"]), os.path.abspath(base))}
    if not storage.exists(manifest_path):
        return manifest.write(manifest_path, {name: table_path}, config={name: config or {}},
                              images={name: images} if images else None)
    doc = manifest.load(manifest_path, verify=False).doc
    doc["tables"][name] = manifest.table_entry(table_path, base, images)
    if config is not None:
        doc.setdefault("config", {})[name] = config
    storage.write_json(manifest_path, doc)
    return doc


def run(cfg: Stage1Config, coreset_path: str, output_dir: str) -> dict:
    """Write the stage-1 table for `coreset_path` into `output_dir`; returns stats."""
    t0 = time.perf_counter()
    fs, p = storage.filesystem(coreset_path)
    if not fs.exists(p):
        raise InputError("coreset not found", path=coreset_path)
    with fs.open(p, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    for col in (cfg.uid_column, cfg.caption_column):
        if col not in names:
            raise InputError(f"missing column '{col}' (has: {names})", path=coreset_path, field=col)
    uids = pl.from_arrow(storage.read_table(coreset_path, columns=[cfg.uid_column])).to_series()
    repeated = uids.is_duplicated().to_numpy()      # only these rows need the caption compared
    seen: set[tuple[str, str]] = set()
    out_path = storage.join(output_dir, f"{cfg.table}.parquet")
    rej_path = storage.join(output_dir, f"{cfg.table}_rejects.parquet")
    reasons: dict[str, int] = {}
    kept = n_in = 0
    storage.makedirs(output_dir)
    with fs.open(p, "rb") as f, storage.atomic_open(out_path) as fo, storage.atomic_open(rej_path) as fr:
        w = pq.ParquetWriter(fo, schemas.MIX, compression="zstd")
        wr = pq.ParquetWriter(fr, schemas.MIX_REJECTS, compression="zstd")
        try:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65_536,
                                                         columns=[cfg.uid_column, cfg.caption_column]):
                rows = {n: [] for n in schemas.MIX.names}
                rej = {n: [] for n in schemas.MIX_REJECTS.names}
                for uid, cap in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    row, why = n_in, None
                    n_in += 1
                    if uid is None or not str(uid).strip():
                        why = "missing_field: no uid"
                    elif cap is None:
                        why = "missing_caption: caption is null"
                    elif not isinstance(cap, str) or not cap.strip():
                        why = "empty_caption: caption is empty"
                    elif "<image>" in cap:
                        why = "image_tag_in_caption: caption contains <image>"
                    elif len(cap) > cfg.max_chars:
                        why = f"too_long: {len(cap)} characters (limit {cfg.max_chars})"
                    elif repeated[row]:
                        key = (str(uid), cap.strip())
                        if key in seen:
                            why = f"duplicate: same uid {str(uid)!r} and caption as an earlier row"
                        seen.add(key)
                    if why is not None:
                        code = why.split(":", 1)[0]
                        reasons[code] = reasons.get(code, 0) + 1
                        rej["id"].append(None if uid is None else str(uid))
                        rej["source"].append(SOURCE)
                        rej["reason"].append(why)
                        rej["record"].append(json.dumps({cfg.uid_column: uid, cfg.caption_column: cap},
                                                        ensure_ascii=False, default=str)[:4000])
                        rej["uid"].append(f"{SOURCE}:{row}")
                        rej["file"].append(str(coreset_path))
                        rej["row"].append(row)
                        continue
                    uid = str(uid)
                    rows["id"].append(uid)
                    rows["source"].append(SOURCE)
                    rows["image"].append(uid)
                    rows["conversations"].append([{"from": "human", "value": "<image>\n" + cfg.choose(uid)},
                                                  {"from": "gpt", "value": cap.strip()}])
                    rows["n_turns"].append(2)
                    rows["has_image"].append(True)
                    rows["uid"].append(f"{SOURCE}:{row}")
                    rows["system"].append(None)
                kept += len(rows["id"])
                w.write_table(pa.Table.from_pydict(rows, schema=schemas.MIX))
                if rej["id"]:
                    wr.write_table(pa.Table.from_pydict(rej, schema=schemas.MIX_REJECTS))
        except BaseException:
            for writer in (w, wr):   # close while the file is open (no finaliser tracebacks)
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 — the file is being discarded anyway
                    pass
            raise
        w.close()
        wr.close()
    if n_in != kept + sum(reasons.values()):  # pragma: no cover — accounting bug
        raise InputError(f"stage1 accounting broken: {n_in} != {kept} + {sum(reasons.values())}",
                         path=coreset_path)
    images = _coreset_images(coreset_path)
    target = cfg.manifest or storage.join(output_dir, "manifest.json")
    add_to_manifest(target, cfg.table, out_path, images,
                    config={**dataclasses.asdict(cfg), "coreset": str(coreset_path)})
    stats = {"input": n_in, "kept": kept, "rejected": n_in - kept, "reasons": dict(sorted(reasons.items())),
             "images": images, "manifest": str(target), "seconds": round(time.perf_counter() - t0, 3)}
    storage.write_json(storage.join(output_dir, f"{cfg.table}_stats.json"), stats)
    return stats
