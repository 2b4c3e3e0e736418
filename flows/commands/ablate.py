"""`warren ablate`: arms of one size from one source, one training recipe, one evaluation."""
from __future__ import annotations

HELP = ("same training, different data: coreset vs random (and other selections), each "
        "trained and evaluated alike; ablation.parquet + ablation.html")


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="YAML config (see configs/ablate/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set size=50 (repeatable)")
    p.add_argument("--output", default=None, help="output folder (overrides the config's output)")


def run(args) -> int:
    import json
    import logging
    import sys

    from flows import ablate

    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    ablate.load_config(args.config, args.overrides, output=args.output)  # one line if it is bad
    record = ablate.ablate(config=args.config, overrides=args.overrides, output=args.output)
    for r in record["rows"]:
        if r["arm"] != record["baseline"]:
            print(f"{r['benchmark']}: {r['arm']} - {r['baseline']} = {r['diff']:+.2f} points "
                  f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] (n={r['n']})", file=sys.stderr)
    print(json.dumps(record["outputs"]))
    return 0
