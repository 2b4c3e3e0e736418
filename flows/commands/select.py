"""`warren select`: the Bunny coreset rule on embeddings alone."""
from __future__ import annotations

HELP = "select a coreset from embeddings (k-means, dedup, clip and centroid bands, sample)"


def _band(text: str):
    if text.lower() in ("none", "off", ""):
        return None
    lo, hi = (float(v) for v in text.split(","))
    return (lo, hi)


def add_arguments(p) -> None:
    p.add_argument("--input", required=True,
                   help="embedding folder: LAION layout (img_emb/, text_emb/, metadata/) or Parquet tables")
    p.add_argument("--output", required=True, help="output folder (reruns resume in it)")
    p.add_argument("--k", type=int, default=None, help="clusters (default: rows / 20000)")
    p.add_argument("--threshold", type=float, default=0.86, help="duplicate edge: cos > threshold")
    p.add_argument("--clip-band", type=_band, default=(0.40, 0.60), metavar="LO,HI|none")
    p.add_argument("--centroid-band", type=_band, default=(0.15, 0.35), metavar="LO,HI|none")
    p.add_argument("--target", type=int, default=None, help="final coreset size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", choices=["middle", "far", "near", "random"], default="middle")
    p.add_argument("--policy", choices=["bunny", "semdedup"], default="bunny")
    p.add_argument("--eps", type=float, default=None, help="semdedup: drop when cos > 1 - eps")
    p.add_argument("--uid-column", default="key", help="uid column of the metadata (LAION: key)")
    p.add_argument("--buckets", type=int, default=None, help="dedup work units (default min(k, max(64, rows / 2M)))")
    p.add_argument("--two-level", choices=["auto", "on", "off"], default="auto",
                   help="two-level k-means (auto: when k > 4096)")
    p.add_argument("--method", choices=["int8", "float32", "baseline"], default="int8",
                   help="pairwise step; all give the exact graph (baseline: the plain "
                        "float32 X @ X.T per cluster, for benchmarks)")
    p.add_argument("--dedup-scope", choices=["cluster", "global"], default="cluster",
                   help="cluster: duplicates linked inside each k-means cluster (Bunny, SemDeDup); "
                        "global: also across cluster borders, as far as the geometry allows "
                        "(the components of the whole graph)")
    p.add_argument("--device", default="auto", metavar="auto|faiss|cpu|cuda[:N]",
                   help="where k-means and the pairwise step run: auto (cuda when present, "
                        "else faiss), faiss (CPU), or a torch device; cpu and cuda give "
                        "byte-identical outputs")
    p.add_argument("--restart", action="store_true",
                   help="delete the run in --output (its selection files only) and start over; "
                        "without it a rerun resumes, and refuses when the input or config changed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    import json
    import sys

    from pipelines import select

    cfg = select.SelectConfig(
        k=args.k, threshold=args.threshold, clip_band=args.clip_band,
        centroid_band=args.centroid_band, target=args.target, seed=args.seed, keep=args.keep,
        policy=args.policy, eps=args.eps, uid_column=args.uid_column, buckets=args.buckets,
        two_level=args.two_level, method=args.method, dedup_scope=args.dedup_scope,
        device=args.device)
    if args.policy == "semdedup" and args.keep == "middle":
        cfg = select.SelectConfig(**{**cfg.to_dict(), "keep": "far"})
    stats = select.run(cfg, args.input, args.output, progress=not args.quiet,
                       restart=args.restart)
    try:
        from pipelines import report
        select.release_memory()
        report.write(args.output)
    except ImportError:
        pass
    f = stats["funnel"]
    print(" -> ".join(f"{k} {v:,}" for k, v in f.items()), file=sys.stderr)
    print(json.dumps({"coreset": f"{args.output}/coreset.parquet",
                      "rejects": f"{args.output}/rejects.parquet",
                      "manifest": f"{args.output}/manifest.json",
                      "coreset_rows": stats["coreset_rows"]}))
    return 0
