"""`warren curate`: the whole curation flow from a config file.

Order matters for the person waiting: the config, the output folder and the run's
input are checked first (no Prefect, no torch: a mistake is on screen in well under
2 s), then the Prefect API server starts (Warren's own, which dies with this command,
unless PREFECT_API_URL names one), then the flow runs with per-stage progress.
"""
from __future__ import annotations

HELP = "curate a pool: download, embed (open_clip), select (Bunny's rule), coreset images, report"


def EPILOG() -> str:  # noqa: N802 — the CLI's name for a lazily built epilog
    from flows.curate_config import help_text
    return help_text()


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="YAML config (see configs/curate/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set select.k=100 (repeatable; the "
                        "value is YAML; every key and its default is listed below)")
    p.add_argument("--output", default=None, help="run folder (overrides the config's output)")
    p.add_argument("--dask-address", default=None, metavar="tcp://HOST:PORT",
                   help="run the mapped steps on this Dask scheduler (prefect-dask)")
    p.add_argument("--restart", action="store_true",
                   help="start over in an output folder that holds a run of another config or "
                        "input (removes only what Warren wrote there)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    import json
    import sys

    from flows import apiserver, console
    from flows import curate_config
    from pipelines.errors import set_setting_style

    set_setting_style("set")          # library hints read `--set select.k=`
    # validate before a flow run exists: a bad config is one line, not a failed run
    cfg = curate_config.load_config(args.config, args.overrides, output=args.output,
                                    dask_address=args.dask_address)
    curate_config.prepare(cfg, restart_run=args.restart)
    if cfg.embed.random_init and cfg.source.kind == "urls":
        print(f"note: embed.model {cfg.embed.model} is randomly initialised (no pretrained "
              "weights); set embed.pretrained for real runs", file=sys.stderr)
    console.enable(not args.quiet)
    with apiserver.api():
        from flows import curate
        console.quiet_prefect(args.verbose)
        try:
            summary = curate.curate(config=args.config, overrides=args.overrides,
                                    output=args.output, dask_address=args.dask_address)
        except OSError as e:       # a disk that filled, a folder that went read-only
            from flows.cli import WRITE_ERRORS
            from pipelines.errors import OutputError
            if e.errno in WRITE_ERRORS:
                raise OutputError(e.filename or cfg.output, e.strerror or str(e)) from e
            raise
        finally:
            from pipelines import embed
            embed.shutdown()
    print(curate.summarize(summary), file=sys.stderr)
    print(json.dumps(summary["paths"]))
    return 0
