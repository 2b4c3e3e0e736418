"""The `warren` command line.

Each sub-command lives in its own module under `flows.commands` (or is named below with
its module) exposing `HELP`, `add_arguments(parser)` and `run(args) -> int`, and
optionally `EPILOG()` (text for its `--help`, built only when help is shown). Modules
keep heavy imports inside `run`, so `warren --help` stays fast and a bad config is
reported before Prefect, torch or open_clip are imported.

Errors: a WarrenError, or an OSError (a read-only or full disk, an output path that is a
file), becomes one line on stderr and exit code 2; `-v` adds the traceback. Anything
else is a bug and keeps Python's traceback.
"""
from __future__ import annotations

import argparse
import contextvars
import errno
import importlib
import os
import re
import sys

from pipelines.errors import OutputError, WarrenError

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
    "export": "flows.commands.export",
    "tokens": "flows.commands.tokens",
    "import-tinygptv": "flows.commands.import_tinygptv",
    "report": "flows.commands.report",
    "eval": "flows.commands.eval",
    "ablate": "flows.commands.ablate",
}

# errno values that mean "this output cannot be written here"
WRITE_ERRORS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST,
                errno.EISDIR, errno.EACCES, errno.EPERM, errno.EFBIG}


def _available() -> dict:
    mods = {}
    for name, modname in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:  # a real import error inside the module
                raise
    return mods


class _Parser(argparse.ArgumentParser):
    """A sub-command parser whose epilog is built only when help is printed."""
    epilog_fn = None

    def format_help(self) -> str:
        if self.epilog_fn is not None:
            self.epilog, self.epilog_fn = self.epilog_fn(), None
        return super().format_help()


def version() -> str:
    """The installed package version, plus the git commit of a checkout."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version as dist_version
    try:
        v = dist_version("warren")
    except PackageNotFoundError:
        v = "unknown"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                           capture_output=True, text=True, timeout=5)
        sha = r.stdout.strip() if r.returncode == 0 else ""
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
            sha += "-dirty" if dirty else ""
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return f"warren {v}" + (f" (git {sha})" if sha else "")


class _Version(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the version (and git commit) and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warren", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, third-party and Prefect logs, tracebacks")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    for name, mod in _available().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.epilog_fn = getattr(mod, "EPILOG", None)
        p.set_defaults(_run=mod.run)
    return parser


def one_line(text: str) -> str:
    """A message as one line (YAML and library errors can carry newlines)."""
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def error_line(e: BaseException) -> str:
    """What the user reads for an error Warren reports (not a bug)."""
    if isinstance(e, WarrenError):
        return one_line(str(e))
    path = getattr(e, "filename", None)
    reason = e.strerror or str(e)
    if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
        return one_line(str(OutputError(path or "the output", reason)))
    return one_line(f"{path}: {reason}" if path else reason)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows import console
    console.setup_logging(args.verbose)
    try:
        # in a context of its own: what a command sets (the hint style) ends with it,
        # also when main() is called in-process (tests, notebooks)
        return int(contextvars.copy_context().run(args._run, args) or 0)
    except (WarrenError, OSError) as e:
        if args.verbose:
            import traceback
            traceback.print_exc()
        print(f"warren {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"warren {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
