"""report.html: one self-contained page that shows what a curation run did.

- the funnel per stage, and the rejects per stage and reason;
- the cluster-size histogram (all valid rows, by k-means cluster);
- the clip-score histogram of the dedup survivors and the centroid-cosine histogram of
  the clip-band survivors, each with the kept band shaded (histograms and kept spans
  recorded by the finish stage as it ranked the bands, so the shading is exact);
- thumbnails of duplicate groups (the kept member marked) and of kept samples, where
  the run has images (the pool of a URL run, or the coreset images).
Charts are matplotlib PNGs and thumbnails JPEGs, inlined as base64: one file to mail.
Works on any selection output folder; parts whose inputs are absent are left out.
Reads what the stages recorded (stats.json, the dedup completion records) and a few
coreset rows, never rejects.parquet: its memory does not grow with the run.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage


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
    """The page. What the stages recorded (stats.json, the dedup stage's completion
    records) makes every chart; of the tables only a few coreset rows are read, so the
    report's memory does not grow with the run (rejects.parquet is never opened)."""
    stats = _json(storage.join(run_dir, "stats.json")) or {}
    curate = _json(storage.join(run_dir, "curate_stats.json")) or {}
    man = _json(storage.join(run_dir, "manifest.json")) or {}
    cfg = stats.get("config", {})
    funnel = ordered_funnel(curate.get("funnel") or stats.get("funnel") or {})
    dedup = _dedup_records(run_dir, stats)
    parts = [_head(run_dir, man, stats)]
    random_init = (man.get("curate") or {}).get("random_init_model")
    if random_init:
        parts.append('<p class="warn">The embedding model of this run '
                     f'(<code>{html.escape(str(man["curate"].get("embed_model")))}</code>) is '
                     "<b>randomly initialised</b>: its clip scores measure nothing and its "
                     "duplicates are pixel-level only. Real runs set <code>embed.pretrained"
                     "</code>.</p>")
    parts.append(_funnel_section(funnel))
    if "rejects_by_stage" in stats:
        parts.append(_reasons_section(stats["rejects_by_stage"], stats.get("rejected_rows", 0)))
    clusters = _cluster_sizes(dedup)
    if clusters is not None and len(clusters):
        parts.append(_section("Cluster sizes", _img(_hist_clusters(clusters)),
                              f"{len(clusters):,} clusters with members; largest "
                              f"{int(clusters.max()):,}, median {int(np.median(clusters)):,}."))
    if stats.get("bands"):
        parts.append(_bands_section(stats["bands"], cfg))
    images = _image_sources(run_dir, man)
    core_path = storage.join(run_dir, "coreset.parquet")
    if stats.get("dedup_groups"):
        parts.append(_dups_section(stats["dedup_groups"], images))
    elif dedup and all("top_groups" in d for d in dedup):
        parts.append(_dups_section({"groups": sum(d["groups"] for d in dedup),
                                    "dropped": sum(d["dropped"] for d in dedup),
                                    "top_groups": [t for d in dedup for t in d["top_groups"]]},
                                   images))
    if "samples" in stats:
        parts.append(_samples_section(stats["samples"], stats.get("coreset_rows", 0), images))
    elif storage.exists(core_path):     # a run from before the finish recorded them
        parts.append(_samples_section(*_read_samples(core_path), images))
    return _page("".join(parts), run_dir)


# -- data -----------------------------------------------------------------------------------
def _json(path: str):
    try:
        return storage.read_json(path) if storage.exists(path) else None
    except Exception:  # noqa: BLE001 — a report shows what it can
        return None


def _dedup_records(run_dir: str, stats: dict) -> list[dict]:
    """What each dedup bucket recorded when it finished (cluster sizes, top groups)."""
    out = []
    for b in range(int(stats.get("buckets") or 0)):
        d = _json(storage.marker_path(storage.join(run_dir, "_work"), f"dedup-{b:05d}"))
        if d is not None:
            out.append(d)
    return out


def _cluster_sizes(dedup: list[dict]) -> np.ndarray | None:
    """Members per cluster over all valid rows."""
    sizes = [np.asarray(d["clusters"][1], np.int64) for d in dedup if "clusters" in d]
    return np.concatenate(sizes) if sizes else None


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


def _reasons_section(by_stage: dict, total: int) -> str:
    g = sorted(((st, r, n) for st, d in by_stage.items() for r, n in d.items()),
               key=lambda x: (x[0], -x[2]))
    rows = "".join(f"<tr><td>{html.escape(st)}</td><td>{html.escape(r)}</td>"
                   f"<td class='n'>{n:,}</td></tr>" for st, r, n in g)
    return _section("Rejects by stage and reason",
                    "<table><tr><th>stage</th><th>reason</th><th>rows</th></tr>" + rows + "</table>",
                    f"{total:,} rejected rows in rejects.parquet; each input uid is in "
                    "exactly one of coreset.parquet and rejects.parquet.")


def _bands_section(band_stats: dict, cfg: dict) -> str:
    figs = []
    for name, label in (("clip_band", "clip score (image · text)"),
                        ("centroid_band", "cosine to cluster centroid")):
        b = band_stats.get(name)
        if not b or b.get("edges") is None:
            continue
        figs.append(_img(_hist_band(b, label, name, cfg.get(name))))
    return _section("Score bands", "".join(figs),
                    "Clip scores of every dedup survivor, then centroid cosines of the clip "
                    "band's survivors (bands are chained); the shaded span is what each band kept.")


def _dups_section(groups: dict, images: _Images) -> str:
    """The largest duplicate groups, as the finish recorded them (the largest of each
    dedup bucket, and those joined across cluster borders)."""
    n_groups, dropped = groups["groups"], groups["dropped"]
    if not n_groups:
        return _section("Duplicate groups", "<p>No duplicates were found.</p>")
    g = sorted(groups["top_groups"], key=lambda t: (-t["dropped"], t["kept_uid"]))[:MAX_GROUPS]
    want = [t["kept_uid"] for t in g] + [u for t in g for u in t["members"][:MAX_MEMBERS - 1]]
    blobs = images.get(want)
    rows = []
    for t in g:
        members = [t["kept_uid"]] + t["members"][:MAX_MEMBERS - 1]
        cells = [_thumb(blobs.get(u), u, "kept" if u == t["kept_uid"] else "dropped")
                 for u in members]
        more = t["dropped"] + 1 - len(members)
        tail = f"<span class='more'>+{more} more</span>" if more > 0 else ""
        rows.append(f"<div class='group'>{''.join(cells)}{tail}</div>")
    note = (f"The {len(g)} largest of {n_groups:,} groups ({dropped:,} rows dropped as "
            "duplicates); the kept member has a green frame.")
    if not blobs:
        note += " This run has no images to show (embeddings-only input)."
    return _section("Duplicate groups", "".join(rows), note)


def _read_samples(core_path: str) -> tuple[list[dict], int]:
    """Rows spread evenly over the (uid-sorted) coreset, reading only their row groups."""
    fs, p = storage.filesystem(core_path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        total = pf.metadata.num_rows
        pick = np.unique(np.linspace(0, total - 1, min(MAX_SAMPLES, total)).astype(int))
        cols = [c for c in ("uid", "caption", "clip_score") if c in pf.schema_arrow.names]
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        starts = np.r_[0, np.cumsum(sizes)]
        rows = []
        for i in range(pf.num_row_groups):
            here = pick[(pick >= starts[i]) & (pick < starts[i + 1])] - starts[i]
            if len(here):
                rows += pf.read_row_group(i, columns=cols).take(pa.array(here)).to_pylist()
    return rows, total


def _samples_section(rows: list[dict], total: int, images: _Images) -> str:
    if not rows:
        return _section("Kept samples", "<p>The coreset is empty.</p>")
    uids = [r["uid"] for r in rows]
    blobs = images.get(uids)
    cells = [_thumb(blobs.get(r["uid"]), r["uid"], "sample", r.get("caption"), r.get("clip_score"))
             for r in rows]
    return _section("Kept samples", f"<div class='grid'>{''.join(cells)}</div>",
                    f"{len(cells)} of {total:,} coreset rows.")


# -- rendering ------------------------------------------------------------------------------
def _figure(size):
    """A matplotlib figure and axes without pyplot (no GUI state, a faster import)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=90, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)     # one draw: no tight-bbox second pass
    return buf.getvalue()


def _bar_funnel(funnel: dict) -> bytes:
    fig, ax = _figure((7, 0.35 * len(funnel) + 0.8))
    names, vals = list(funnel)[::-1], list(funnel.values())[::-1]
    ax.barh(names, vals, color="#4a7ab5")
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:,}", va="center", fontsize=8)
    ax.set_xlabel("rows")
    ax.set_xlim(0, max(vals + [1]) * 1.15)
    return _png(fig)


def _hist_clusters(sizes: np.ndarray) -> bytes:
    fig, ax = _figure((7, 3))
    hi = max(2, int(sizes.max()))
    bins = np.unique(np.geomspace(1, hi + 1, 40).astype(int))
    ax.hist(sizes, bins=bins, color="#4a7ab5")
    ax.set_xscale("log")
    ax.set_xlabel("cluster size (members)")
    ax.set_ylabel("clusters")
    return _png(fig)


def _hist_band(b: dict, label, name, rng) -> bytes:
    fig, ax = _figure((7, 3))
    edges, counts = np.asarray(b["edges"]), np.asarray(b["counts"])
    ax.stairs(counts, edges, fill=True, color="#9aa9bd")
    if b.get("kept_span") and rng:
        lo, hi = b["kept_span"]
        ax.axvspan(lo, hi, color="#3c9d4e", alpha=0.3,
                   label=f"kept: ranks {rng[0]:.0%}–{rng[1]:.0%} ({b['out']:,} of {b['in']:,})")
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


