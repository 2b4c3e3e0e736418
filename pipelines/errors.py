"""Typed errors. Library code raises these; the CLI prints one line and exits non-zero."""
from __future__ import annotations

import contextlib
import contextvars


class WarrenError(Exception):
    """Base of every error Warren reports to a user as one clear line."""


class InputError(WarrenError):
    """Bad input data: names the file, and the row and field where known."""

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None,
                 field: str | None = None):
        self.path, self.row, self.field = path, row, field
        where = []
        if path is not None:
            where.append(str(path))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


class ConfigError(WarrenError):
    """An invalid configuration; collects every problem before raising."""

    def __init__(self, problems: list[str] | str, *, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(self.problems))


class ManifestError(WarrenError):
    """A manifest that is missing, malformed, or whose tables do not match their hashes."""


class MissingDependencyError(WarrenError):
    """An optional heavy dependency is not installed."""

    def __init__(self, package: str, purpose: str):
        super().__init__(f"{purpose} needs '{package}': install it with `pip install {package}` "
                         "(or `make install`, which installs everything Warren uses)")


class OutputError(WarrenError):
    """An output that cannot be written (read-only, not a folder, disk full, ...)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"cannot write {path}: {reason}; free space (or fix the folder) and "
                         "rerun the same command to resume")

    def __reduce__(self):  # picklable (Dask workers send errors back to the flow)
        return (type(self), (self.path, self.reason))


# How a hint names a setting depends on the command in use: `warren select` takes `--k`,
# `warren curate` takes `--set select.k=`. Library code writes `setting("select.k")`; each
# command sets the style once (flows.cli) before running.
_SETTING_STYLE = contextvars.ContextVar("setting_style", default="flag")


def set_setting_style(style: str) -> None:
    """'flag' (`--k`), or 'set' (`--set select.k=`)."""
    if style not in ("flag", "set"):
        raise ValueError(style)
    _SETTING_STYLE.set(style)


@contextlib.contextmanager
def setting_style(style: str):
    """`set_setting_style` for the body of a `with` only (a flow run in-process must
    not change the hints of what the caller does next)."""
    if style not in ("flag", "set"):
        raise ValueError(style)
    token = _SETTING_STYLE.set(style)
    try:
        yield
    finally:
        _SETTING_STYLE.reset(token)


def setting(path: str) -> str:
    """A config field (dotted path, e.g. 'select.k') as the user types it right now."""
    if _SETTING_STYLE.get() == "set":
        return f"--set {path}="
    return "--" + path.rsplit(".", 1)[-1].replace("_", "-")
