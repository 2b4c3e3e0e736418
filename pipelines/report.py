"""report.html: one self-contained page that shows what a curation run did.

- the funnel per stage, and the rejects per stage and reason;
- the cluster-size histogram (all valid rows, by k-means cluster);
- the clip-score histogram of the dedup survivors and the centroid-cosine histogram of
  the clip-band survivors, each with the kept band shaded (recomputed with the same
  `bands.band` the selection used, so the shading is exact);
- thumbnails of duplicate groups (the kept member marked) and of kept samples, where
  the run has images (the pool of a URL run, or the coreset images).
Charts are matplotlib PNGs and thumbnails JPEGs, inlined as base64: one file to mail.
Works on any selection output folder; parts whose inputs are absent are left out.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import bands, storage


MAX_GROUPS = 8
MAX_MEMBERS = 6
MAX_SAMPLES = 24
THUMB = 96
# Stage order of the funnel (JSON files store keys sorted); unknown stages go last.
STAGES = ("input", "has_url", "downloaded", "embedded", "valid", "dedup", "clip_band",
          "centroid_band", "sample", "with_image")


def ordered_funnel(funnel: dict) -> dict:
    rank = {s: i for i, s in enumerate(STAGES)}
    return dict(sorted(funnel.items(), key=lambda kv: (rank.get(kv[0], len(STAGES)), kv[0])))


def write(run_dir: str, path: str | None = None) -> str:
    """Write `<run_dir>/report.html` (or `path`); returns its path."""
    out = path or storage.join(run_dir, "report.html")
    page = build(run_dir)
    storage.write_bytes(out, page.encode())
    return out


def build(run_dir: str) -> str:
    stats = _json(storage.join(run_dir, "stats.json")) or {}
    curate = _json(storage.join(run_dir, "curate_stats.json")) or {}
    man = _json(storage.join(run_dir, "manifest.json")) or {}
    cfg = stats.get("config", {})
    funnel = ordered_funnel(curate.get("funnel") or stats.get("funnel") or {})
    # Only the columns each section needs: rejects has a row per dropped input row, and
    # the uid strings are most of its size.
    rejects = _table(storage.join(run_dir, "rejects.parquet"), ["stage", "reason"])
    coreset = _table(storage.join(run_dir, "coreset.parquet"))
    parts = [_head(run_dir, man, stats)]
    random_init = (man.get("curate") or {}).get("random_init_model")
    if random_init:
        parts.append('<p class="warn">The embedding model of this run '
                     f'(<code>{html.escape(str(man["curate"].get("embed_model")))}</code>) is '
                     "<b>randomly initialised</b>: its clip scores measure nothing and its "
                     "duplicates are pixel-level only. Real runs set <code>embed.pretrained"
                     "</code>.</p>")
    parts.append(_funnel_section(funnel))
    if rejects is not None:
        parts.append(_reasons_section(rejects))
    surv = _survivors(run_dir)
    clusters = _cluster_sizes(run_dir)
    if clusters is not None and len(clusters):
        parts.append(_section("Cluster sizes", _img(_hist_clusters(clusters)),
                              f"{len(clusters):,} clusters with members; largest "
                              f"{int(clusters.max()):,}, median {int(np.median(clusters)):,}."))
    if surv is not None and surv.num_rows:
        parts.append(_bands_section(surv, cfg))
    images = _image_sources(run_dir, man)
    if rejects is not None:
        parts.append(_dups_section(_dedup_rejects(run_dir), images, coreset))
    if coreset is not None:
        parts.append(_samples_section(coreset, images))
    return _page("".join(parts), run_dir)


# -- data -----------------------------------------------------------------------------------
def _json(path: str):
    try:
        return storage.read_json(path) if storage.exists(path) else None
    except Exception:  # noqa: BLE001 — a report shows what it can
        return None


def _table(path: str, columns=None) -> pa.Table | None:
    return storage.read_table(path, columns=columns) if storage.exists(path) else None


def _dedup_rejects(run_dir: str) -> pa.Table:
    """uid, kept_uid of the duplicate rejects, read a row group at a time (the other
    stages' rows never come into memory)."""
    fs, p = storage.filesystem(storage.join(run_dir, "rejects.parquet"))
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        parts = [b.filter(pc.equal(b.column("stage"), "dedup")).select(["uid", "kept_uid"])
                 for b in (pf.read_row_group(i, columns=["stage", "uid", "kept_uid"])
                           for i in range(pf.num_row_groups))]
    return pa.concat_tables(parts) if parts else pa.table({"uid": pa.array([], pa.string()),
                                                           "kept_uid": pa.array([], pa.string())})


def _survivors(run_dir: str) -> pa.Table | None:
    files = storage.listdir(storage.join(run_dir, "_work", "dedup"), "b*.parquet")
    if not files:
        return None
    return pa.concat_tables([storage.read_table(f, columns=["uid", "clip_score", "centroid_cos"])
                             for f in files])


def _cluster_sizes(run_dir: str) -> np.ndarray | None:
    """Members per cluster over all valid rows (assignment parts, read a column at a time)."""
    files = storage.listdir(storage.join(run_dir, "_work", "assign"), "b*/s*.parquet")
    if not files:
        return None
    total = np.zeros(0, np.int64)
    for f in files:
        c = storage.read_table(f, columns=["cluster"]).column(0).to_numpy()
        if len(c):
            b = np.bincount(c)
            if len(b) > len(total):
                total = np.pad(total, (0, len(b) - len(total)))
            total[:len(b)] += b
    return total[total > 0]


class _Images:
    """uid -> image bytes over the run's image tables (pool shards, coreset images)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def get(self, uids: list[str]) -> dict[str, bytes]:
        want = pa.array(sorted(set(uids)), pa.string())
        found: dict[str, bytes] = {}
        for p in self.paths:
            if len(found) == len(want):
                break
            t = storage.read_table(p, columns=["uid", "jpg"])
            t = t.filter(pc.is_in(t.column("uid"), value_set=want))
            for u, b in zip(t.column("uid").to_pylist(), t.column("jpg").to_pylist()):
                found.setdefault(u, b)
        return found


def _image_sources(run_dir: str, man: dict) -> _Images:
    paths = storage.listdir(storage.join(run_dir, "pool"), "images_*.parquet")
    img = ((man.get("tables") or {}).get("coreset") or {}).get("images")
    if img and img.get("kind") == "parquet":
        p = img["path"] if "://" in img["path"] or img["path"].startswith("/") \
            else storage.join(run_dir, img["path"])
        if storage.exists(p):
            paths.append(p)
    return _Images(paths)


# -- sections -------------------------------------------------------------------------------
def _head(run_dir, man, stats) -> str:
    items = [("run", run_dir), ("created", man.get("created", "")),
             ("code", man.get("code_version", stats.get("code_version", ""))),
             ("k", stats.get("k", "")), ("input rows", f"{stats.get('input_rows', 0):,}"),
             ("coreset rows", f"{stats.get('coreset_rows', 0):,}")]
    cfg = stats.get("config", {})
    for key in ("threshold", "clip_band", "centroid_band", "target", "keep", "policy", "seed"):
        if key in cfg:
            items.append((key, cfg[key]))
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in items)
    return f"<h1>Warren curation report</h1><table class='kv'>{rows}</table>"


def _funnel_section(funnel: dict) -> str:
    if not funnel:
        return ""
    rows, prev = [], None
    for k, v in funnel.items():
        share = f"{100.0 * v / prev:.1f}%" if prev else ""
        rows.append(f"<tr><td>{html.escape(k)}</td><td class='n'>{v:,}</td><td class='n'>{share}</td></tr>")
        prev = v or prev
    table = ("<table><tr><th>stage</th><th>rows out</th><th>of previous</th></tr>"
             + "".join(rows) + "</table>")
    return _section("Funnel", table + _img(_bar_funnel(funnel)))


def _reasons_section(rejects: pa.Table) -> str:
    g = rejects.group_by(["stage", "reason"]).aggregate([([], "count_all")]).to_pylist()
    g.sort(key=lambda r: (r["stage"], -r["count_all"]))
    rows = "".join(f"<tr><td>{html.escape(r['stage'])}</td><td>{html.escape(r['reason'])}</td>"
                   f"<td class='n'>{r['count_all']:,}</td></tr>" for r in g)
    return _section("Rejects by stage and reason",
                    "<table><tr><th>stage</th><th>reason</th><th>rows</th></tr>" + rows + "</table>",
                    f"{rejects.num_rows:,} rejected rows in rejects.parquet; each input uid is in "
                    "exactly one of coreset.parquet and rejects.parquet.")


def _bands_section(surv: pa.Table, cfg: dict) -> str:
    clip = surv.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)
    cos = surv.column("centroid_cos").to_numpy(zero_copy_only=False).astype(np.float64)
    uids = surv.column("uid")
    alive = np.ones(len(clip), bool)
    figs = []
    for name, col, label in (("clip_band", clip, "clip score (image · text)"),
                             ("centroid_band", cos, "cosine to cluster centroid")):
        rng = cfg.get(name)
        idx = np.flatnonzero(alive)
        vals = col[idx]
        if np.isnan(vals).all():
            continue
        kept = None
        if rng:
            codes = bands.band(vals, uids.take(pa.array(idx)), float(rng[0]), float(rng[1]))
            kept = vals[codes == 0]
            alive[idx[codes != 0]] = False
        figs.append(_img(_hist_band(vals, kept, label, name, rng)))
    return _section("Score bands", "".join(figs),
                    "Clip scores of every dedup survivor, then centroid cosines of the clip "
                    "band's survivors (bands are chained); the shaded span is what each band kept.")


def _dups_section(d: pa.Table, images: _Images, coreset) -> str:
    """`d`: uid, kept_uid of the duplicate rejects."""
    if not d.num_rows:
        return _section("Duplicate groups", "<p>No duplicates were found.</p>")
    # the largest groups by counting first; member lists only for those
    sizes = d.group_by("kept_uid").aggregate([("uid", "count")])
    n_groups = sizes.num_rows
    top = sizes.sort_by([("uid_count", "descending"), ("kept_uid", "ascending")]).slice(0, MAX_GROUPS)
    d = d.filter(pc.is_in(d.column("kept_uid"), top.column("kept_uid")))
    g = d.group_by("kept_uid").aggregate([("uid", "list")]).to_pylist()
    g.sort(key=lambda r: (-len(r["uid_list"]), r["kept_uid"]))
    want = [r["kept_uid"] for r in g] + [u for r in g for u in sorted(r["uid_list"])[:MAX_MEMBERS - 1]]
    blobs = images.get(want)
    rows = []
    for r in g:
        members = [r["kept_uid"]] + sorted(r["uid_list"])[:MAX_MEMBERS - 1]
        cells = [_thumb(blobs.get(u), u, "kept" if u == r["kept_uid"] else "dropped")
                 for u in members]
        more = len(r["uid_list"]) + 1 - len(members)
        tail = f"<span class='more'>+{more} more</span>" if more > 0 else ""
        rows.append(f"<div class='group'>{''.join(cells)}{tail}</div>")
    dropped = int(pc.sum(sizes.column("uid_count")).as_py())
    note = (f"The {len(g)} largest of {n_groups:,} groups ({dropped:,} rows dropped as "
            "duplicates); the kept member has a green frame.")
    if not blobs:
        note += " This run has no images to show (embeddings-only input)."
    return _section("Duplicate groups", "".join(rows), note)


def _samples_section(coreset: pa.Table, images: _Images) -> str:
    n = min(MAX_SAMPLES, coreset.num_rows)
    if not n:
        return _section("Kept samples", "<p>The coreset is empty.</p>")
    # an even spread over the (uid-sorted) coreset, not just its first rows
    pick = np.unique(np.linspace(0, coreset.num_rows - 1, n).astype(int))
    t = coreset.take(pa.array(pick))
    uids = t.column("uid").to_pylist()
    blobs = images.get(uids)
    caps = t.column("caption").to_pylist() if "caption" in t.column_names else [None] * len(uids)
    clip = t.column("clip_score").to_pylist() if "clip_score" in t.column_names else [None] * len(uids)
    cells = [_thumb(blobs.get(u), u, "sample", c, s) for u, c, s in zip(uids, caps, clip)]
    return _section("Kept samples", f"<div class='grid'>{''.join(cells)}</div>",
                    f"{len(cells)} of {coreset.num_rows:,} coreset rows.")


# -- rendering ------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _bar_funnel(funnel: dict) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(funnel) + 0.8))
    names, vals = list(funnel)[::-1], list(funnel.values())[::-1]
    ax.barh(names, vals, color="#4a7ab5")
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:,}", va="center", fontsize=8)
    ax.set_xlabel("rows")
    ax.set_xlim(0, max(vals + [1]) * 1.15)
    return _png(fig)


def _hist_clusters(sizes: np.ndarray) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    hi = max(2, int(sizes.max()))
    bins = np.unique(np.geomspace(1, hi + 1, 40).astype(int))
    ax.hist(sizes, bins=bins, color="#4a7ab5")
    ax.set_xscale("log")
    ax.set_xlabel("cluster size (members)")
    ax.set_ylabel("clusters")
    return _png(fig)


def _hist_band(vals, kept, label, name, rng) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    v = vals[np.isfinite(vals)]
    ax.hist(v, bins=60, color="#9aa9bd")
    if kept is not None and len(kept):
        ax.axvspan(float(np.min(kept)), float(np.max(kept)), color="#3c9d4e", alpha=0.3,
                   label=f"kept: ranks {rng[0]:.0%}–{rng[1]:.0%} ({len(kept):,} of {len(v):,})")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("rows")
    ax.set_title(name, fontsize=10)
    return _png(fig)


def _thumb(blob: bytes | None, uid: str, kind: str, caption=None, score=None) -> str:
    title = html.escape(uid + (f" — {caption}" if caption else ""))
    if blob is None:
        img = "<div class='noimg'>no image</div>"
    else:
        try:
            from PIL import Image
            with Image.open(io.BytesIO(blob)) as im:
                im = im.convert("RGB")
                im.thumbnail((THUMB, THUMB))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=80)
            img = f"<img src='data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
        except Exception:  # noqa: BLE001 — a broken thumbnail must not break the report
            img = "<div class='noimg'>undecodable</div>"
    label = {"kept": "<b>kept</b>", "dropped": "dropped"}.get(kind, "")
    sub = f"<div class='cap'>{html.escape(caption)}</div>" if caption else ""
    sc = f"<div class='cap'>clip {score:.3f}</div>" if isinstance(score, float) else ""
    return (f"<figure class='{kind}' title='{title}'>{img}<figcaption>{html.escape(uid)} "
            f"{label}</figcaption>{sub}{sc}</figure>")


def _img(png: bytes) -> str:
    return f"<img class='chart' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _section(title: str, body: str, note: str = "") -> str:
    n = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    return f"<section><h2>{html.escape(title)}</h2>{n}{body}</section>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:left}td.n{text-align:right}table.kv th{background:#f4f4f4}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:8px}.note{color:#555;font-size:13px}
figure{display:inline-block;margin:4px;width:%dpx;vertical-align:top;font-size:11px}
figure img{width:%dpx;height:%dpx;object-fit:cover;border:3px solid #ccc}
figure.kept img{border-color:#2e9b45}figure.dropped img{border-color:#c44}
.noimg{width:%dpx;height:%dpx;background:#eee;display:flex;align-items:center;
justify-content:center;color:#999}.group{border-bottom:1px solid #eee;padding:4px 0}
.cap{color:#555;overflow:hidden;max-height:3.6em}.more{color:#777;font-size:12px}
img.chart{display:block;margin:8px 0}
""" % ((THUMB + 6,) + (THUMB,) * 4)


def _page(body: str, run_dir: str) -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>Warren report: {html.escape(str(run_dir))}</title><style>{_CSS}</style>"
            f"</head><body>{body}</body></html>")


