"""mix.parquet back to LLaVA JSON, for tools that read LLaVA's format.

The output is what LLaVA's `LazySupervisedDataset` and Bunny's trainer read: a JSON
list of {"id", "image" (image records only), "conversations": [{"from", "value"}]},
plus a top-level "system" string for records that have one (their trainers ignore the
key; Warren's reader takes it back as the record's system prompt).
A path ending in `.jsonl` gets JSON Lines instead. Written in a stream, one row group
at a time, atomically.
"""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from pipelines import schemas, storage
from pipelines.errors import InputError

COLUMNS = ["id", "image", "conversations"]
OPTIONAL = ["system"]


def to_llava(mix_path: str, out_path: str, batch_rows: int = 16_384) -> int:
    """Write the records of `mix_path` (MIX schema) to `out_path`; returns the count."""
    fs, p = storage.filesystem(mix_path)
    jsonl = str(out_path).endswith(".jsonl")
    n = 0
    try:
        f_in = fs.open(p, "rb")
    except FileNotFoundError:
        raise InputError("file not found", path=mix_path) from None
    with f_in, storage.atomic_open(out_path, "wb") as out:
        pf = pq.ParquetFile(f_in)
        missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise InputError(f"not a mix table (missing {missing}; expected schema MIX "
                             f"{schemas.MIX.names})", path=mix_path)
        if not jsonl:
            out.write(b"[")
        cols = COLUMNS + [c for c in OPTIONAL if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            ids = batch.column("id").to_pylist()
            images = batch.column("image").to_pylist()
            convs = batch.column("conversations").to_pylist()
            systems = batch.column("system").to_pylist() if "system" in cols else [None] * len(ids)
            parts = []
            for rid, image, conv, system in zip(ids, images, convs, systems):
                rec = {"id": rid}
                if image is not None:
                    rec["image"] = image
                if system is not None:
                    rec["system"] = system
                rec["conversations"] = conv
                text = json.dumps(rec, ensure_ascii=False)
                parts.append(text + "\n" if jsonl else ("\n" if n == 0 else ",\n") + text)
                n += 1
            out.write("".join(parts).encode())
        if not jsonl:
            out.write(b"\n]\n" if n else b"]\n")
    return n
