"""The `warren` command line.

Each sub-command lives in its own module under `flows.commands` (or is named below with
its module) exposing `HELP`, `add_arguments(parser)` and `run(args) -> int`. Modules keep
heavy imports inside `run`, so `warren --help` stays fast. WarrenError becomes one line
on stderr and exit code 2; never a bare traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pipelines.errors import WarrenError

# Prefect's temporary server (used when PREFECT_API_URL is unset) takes ~13 s to start
# here and its default 20 s limit fails on a busy 2-core machine; analytics need the net.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

COMMANDS = {
    "demo": "flows.commands.demo",
    "synth-embeddings": "flows.commands.synth_embeddings",
    "select": "flows.commands.select",
    "curate": "flows.commands.curate",
    "serve": "flows.commands.serve",
    "mix": "flows.commands.mix",
    "train": "flows.commands.train",
    "generate": "flows.commands.generate",
    "report": "flows.commands.report",
    "eval": "flows.commands.eval",
    "ablate": "flows.commands.ablate",
}


def _available() -> dict:
    mods = {}
    for name, modname in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:  # a real import error inside the module
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warren", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in _available().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        return int(args._run(args) or 0)
    except WarrenError as e:
        print(f"warren {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"warren {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
