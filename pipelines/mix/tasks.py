"""Task identifiers for multi-task instruction data (TinyGPT-V / MiniGPT-v2).

A multi-task record names its task in its first human turn, right after the image:

    <image>\\n[refer] give me the location of the red square

The six identifiers are `[vqa]`, `[caption]`, `[refer]`, `[grounding]`, `[identify]` and
`[detection]`. Boxes are written `{<x1><y1><x2><y2>}` with integer corners on a 0-100
grid (fractions of the image width and height x 100, truncated as TinyGPT-V does; rounding
on request), several boxes of one phrase
joined by `<delim>`, and a grounded phrase as `<p>phrase</p> {<..><..><..><..>}`.

This module tags MIX-schema records (plain dicts or a pyarrow table) with these
identifiers: from a `task` value on the record (a column, or a field of the source
record), or else from the simple rules in `infer`. Text-only records are never tagged:
TinyGPT-V mixes them in as plain instructions. The trainer side (templates that render
and mask tagged conversations) is `mllm.multitask`; this module imports nothing from
`mllm` and nothing from Prefect.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa

from pipelines import schemas
from pipelines.errors import ConfigError, InputError

IMAGE_TOKEN = "<image>"
TASKS = ("vqa", "caption", "refer", "grounding", "identify", "detection")
GRID = 100
# Bump when `infer`'s rules or the tagged text change: the mix builder keys its
# prepared sources on it, so a rerun re-tags them instead of reusing stale tags.
RULES_VERSION = 1

# One box: {<x1><y1><x2><y2>} with integer corners.
BOX = re.compile(r"\{<(\d{1,3})><(\d{1,3})><(\d{1,3})><(\d{1,3})>\}")
# The identifier a turn starts with, after the image placeholder and whitespace.
_LEADING_TAG = re.compile(r"^\s*\[([a-z_]+)\]")
_PHRASE = re.compile(r"<p>.*?</p>")
_CAPTION_PROMPT = re.compile(r"\b(caption|(briefly|shortly) describe|describe (this|the) (image|picture|photo) "
                             r"(briefly|in a few words|shortly))", re.IGNORECASE)
_DETECT_PROMPT = re.compile(r"\b(detect|detection|find all|locate all|list all objects)\b", re.IGNORECASE)

# Sources whose records are image-caption pairs (stage-1 style data).
CAPTION_SOURCES = frozenset({"coreset", "stage1", "laion", "cc3m", "cc12m", "sbu", "coco-caption",
                             "coco_caption", "textcaps"})


def identifier(task: str) -> str:
    """`vqa` -> `[vqa]` (raises ConfigError for an unknown task)."""
    check_task(task)
    return f"[{task}]"


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    return task


def split_image(text: str) -> tuple[str, str]:
    """('<image>\\n', rest) when `text` starts with the image placeholder (and the
    whitespace after it), else ('', text)."""
    stripped = text.lstrip()
    if stripped.startswith(IMAGE_TOKEN):
        head_len = len(text) - len(stripped) + len(IMAGE_TOKEN)
        rest = text[head_len:]
        ws = len(rest) - len(rest.lstrip())
        return text[:head_len + ws], rest[ws:]
    return "", text


def task_in(text: str) -> str | None:
    """The task identifier a human turn starts with (after `<image>`), or None.
    An unknown bracketed word (`[foo]`) is not an identifier."""
    _, rest = split_image(text)
    m = _LEADING_TAG.match(rest)
    return m.group(1) if m and m.group(1) in TASKS else None


def tag_text(text: str, task: str) -> str:
    """Put `[task] ` at the start of a human turn, after `<image>\\n` if it has one.
    A turn that already carries an identifier must carry the same one."""
    check_task(task)
    present = task_in(text)
    if present == task:
        return text
    if present is not None:
        raise InputError(f"turn is already tagged [{present}], cannot tag it [{task}]")
    head, rest = split_image(text)
    return f"{head}[{task}] {rest}"


def tag_conversation(conversations: list[dict], task: str | None) -> list[dict]:
    """A copy of the conversation with the first human turn tagged (None: unchanged)."""
    out = [dict(t) for t in conversations]
    if task is None:
        return out
    for turn in out:
        if turn.get("from") == "human":
            turn["value"] = tag_text(turn["value"], task)
            break
    return out


# ---------------------------------------------------------------------- boxes

def format_box(box, width: float, height: float, grid: int = GRID,
               rounding: str = "truncate") -> str:
    """Pixel box (x1, y1, x2, y2) -> `{<x1><y1><x2><y2>}` on a 0..grid grid, clamped to
    the image. `rounding`: "truncate" (TinyGPT-V / MiniGPT-v2: `int(x / width * 100)`,
    coco_dataset.py) or "round" (to the nearest grid line)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if width <= 0 or height <= 0:
        raise InputError(f"image size {width}x{height} must be positive")
    if x2 < x1 or y2 < y1:
        raise InputError(f"box {tuple(box)} has x2 < x1 or y2 < y1")
    if rounding not in ("truncate", "round"):
        raise ConfigError(f"unknown box rounding {rounding!r} (truncate or round)")
    to_int = int if rounding == "truncate" else (lambda v: int(round(v)))

    def q(v: float, size: float) -> int:
        return min(grid, max(0, to_int(v / size * grid)))
    return f"{{<{q(x1, width)}><{q(y1, height)}><{q(x2, width)}><{q(y2, height)}>}}"


def parse_boxes(text: str, grid: int = GRID) -> list[tuple[int, int, int, int]]:
    """Every `{<x1><y1><x2><y2>}` in `text`, in order, as grid integers; a corner off
    the grid raises InputError."""
    boxes = []
    for m in BOX.finditer(text):
        b = tuple(int(v) for v in m.groups())
        if max(b) > grid:
            raise InputError(f"box {m.group(0)} is off the 0-{grid} grid")
        boxes.append(b)
    return boxes


def box_to_pixels(box, width: float, height: float, grid: int = GRID) -> tuple[float, ...]:
    """Grid box -> pixel box (the inverse of format_box up to its truncation/rounding)."""
    x1, y1, x2, y2 = box
    return (x1 / grid * width, y1 / grid * height, x2 / grid * width, y2 / grid * height)


def format_grounded(phrase: str, boxes, width: float, height: float, rounding: str = "truncate") -> str:
    """`<p>phrase</p> {<..>}<delim>{<..>}`: a phrase and its boxes (MiniGPT-v2)."""
    return f"<p>{phrase}</p> " + "<delim>".join(format_box(b, width, height, rounding=rounding)
                                                 for b in boxes)


# ---------------------------------------------------------------------- rules

def infer(conversations: list[dict], has_image: bool, source: str = "") -> tuple[str | None, str]:
    """(task or None, the rule that decided). First match wins:

    1. the first human turn already starts with an identifier
    2. no image: None (text-only instructions stay untagged)
    3. a box in the first question: identify
    4. a grounded phrase (`<p>..</p>` + box) in an answer: detection when the question
       asks to detect / find all, else grounding
    5. an answer made of boxes only: refer
    6. a caption source, or a caption-style prompt: caption
    7. otherwise: vqa
    """
    humans = [t["value"] for t in conversations if t.get("from") == "human"]
    answers = [t["value"] for t in conversations if t.get("from") == "gpt"]
    first = humans[0] if humans else ""
    present = task_in(first)
    if present is not None:
        return present, "tagged"
    if not has_image:
        return None, "text-only"
    if BOX.search(first):
        return "identify", "box in question"
    if any(_PHRASE.search(a) and BOX.search(a) for a in answers):
        return ("detection", "detect prompt") if _DETECT_PROMPT.search(first) else \
            ("grounding", "grounded phrase in answer")
    if answers and all(BOX.search(a) and not BOX.sub("", a).replace("<delim>", "").strip(" .,")
                       for a in answers):
        return "refer", "answer is boxes"
    if source.lower() in CAPTION_SOURCES:
        return "caption", "caption source"
    if _CAPTION_PROMPT.search(first):
        return "caption", "caption prompt"
    return "vqa", "default"


def task_for(record: dict) -> tuple[str | None, str]:
    """The task of one MIX record: its `task` value when it has one (a column, or a
    field of the source record; '' or None means 'use the rules'), else `infer`."""
    given = record.get("task")
    if given:
        check_task(given)
        return given, "task column"
    return infer(record["conversations"], bool(record.get("has_image")), record.get("source") or "")


def tag(conversations: list[dict], has_image: bool, source: str = "",
        task: str | None = "auto") -> list[dict]:
    """One record's conversation, tagged: `task` names the task, "auto" applies the
    rules of `infer`, None leaves it untagged. A text-only record (`has_image` false) is
    returned untagged whatever `task` says: TinyGPT-V mixes text-only instructions in
    without an identifier. Raises InputError when the first human turn already carries a
    different identifier. (The mix builder's per-source hook.)"""
    if task is None or not has_image:
        return [dict(t) for t in conversations]
    if task == "auto":
        task = infer(conversations, has_image, source)[0]
    return tag_conversation(conversations, task)


@dataclass
class TagStats:
    rows: int = 0
    by_task: dict[str, int] = field(default_factory=dict)
    by_rule: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "by_task": dict(sorted(self.by_task.items())),
                "by_rule": dict(sorted(self.by_rule.items()))}


def tag_records(records, stats: TagStats | None = None) -> list[dict]:
    """Tagged copies of MIX records (dicts). A record's `task` key, if any, is dropped
    from the output (the MIX schema has no such column; the tag is in the text)."""
    stats = stats if stats is not None else TagStats()
    out = []
    for rec in records:
        try:
            task, rule = task_for(rec)
            conv = tag_conversation(rec["conversations"], task)
        except (InputError, ConfigError) as e:
            raise InputError(f"id {rec.get('id')!r}: {e}", field="conversations") from None
        row = {k: v for k, v in rec.items() if k != "task"}
        row["conversations"] = conv
        out.append(row)
        stats.rows += 1
        key = task or "none"
        stats.by_task[key] = stats.by_task.get(key, 0) + 1
        stats.by_rule[rule] = stats.by_rule.get(rule, 0) + 1
    return out


def tag_table(table: pa.Table, tasks: list[str | None] | None = None) -> tuple[pa.Table, dict]:
    """Tag a MIX table. `tasks` (one per row; None = use the rules) overrides, as does a
    `task` column in `table`. Returns (table in schema MIX, stats)."""
    rows = table.to_pylist()
    if tasks is not None:
        if len(tasks) != len(rows):
            raise InputError(f"{len(tasks)} tasks for {len(rows)} rows")
        for rec, t in zip(rows, tasks):
            if t:
                rec["task"] = t
    stats = TagStats()
    tagged = tag_records(rows, stats)
    return pa.Table.from_pylist(tagged, schema=schemas.MIX), stats.to_dict()
