"""`warren serve`: serve the curate deployments (one per config) to a Prefect server."""
from __future__ import annotations

HELP = "serve the curate flow's deployments (one per configs/curate/*.yaml) until stopped"


def add_arguments(p) -> None:
    p.add_argument("--configs", default="configs/curate",
                   help="folder of curate configs; each becomes deployment curate/<file stem>")
    p.add_argument("--limit", type=int, default=None, help="most flow runs at once")


def run(args) -> int:
    from flows import console, serve
    from pipelines.errors import set_setting_style

    set_setting_style("set")
    # a server's console: Prefect's runner lines (runs submitted, finished) stay, the
    # HTTP request lines of its client (httpx at INFO) do not, unless -v
    console.show_prefect()
    serve.serve(args.configs, limit=args.limit)
    return 0
