"""A mix recipe: which sources go in, what is filtered out, how many are taken.

A recipe is a YAML file (see configs/mix/) loaded into the frozen dataclasses below.
Unknown keys are errors naming the key; every problem is collected, then raised once as
ConfigError.

Paths: `data_root` is relative to the recipe file; source paths and `image_root` are
relative to `data_root`. `load(..., data_root=DIR)` (CLI: `--data-root`) points the same
recipe at another folder, and `image_root=` (`--image-root`) overrides the image root.

Order of decisions for each record (each drop lands in rejects with its reason):
    parse and normalise -> validate (format, turns, <image>, image path, lengths)
    -> include/exclude -> image file (present, header readable) -> task identifier (a
    source's `task`) -> exact duplicate by content (dedup: exact) -> count / fraction
    (seeded). Ids are never a reason: they repeat in the real files.
"""
from __future__ import annotations

import dataclasses
import copy
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines import config
from pipelines.mix import tasks
from pipelines.errors import ConfigError
from pipelines.mix.readers import FORMATS, Format


@dataclass(frozen=True)
class Rule:
    """Matches a record when every condition given matches (conditions are ANDed).

    id: regular expression that must match the whole id; image: regular expression
    searched in the image reference (records without an image never match it);
    has_image: whether the record has an image; fields: exact values of fields of the
    source record (e.g. {"source": "sharegpt"} for a file that marks its parts)."""
    name: str | None = None
    id: str | None = None
    image: str | None = None
    has_image: bool | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        p = []
        for key in ("id", "image"):
            pat = getattr(self, key)
            if pat is not None:
                try:
                    re.compile(pat)
                except re.error as e:
                    p.append(f"{key} pattern {pat!r} is not a valid regular expression ({e})")
        if self.has_image is not None and not isinstance(self.has_image, bool):
            p.append(f"has_image must be true or false (got {self.has_image!r})")
        if not isinstance(self.fields, dict):
            p.append("fields must be a mapping of field name to value")
        if self.id is None and self.image is None and self.has_image is None and not self.fields:
            p.append("a rule needs at least one of id, image, has_image, fields")
        if p:
            raise ConfigError(p)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = [f"{k}={getattr(self, k)!r}" for k in ("id", "image", "has_image")
                 if getattr(self, k) is not None]
        parts += [f"{k}={v!r}" for k, v in self.fields.items()]
        return " ".join(parts)


@dataclass(frozen=True)
class Source:
    """One input file. `count` (exact number) or `fraction` (of the valid records, rounded
    to nearest) take a seeded sample; neither keeps every valid record.

    `task` tags each image record's first human turn with a TinyGPT-V task identifier
    (`<image>\\n[vqa] ...`, see pipelines.mix.tasks): None leaves the text as it is, "auto"
    picks the task by `pipelines.mix.tasks.infer`'s rules, a task name ("vqa", "caption",
    ...) uses that task. Text-only records stay untagged (TinyGPT-V mixes them in as
    plain instructions); a record already tagged with another identifier is rejected
    (bad_task)."""
    name: str
    path: str
    format: Format = "llava"
    id_prefix: str = ""                  # prepended to every id (to keep two sources' ids apart)
    include: tuple[Rule, ...] = ()       # empty: everything; else records matching any rule
    exclude: tuple[Rule, ...] = ()       # records matching any rule are dropped
    count: int | None = None
    fraction: float | None = None
    task: str | None = None              # None: untagged; "auto": tasks.infer; or a task name

    def __post_init__(self):
        p = []
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name or ""):
            p.append(f"source name {self.name!r} must be letters, digits, '.', '_' or '-'")
        if self.format not in FORMATS:
            p.append(f"source {self.name}: format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        if self.count is not None and self.fraction is not None:
            p.append(f"source {self.name}: give count or fraction, not both")
        if self.count is not None and (not isinstance(self.count, int) or self.count < 0):
            p.append(f"source {self.name}: count must be an integer >= 0 (got {self.count!r})")
        if self.fraction is not None and not (isinstance(self.fraction, (int, float))
                                              and 0.0 <= self.fraction <= 1.0):
            p.append(f"source {self.name}: fraction must be in [0, 1] (got {self.fraction!r})")
        if self.task is not None and self.task != "auto" and self.task not in tasks.TASKS:
            p.append(f"source {self.name}: task must be auto, null or one of the known tasks "
                     f"{', '.join(tasks.TASKS)} (got {self.task!r})")
        if p:
            raise ConfigError(p)


@dataclass(frozen=True)
class Limits:
    """Per-record length limits (characters over all turn values, and turns)."""
    max_chars: int = 131_072
    max_turns: int = 256
    min_turns: int = 2

    def __post_init__(self):
        p = []
        if self.min_turns < 2 or self.min_turns % 2:
            p.append(f"limits.min_turns must be an even number >= 2 (got {self.min_turns})")
        if self.max_turns < self.min_turns:
            p.append(f"limits.max_turns must be >= min_turns (got {self.max_turns})")
        if self.max_chars < 1:
            p.append(f"limits.max_chars must be >= 1 (got {self.max_chars})")
        if p:
            raise ConfigError(p)


@dataclass(frozen=True)
class Recipe:
    name: str
    sources: tuple[Source, ...]
    seed: int = 0
    dedup: Literal["exact", "none"] = "exact"
    image_root: str | None = None        # folder the `image` references resolve under
    check_images: bool = True            # reject records whose image file is missing or unreadable
    limits: Limits = Limits()
    path: str | None = None              # the recipe file, for reports

    def __post_init__(self):
        p = []
        if not self.sources:
            p.append("a recipe needs at least one source")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            p.append(f"source names must be unique (repeated: {', '.join(dup)})")
        if self.dedup not in ("exact", "none"):
            p.append(f"dedup must be exact or none (got {self.dedup!r})")
        if not isinstance(self.seed, int):
            p.append(f"seed must be an integer (got {self.seed!r})")
        if p:
            raise ConfigError(p)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------ loading
# One configuration mechanism for curate, mix and train (pipelines.config): every value
# checked against its field's type, unknown keys named, each group's own checks run,
# all problems collected under dotted names (`sources[0].count: ...`).

def _resolve(base: str, p: str) -> str:
    return p if "://" in p or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def from_dict(doc: dict, *, base: str = ".", data_root: str | None = None,
              image_root: str | None = None, path: str | None = None) -> Recipe:
    """Build a Recipe from a parsed YAML mapping. Relative `data_root` resolves against
    `base` (the recipe's folder); source paths and image_root against the data root."""
    if not isinstance(doc, dict):
        raise ConfigError("a recipe must be a mapping", source=path)
    doc = copy.deepcopy(doc)
    if "path" in doc:           # set from the file name, never by the recipe itself
        raise ConfigError("path: unknown key (the recipe's own path is where it was read from)",
                          source=path)
    root_value = doc.pop("data_root", ".")
    root = data_root if data_root is not None else _resolve(base, str(root_value))
    for s in doc.get("sources") or []:
        if isinstance(s, dict) and isinstance(s.get("path"), str):
            s["path"] = _resolve(root, s["path"])
    if image_root is not None:
        doc["image_root"] = image_root
    elif isinstance(doc.get("image_root"), str):
        doc["image_root"] = _resolve(root, doc["image_root"])
    doc["path"] = path
    return config.build(Recipe, doc, source=path)


def load(path: str, *, data_root: str | None = None, image_root: str | None = None) -> Recipe:
    """Read a recipe YAML file (see the module docstring for how paths resolve)."""
    doc = config.load_yaml(path, what="recipe")
    return from_dict(doc, base=os.path.dirname(os.path.abspath(path)), data_root=data_root,
                     image_root=image_root, path=str(path))
