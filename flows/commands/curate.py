"""`warren curate`: the whole curation flow from a config file."""
from __future__ import annotations

HELP = "curate a pool: download, embed (open_clip), select (Bunny's rule), coreset images, report"


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="YAML config (see configs/curate/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set select.k=100 (repeatable)")
    p.add_argument("--output", default=None, help="run folder (overrides the config's output)")
    p.add_argument("--dask-address", default=None, metavar="tcp://HOST:PORT",
                   help="run the mapped steps on this Dask scheduler (prefect-dask)")


def run(args) -> int:
    import json
    import logging
    import sys

    from flows import curate

    logging.getLogger("httpx").setLevel(logging.WARNING)
    # validate before a flow run exists: a bad config is one line, not a failed run
    cfg = curate.load_config(args.config, args.overrides, output=args.output,
                             dask_address=args.dask_address)
    if cfg.embed.random_init and cfg.source.kind == "urls":
        print(f"note: embed.model {cfg.embed.model} is randomly initialised (no pretrained "
              "weights); set embed.pretrained for real runs", file=sys.stderr)
    summary = curate.curate(config=args.config, overrides=args.overrides, output=args.output,
                            dask_address=args.dask_address)
    print(curate.summarize(summary), file=sys.stderr)
    print(json.dumps(summary["paths"]))
    return 0
