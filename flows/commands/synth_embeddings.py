"""`warren synth-embeddings`: LAION-layout synthetic embeddings with planted truth."""
from __future__ import annotations

HELP = "write LAION-layout synthetic embeddings with planted clusters and near-duplicates"


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="output folder (img_emb/, text_emb/, metadata/, truth.parquet)")
    p.add_argument("--n", type=int, default=20_000, help="rows")
    p.add_argument("--dim", type=int, default=256, help="embedding dimension")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=None, help="files (default: one per 100k rows)")
    p.add_argument("--avg-cluster", type=int, default=None,
                   help="average planted cluster size (default: n/20, at most 20000)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")


def run(args) -> int:
    import json
    import sys

    from pipelines.synth import embeddings as synth

    shards = args.shards or max(1, -(-args.n // 100_000))
    avg = args.avg_cluster or max(10, min(20_000, args.n // 20))
    info = synth.generate(synth.SynthConfig(n=args.n, dim=args.dim, seed=args.seed, shards=shards,
                                            avg_cluster=avg, dtype=args.dtype), args.out)
    print(json.dumps(info), file=sys.stdout)
    return 0
