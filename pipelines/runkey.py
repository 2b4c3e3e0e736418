"""What a run was made from: input fingerprints and output/input separation.

A resumable run records the fingerprint of its input next to its outputs. A rerun into
the same folder resumes only when the input is unchanged; otherwise it refuses in one
line naming what changed (the user passes `--restart`, or another output folder).

    fp = runkey.fingerprint([input_dir])          # file list, sizes, mtimes
    runkey.check_same(saved_fp, fp, output)       # raises StaleRunError when it changed
    runkey.check_apart(output, [input_dir])       # raises ConfigError when they overlap

Sizes and modification times (nanoseconds) are what `make` and rsync trust: cheap on
millions of files, and any rewrite of a file changes them.
"""
from __future__ import annotations

import hashlib
import json
import os

from pipelines.errors import ConfigError, WarrenError


class StaleRunError(WarrenError):
    """The output folder holds a run made from a different input."""


def _entries(path: str) -> list[list]:
    """[relative path, size, mtime_ns] for a file, or for every file under a folder
    (hidden names and Warren's own temporaries skipped), sorted by path."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return [[os.path.basename(path), st.st_size, st.st_mtime_ns]]
    if not os.path.isdir(path):
        return []
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:  # removed while we walked
                continue
            out.append([os.path.relpath(full, path).replace(os.sep, "/"), st.st_size,
                        st.st_mtime_ns])
    out.sort()
    return out


def fingerprint(paths: list[str] | str) -> dict:
    """The fingerprint of one or more input paths (files or folders): per path its
    file count, bytes and a digest of the (name, size, mtime) listing. Remote paths
    (with a protocol) are recorded by name only."""
    if isinstance(paths, str):
        paths = [paths]
    out = {}
    for p in paths:
        key = str(p)
        if "://" in key and not key.startswith("file://"):
            out[key] = {"files": None, "bytes": None, "digest": None}
            continue
        entries = _entries(key.removeprefix("file://"))
        digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
        out[key] = {"files": len(entries), "bytes": sum(e[1] for e in entries),
                    "digest": digest, "listing": entries if len(entries) <= 2000 else None}
    return out


def describe_change(old: dict, new: dict) -> str | None:
    """One line saying how two fingerprints differ, or None when they are equal."""
    if set(old) != set(new):
        return (f"the input paths changed ({', '.join(sorted(old)) or 'none'} -> "
                f"{', '.join(sorted(new)) or 'none'})")
    for key in sorted(old):
        a, b = old[key], new[key]
        if a.get("digest") == b.get("digest"):
            continue
        la, lb = a.get("listing"), b.get("listing")
        if la is not None and lb is not None:
            na, nb = {e[0]: e[1:] for e in la}, {e[0]: e[1:] for e in lb}
            added = sorted(set(nb) - set(na))
            removed = sorted(set(na) - set(nb))
            changed = sorted(n for n in set(na) & set(nb) if na[n] != nb[n])
            parts = []
            for what, names in (("added", added), ("removed", removed), ("changed", changed)):
                if names:
                    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
                    parts.append(f"{what} {names[0]}{more}")
            if parts:
                return f"{key}: {'; '.join(parts)}"
        return (f"{key}: {a.get('files')} files / {a.get('bytes')} bytes -> "
                f"{b.get('files')} files / {b.get('bytes')} bytes (or modification times changed)")
    return None


def check_same(saved: dict | None, current: dict, output: str, restart_flag: str = "--restart") -> None:
    """Raise StaleRunError when `output` holds a run made from another input."""
    if saved is None:
        return
    change = describe_change(saved, current)
    if change:
        raise StaleRunError(f"{output} holds a run made from a different input ({change}); "
                            f"pass {restart_flag} to start over, or choose another output folder")


def _norm(p: str) -> str:
    return os.path.realpath(os.path.abspath(str(p).removeprefix("file://")))


def check_apart(output: str, inputs: list[str], what: str = "--output") -> None:
    """Refuse an output folder that is, contains or lies inside one of the inputs."""
    if "://" in str(output) and not str(output).startswith("file://"):
        return
    o = _norm(output)
    for i in inputs:
        if not i or ("://" in str(i) and not str(i).startswith("file://")):
            continue
        n = _norm(i)
        if o == n:
            raise ConfigError(f"{what} {output} is the input {i}: choose a separate folder")
        if o.startswith(n.rstrip(os.sep) + os.sep):
            raise ConfigError(f"{what} {output} lies inside the input {i}: choose a folder outside it")
        if n.startswith(o.rstrip(os.sep) + os.sep):
            raise ConfigError(f"{what} {output} contains the input {i}: choose a folder that "
                              "does not hold the input")
