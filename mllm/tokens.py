"""What a conversation file becomes before the model sees it (`warren tokens`).

    for line in tokens.dump("llava_v1_5_mix665k.json", "vicuna_v1", tokenizer): ...

Each record gives `{"id", "input_ids", "labels"}`: the image as one IMAGE_TOKEN_INDEX
(-200, LLaVA's placeholder) before expansion, IGNORE_INDEX (-100) where untrained, no
truncation — the form LLaVA's and Bunny's own preprocessing returns, so the two can be
compared line by line. A record that training would refuse gives `{"id", "error"}`
with the reason (`uid` is added when the table has one).

Input: LLaVA JSON or JSON Lines (read as pipelines.mix.readers reads a 'llava' source:
`image` present = an image record), or a MIX-schema Parquet table (mix.parquet).
"""
from __future__ import annotations

import os
from typing import Iterator

from mllm.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Template, check_conversation
from pipelines import storage
from pipelines.errors import InputError

BATCH = 512


def records(path: str) -> Iterator[dict]:
    """{"id", "uid"?, "has_image", "conversations"} or {"id", "error"} per record, in file order."""
    if not storage.exists(path):
        raise InputError("file not found", path=path)
    if path.endswith(".parquet"):
        yield from _parquet_records(path)
        return
    from pipelines.mix import readers
    for rec in readers.read(path, "llava", os.path.basename(path)):
        if isinstance(rec, readers.Bad):
            yield {"id": rec.id, "error": rec.message}
        else:
            yield {"id": rec.id, "has_image": rec.image is not None, "conversations": rec.conversations}


def _parquet_records(path: str) -> Iterator[dict]:
    import pyarrow.parquet as pq
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several types for a non-Parquet file
            raise InputError(f"unreadable Parquet ({e})", path=path) from None
        names = pf.schema_arrow.names
        want = ["id", "has_image", "conversations"]
        missing = [n for n in want if n not in names]
        if missing:
            raise InputError(f"missing column(s) {missing} (expected a MIX table)", path=path,
                             field=missing[0])
        cols = want + (["uid"] if "uid" in names else [])
        for batch in pf.iter_batches(batch_size=BATCH, columns=cols):
            for row in batch.to_pylist():
                yield {k: v for k, v in row.items() if k != "uid" or v is not None}


def dump(path: str, template: Template, tokenizer) -> Iterator[dict]:
    """One output line (a dict) per record of `path`, in file order."""
    batch: list[dict] = []
    for rec in records(path):
        batch.append(rec)
        if len(batch) == BATCH:
            yield from _encode(batch, template, tokenizer)
            batch = []
    yield from _encode(batch, template, tokenizer)


def _encode(batch: list[dict], template: Template, tokenizer) -> Iterator[dict]:
    todo = []
    for rec in batch:
        if "error" not in rec:
            reason = check_conversation(rec["conversations"], bool(rec["has_image"]))
            if reason is not None:
                rec["error"] = reason
            else:
                todo.append(rec)
    encoded = template.encode_many([r["conversations"] for r in todo], tokenizer, 1,
                                   image_token_id=IMAGE_TOKEN_INDEX)
    results = {id(r): e for r, e in zip(todo, encoded)}
    for rec in batch:
        head = {"id": rec.get("id"), **({"uid": rec["uid"]} if "uid" in rec else {})}
        result = results.get(id(rec))
        if result is None:
            yield {**head, "error": rec["error"]}
        elif isinstance(result, Exception):
            yield {**head, "error": str(result)}
        else:
            yield {**head, "input_ids": result[0], "labels": result[1]}


def show(line: dict, tokenizer, colour: bool) -> str:
    """One output line for a person: the tokens as the tokenizer spells them, trained runs
    in green (colour) or inside [ ] (no colour); the image as <image>."""
    if "error" in line:
        return f"-- {line['id']}: error: {line['error']}"
    ids, labels = line["input_ids"], line["labels"]
    out, run = [], []

    def flush():
        if run:
            text = " ".join(run)
            out.append(f"\x1b[32m{text}\x1b[0m" if colour else f"[{text}]")
            run.clear()

    for i, lab in zip(ids, labels):
        token = "<image>" if i == IMAGE_TOKEN_INDEX else tokenizer.convert_ids_to_tokens(i)
        if lab != IGNORE_INDEX:
            run.append(token)
        else:
            flush()
            out.append(token)
    flush()
    trained = sum(lab != IGNORE_INDEX for lab in labels)
    return f"-- {line['id']}: {len(ids)} tokens, {trained} trained\n" + " ".join(out)
