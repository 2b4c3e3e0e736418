"""The finish stage as it was before it streamed: everything ranked and sorted in
memory with `bands.band` / `bands.sample`. Kept to check that the streaming finish
writes byte-identical coreset.parquet and rejects.parquet."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import bands, merge, schemas, storage
from pipelines.select import _by_code, _rejects, _src, _w


def finish_in_memory(output_dir: str, cfg, target_dir: str, extra_rejects=()) -> None:
    """Write coreset.parquet and rejects.parquet of the finished run in `output_dir` into
    `target_dir`, the in-memory way."""
    p = storage.read_json(_w(output_dir, "plan.json"))
    src = _src(output_dir)
    surv = pa.concat_tables([storage.read_table(_w(output_dir, "dedup", f"b{b:05d}.parquet"))
                             for b in range(p["buckets"])])
    uids = surv.column("uid")
    alive = np.ones(surv.num_rows, bool)
    band_rejects = []
    for stage, col, rng in (("clip_band", "clip_score", cfg.clip_band),
                            ("centroid_band", "centroid_cos", cfg.centroid_band)):
        if rng is not None:
            idx = np.flatnonzero(alive)
            codes = bands.band(surv.column(col).take(idx).to_numpy(), uids.take(idx), *rng)
            out = idx[codes > 0]
            band_rejects.append(_rejects(uids.take(out), stage,
                                         _by_code([None, bands.ABOVE, bands.BELOW], codes[codes > 0])))
            alive[out] = False
    idx = np.flatnonzero(alive)
    pick = bands.sample(surv.column("uid_hash").take(idx).to_numpy(), uids.take(idx),
                        cfg.target, cfg.seed)
    band_rejects.append(_rejects(uids.take(idx[~pick]), "sample", "not_sampled"))
    alive[idx[~pick]] = False
    coreset = _coreset_table(src, surv.filter(pa.array(alive)), src.uid_column)
    storage.write_table(coreset, storage.join(target_dir, "coreset.parquet"), coreset.schema,
                        row_group_size=merge.WIDE_OUTPUT_ROWS)
    parts = [storage.read_table(f, schema=schemas.REJECTS)
             for f in storage.listdir(_w(output_dir, "rejects"), "*.parquet")]
    parts += band_rejects + [storage.read_table(f, schema=schemas.REJECTS) for f in extra_rejects]
    rejects = pa.concat_tables(parts)
    rejects = rejects.take(pc.sort_indices(rejects, [("uid", "ascending"), ("stage", "ascending")]))
    storage.write_table(rejects, storage.join(target_dir, "rejects.parquet"), schemas.REJECTS)


def _coreset_table(src, kept: pa.Table, uid_col: str) -> pa.Table:
    """Join the kept rows with their shard metadata (read from the input again)."""
    shard = kept.column("shard").to_numpy()
    row = kept.column("row").to_numpy()
    pieces = []
    for s in np.unique(shard):
        sel = np.flatnonzero(shard == s)
        meta = src.metadata(src.shards[int(s)])
        rows_here = row[sel]
        order = np.argsort(rows_here)
        m = meta.take(pa.array(rows_here[order]))
        k = kept.take(pa.array(sel[order]))
        cols = {"uid": k.column("uid"),
                "url": m.column("url").cast(pa.string()) if "url" in m.column_names
                else pa.nulls(len(sel), pa.string()),
                "caption": m.column("caption").cast(pa.string()) if "caption" in m.column_names
                else pa.nulls(len(sel), pa.string()),
                "cluster": k.column("cluster"), "clip_score": k.column("clip_score"),
                "centroid_cos": k.column("centroid_cos")}
        for c in m.column_names:
            if c not in (uid_col, "url", "caption") and c not in cols:
                cols[c] = m.column(c)
        pieces.append(pa.table(cols))
    if not pieces:
        return schemas.CORESET.empty_table()
    t = pa.concat_tables(pieces, promote_options="default")
    head = [schemas.CORESET.field(n) for n in schemas.CORESET.names]
    carried = [t.schema.field(n) for n in t.column_names if n not in schemas.CORESET.names]
    t = t.select([f.name for f in head + carried]).cast(pa.schema(head + carried))
    return t.take(pc.sort_indices(t, [("uid", "ascending")]))
