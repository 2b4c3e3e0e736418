"""Every table Warren writes, with one explicit pyarrow schema each.

Embedding columns are fixed-size lists of float16, which polars reads as
`Array(Float16, d)`. Tables that carry arbitrary input metadata (coreset) are built
from the fixed part below plus the carried columns, in that order.
"""
from __future__ import annotations

import pyarrow as pa

UID = "uid"


def embedding_table(dim: int) -> pa.Schema:
    """Warren's own embedding table: one row per sample, both embeddings L2-normalised."""
    return pa.schema([
        pa.field(UID, pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("img_emb", pa.list_(pa.float16(), dim), nullable=False),
        pa.field("txt_emb", pa.list_(pa.float16(), dim)),
    ])


# Per-sample result of cluster assignment, written partitioned by cluster bucket.
# (shard, row) point back into the input so dedup can fetch the vector.
ASSIGNMENTS = pa.schema([
    pa.field(UID, pa.string(), nullable=False),
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("row", pa.int64(), nullable=False),
    pa.field("cluster", pa.int32(), nullable=False),
    pa.field("centroid_cos", pa.float32(), nullable=False),
    pa.field("clip_score", pa.float32()),
    pa.field("uid_hash", pa.int64(), nullable=False),   # stable 64-bit hash, for sampling
])

# Survivors of dedup inside one cluster bucket (same columns as ASSIGNMENTS).
SURVIVORS = ASSIGNMENTS


def survivors(carried: pa.Schema) -> pa.Schema:
    """Rows between assign and finish: ASSIGNMENTS, then the text and carried metadata
    (so the finish writes the coreset without joining the input again)."""
    return pa.schema(list(ASSIGNMENTS) + [pa.field("url", pa.string()),
                                          pa.field("caption", pa.string())] + list(carried))


# The fixed head of coreset.parquet; carried metadata columns follow it.
CORESET = pa.schema([
    pa.field(UID, pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("cluster", pa.int32(), nullable=False),
    pa.field("clip_score", pa.float32()),
    pa.field("centroid_cos", pa.float32(), nullable=False),
])


def coreset(carried: pa.Schema) -> pa.Schema:
    """coreset.parquet: the fixed head, then the carried metadata columns."""
    return pa.schema(list(CORESET) + list(carried))


REJECTS = pa.schema([
    pa.field(UID, pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("kept_uid", pa.string()),
])

# Synthetic ground truth: dup_group is -1 for samples planted without duplicates.
TRUTH = pa.schema([
    pa.field(UID, pa.string(), nullable=False),
    pa.field("cluster", pa.int32(), nullable=False),
    pa.field("dup_group", pa.int64(), nullable=False),
])

TURN = pa.struct([pa.field("from", pa.string()), pa.field("value", pa.string())])

# The instruction mix (and the stage-1 caption table, which has the same shape).
# `id` is the record's own id as the source file has it (not unique: LLaVA-665K reuses a
# COCO image id across its VQA parts); `uid` is unique: "<source name>:<row>", the
# element's 0-based index in its file. `system` holds a leading system turn (ShareGPT
# style), null when there is none. uid and system are nullable only so that tables
# written before they existed still cast; the mix and stage-1 builders always fill uid.
MIX = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("image", pa.string()),
    pa.field("conversations", pa.list_(TURN), nullable=False),
    pa.field("n_turns", pa.int32(), nullable=False),
    pa.field("has_image", pa.bool_(), nullable=False),
    pa.field("uid", pa.string()),
    pa.field("system", pa.string()),
])

# Every dropped record: where it came from (file, 0-based row, uid) and its raw text.
MIX_REJECTS = pa.schema([
    pa.field("id", pa.string()),
    pa.field("source", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("record", pa.string()),
    pa.field("uid", pa.string()),
    pa.field("file", pa.string()),
    pa.field("row", pa.int64()),
])

# Downloaded images as Parquet bytes, keyed by uid (what the trainer reads for stage 1).
IMAGES = pa.schema([
    pa.field(UID, pa.string(), nullable=False),
    pa.field("jpg", pa.binary(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
])

# Rows a training stage refuses before step 1 (<stage>/rejects.parquet): `row` is the row
# index in `table`, `uid` the table's uid where it has one.
TRAIN_REJECTS = pa.schema([
    pa.field("table", pa.string(), nullable=False),
    pa.field("row", pa.int64(), nullable=False),
    pa.field("id", pa.string()),
    pa.field(UID, pa.string()),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
])
