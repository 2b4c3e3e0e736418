"""`warren report RUN_DIR`: (re)write report.html for a curation or selection run."""
from __future__ import annotations

HELP = "write report.html for a curation run folder"


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="a folder with coreset.parquet, rejects.parquet, stats.json")
    p.add_argument("--output", default=None, help="where to write (default RUN_DIR/report.html)")


def run(args) -> int:
    from pipelines import report, storage
    from pipelines.errors import InputError

    if not storage.exists(storage.join(args.run_dir, "stats.json")):
        raise InputError("not a curation run folder (no stats.json)", path=args.run_dir)
    print(report.write(args.run_dir, args.output))
    return 0
