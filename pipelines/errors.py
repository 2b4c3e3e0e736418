"""Typed errors. Library code raises these; the CLI prints one line and exits non-zero."""
from __future__ import annotations


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
