"""One configuration mechanism for curate, mix and train: dataclass groups from YAML.

A config is a tree of dataclasses (frozen or not). `build(Config, mapping)` walks the
type hints of every field, checks and coerces each YAML value against its hint, names
unknown keys, runs each group's own `__post_init__` checks, and collects every problem
with its dotted field name before raising one ConfigError:

    cfg = config.build(CurateConfig, config.load_yaml(path), source=path,
                       overrides=["select.k=100"])          # --set values, parsed as YAML

    -> ConfigError: "run.yaml: select.k: expected an integer, got 'abc'; source.kind: 'ftp'
       is not one of ['urls', 'embeddings']"

Defaults live on the dataclass fields and nowhere else; `describe(Config)` lists every
settable key with its type, default and the field's comment or docstring (what
`--help` prints). Why not pydantic (which comes with Prefect): the groups are frozen
stdlib dataclasses owned by the steps that use them, whose `__post_init__` checks
already say what is wrong; pydantic validates stdlib dataclasses only field by field
(it stops at the first `__post_init__` that raises, ignores unknown keys unless every
class carries its config, and coerces `true` to 1 for an int), and `pipelines/` must not
depend on what only Prefect brings. This module is the litgpt-style loader the trainer
already had, generalised.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal

from pipelines.errors import ConfigError, InputError

_MISSING = dataclasses.MISSING
_YAML_BOOL_WORDS = {False: ("no", "n", "off", "false"), True: ("yes", "y", "on", "true")}


# ------------------------------------------------------------------------- reading
def load_yaml(path: str, what: str = "config") -> dict:
    """A YAML file that must hold a mapping (an empty file is an empty mapping)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(f"{what} file not found", path=path) from None
    except IsADirectoryError:
        raise InputError(f"{what} is a folder, not a YAML file", path=path) from None
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})", path=path) from None
    except yaml.YAMLError as e:
        raise InputError(f"not valid YAML ({yaml_problem(e)})", path=path) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InputError(f"a {what} must be a mapping of groups (got {type(doc).__name__})",
                         path=path)
    return doc


def yaml_problem(e: Exception) -> str:
    """A YAML error as one line: what went wrong and where."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def parse_override(text: str, flag: str = "--set") -> tuple[str, Any]:
    """'select.k=100' -> ('select.k', 100); the value is read as YAML (`null`, `[0.4, 0.6]`,
    `true`). Malformed text is a ConfigError naming the key."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"{flag} {text!r}: expected KEY=VALUE (e.g. select.k=100)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{flag} {text!r}: the key must be a dotted field name (e.g. select.k)")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: {value!r} is not a valid YAML value ({yaml_problem(e)}); "
                          f"quote it as a string or fix it ({flag} {key}=...)") from None


def apply_overrides(doc: dict, overrides: list[str] | dict[str, Any] | None,
                    flag: str = "--set") -> dict:
    """A copy of `doc` with dotted overrides set (strings are parsed as `key=value`)."""
    import copy

    doc = copy.deepcopy(doc or {})
    items = overrides.items() if isinstance(overrides, dict) else \
        [parse_override(o, flag) for o in (overrides or [])]
    for key, value in items:
        node = doc
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{key}: '{'.'.join(parts[:i + 1])}' is a value, not a group")
            node = nxt
        node[parts[-1]] = value
    return doc


# ------------------------------------------------------------------------- building
def is_config_class(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def build(cls_or_default: Any, data: Any = None, *, source: str | None = None,
          overrides: list[str] | dict[str, Any] | None = None, where: str = "") -> Any:
    """Build and check a config from a YAML mapping (plus dotted overrides); raise one
    ConfigError with every problem. `cls_or_default` is a dataclass, or an instance whose
    values are the defaults to start from."""
    if overrides:
        data = apply_overrides(data if isinstance(data, dict) else {}, overrides)
    problems: list[str] = []
    out = merge(cls_or_default, data, where, problems)
    if problems or out is None:
        raise ConfigError(problems or ["invalid configuration"], source=source)
    return out


def merge(target: Any, data: Any, where: str, problems: list[str]) -> Any:
    """`data` (a mapping) onto `target` (a dataclass, or an instance of one holding the
    defaults); problems are appended with their dotted names. Returns the instance, or
    None when this group could not be built."""
    cls = target if isinstance(target, type) else type(target)
    instance = None if isinstance(target, type) else target
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping of options, got {data!r}")
        return instance
    fields = _fields(cls)
    hints = _hints(cls)
    before = len(problems)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = f"{where}.{key}" if where else str(key)
        if key not in fields:
            problems.append(f"{sub}: unknown key (known: {', '.join(sorted(fields))})")
            continue
        tp = hints[key]
        if is_config_class(tp):
            base = getattr(instance, key) if instance is not None else _default(fields[key])
            kwargs[key] = merge(tp if base is _MISSING else base, value, sub, problems)
        else:
            kwargs[key] = check_value(value, tp, sub, problems)
    if instance is None:
        for name, f in fields.items():
            if name in kwargs:
                continue
            if f.default is _MISSING and f.default_factory is _MISSING:
                msg = f.metadata.get("required")
                problems.append(_prefixed(where, msg) if msg else
                                f"{where + '.' if where else ''}{name}: required")
    if len(problems) > before:
        return instance         # do not run a group's checks on values of the wrong type
    try:
        return dataclasses.replace(instance, **kwargs) if instance is not None else cls(**kwargs)
    except ConfigError as e:
        problems.extend(_prefixed(where, p) for p in e.problems)
    except (TypeError, ValueError) as e:
        problems.append(_prefixed(where, str(e)))
    return instance


def _prefixed(where: str, problem: str) -> str:
    """A group's own message, named by the group unless it already names it."""
    if not where:
        return problem
    last = where.rsplit(".", 1)[-1]
    for head in (where, last):
        if problem.startswith((head + ".", head + ":", head + " ")):
            return problem if head == where else f"{where[:-len(last)]}{problem}"
    return f"{where}: {problem}"


def check_value(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check (and coerce) one YAML value against a type hint; a mismatch is appended to
    `problems` as 'where: expected ..., got ...'."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            return _bad(where, value, type_name(tp), problems)
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and (is_config_class(inner[0]) or typing.get_origin(inner[0]) is Literal):
            return check_value(value, inner[0], where, problems)
        for a in inner:
            trial: list[str] = []
            out = check_value(value, a, where, trial)
            if not trial:
                return out
        return _bad(where, value, type_name(tp), problems)
    if value is None:
        return _bad(where, value, type_name(tp), problems)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted no/off/yes/on as a boolean: take the word back
            words = _YAML_BOOL_WORDS[value]
            same = [a for a in allowed if isinstance(a, str) and a.lower() in words]
            if len(same) == 1:
                return same[0]
        hint = ""
        if isinstance(value, bool) and any(isinstance(a, str) for a in allowed):
            hint = " (YAML reads yes/no/on/off unquoted as true/false: quote the word)"
        problems.append(f"{where}: {value!r} is not one of {list(allowed)}{hint}")
        return value
    if origin in (list, tuple, typing.Sequence, _abc_sequence()):
        if not isinstance(value, (list, tuple)):
            return _bad(where, value, type_name(tp), problems)
        args = typing.get_args(tp)
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(value) != len(args):
                return _bad(where, value, type_name(tp), problems)
            items = [check_value(v, a, f"{where}[{i}]", problems) for i, (v, a) in
                     enumerate(zip(value, args))]
        else:
            item = args[0] if args else Any
            items = [check_value(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            return _bad(where, value, "a mapping", problems)
        return dict(value)
    if is_config_class(tp):
        return merge(tp, value, where, problems)
    if tp is float:
        if isinstance(value, bool):
            return _bad(where, value, "a number", problems)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):     # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        return _bad(where, value, "a number", problems)
    if tp is int:
        if isinstance(value, bool):
            return _bad(where, value, "an integer", problems)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):     # 1e5, 100_000
            try:
                f = float(value.replace("_", ""))
                if f.is_integer() and math.isfinite(f):
                    return int(f)
            except ValueError:
                pass
        return _bad(where, value, "an integer", problems)
    if tp is bool:
        if not isinstance(value, bool):
            return _bad(where, value, "true or false", problems)
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)          # a path or name YAML read as a number
        return _bad(where, value, "a string", problems)
    return value


def _abc_sequence():
    import collections.abc
    return collections.abc.Sequence


def _bad(where: str, value: Any, what: str, problems: list[str]) -> Any:
    got = "null" if value is None else repr(value)
    problems.append(f"{where}: expected {what}, got {got}")
    return value


def type_name(tp: Any) -> str:
    """A type hint as a user reads it: 'an integer or null', 'one of a|b'."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if origin in (list, tuple, typing.Sequence, _abc_sequence()):
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return "[" + ", ".join(type_name(a) for a in args) + "]"
        return f"a list of {type_name(args[0]) if args else 'values'}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            Any: "any value"}.get(tp, getattr(tp, "__name__", str(tp)))


# ------------------------------------------------------------------------- describing
def to_yaml_value(v: Any) -> str:
    """A default as YAML shows it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isinf(v):
        return ".inf" if v > 0 else "-.inf"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(to_yaml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return repr(v) if v == "" or v.lower() in ("no", "yes", "on", "off", "null", "true",
                                                    "false") else v
    return str(v)


def describe(cls_or_default: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every settable field, groups flattened."""
    cls = cls_or_default if isinstance(cls_or_default, type) else type(cls_or_default)
    inst = None if isinstance(cls_or_default, type) else cls_or_default
    docs = field_docs(cls)
    hints = _hints(cls)
    rows = []
    for name, f in _fields(cls).items():
        key = f"{prefix}{name}"
        tp = hints[name]
        default = getattr(inst, name) if inst is not None else _default(f)
        if is_config_class(tp):
            rows += describe(default if default is not _MISSING else tp, key + ".")
            continue
        shown = "(required)" if default is _MISSING else to_yaml_value(default)
        rows.append((key, type_name(tp), shown, docs.get(name, "")))
    return rows


def help_text(cls_or_default: Any, title: str, width: int = 100,
              skip: tuple[str, ...] = ()) -> str:
    """`describe` as an argparse epilog: one entry per key, its default and what it is."""
    lines = [title]
    for key, tp, default, doc in describe(cls_or_default):
        if key.startswith(skip):
            continue
        lines.append(f"  {key} = {default}   ({tp})")
        if doc:
            lines += textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """What the source says about each field: the docstring under it, or the comment on
    its line (and comment lines continuing it)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        pass
    body = ast.parse(src).body[0].body
    out: dict[str, str] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                and isinstance(nxt.value.value, str):
            out[node.target.id] = " ".join(nxt.value.value.split())
            continue
        end = node.end_lineno or node.lineno
        parts = [comments[end]] if end in comments else []
        row = end + 1
        # comment-only lines indented past the field continue its comment
        while parts and row <= len(lines) and row in comments and \
                lines[row - 1].lstrip().startswith("#") and \
                len(lines[row - 1]) - len(lines[row - 1].lstrip()) > node.col_offset:
            parts.append(comments[row])
            row += 1
        if parts:
            out[node.target.id] = " ".join(parts)
    return out
