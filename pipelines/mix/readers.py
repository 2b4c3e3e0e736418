"""Streaming readers for instruction sources, and the adapters that turn each source
format into one conversation shape.

Files
    A top-level JSON list (LLaVA, SVIT, WizardLM releases) is parsed element by element
    from text chunks with `json.JSONDecoder.raw_decode`, so a 1 GB list never sits in
    memory as Python objects. JSON Lines is read line by line. The file kind is sniffed
    from the first non-blank character (`[` = list, anything else = JSON Lines), not
    trusted from the extension.

Formats (what a record looks like once parsed)
    llava     {"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]}
              (LLaVA-665K, SVIT-mix-665K, ALLaVA, ShareGPT4V...). Text-only records have
              no "image" key.
    sharegpt  {"id" | "idx", "conversations" | "messages": [...]}: turns as from/value or
              role/content; roles user/assistant/chatgpt/... are mapped to human/gpt.
    wizardlm  evol-instruct: {"instruction", "input"?, "output"} (70K) or
              {"idx", "conversations"} (V2 143K/196K). The 70K release has no id field:
              the id becomes "<source name>-<row>".

A problem in one record never stops a file: the reader yields a `Bad` for it with a
reason code and detail, and the builder writes it to the rejects table. Only a JSON
list that is broken as a whole (its element boundaries cannot be found any more) raises
InputError naming the file and the character offset.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Iterator, Literal

from pipelines import storage
from pipelines.errors import InputError

Format = Literal["llava", "sharegpt", "wizardlm"]
FORMATS = ("llava", "sharegpt", "wizardlm")

CHUNK_CHARS = 1 << 20            # text read per refill of the JSON-list buffer
MAX_RECORD_CHARS = 64 << 20      # one element larger than this is a broken file
RECORD_TEXT_LIMIT = 4_000        # raw text kept in the rejects table per bad record

_NUMBER_CHARS = frozenset("0123456789.eE+-")
HUMAN_ROLES = frozenset({"human", "user"})
GPT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bing", "bard", "model"})


@dataclass(frozen=True)
class Record:
    """One conversation in Warren's shape. `raw` is the parsed source object (for filters
    on extra fields); it is not written anywhere."""
    row: int
    id: str
    image: str | None
    conversations: list[dict]
    raw: dict


@dataclass(frozen=True)
class Bad:
    """A record that could not be turned into a Record: reason code, detail, raw text."""
    row: int
    reason: str
    detail: str
    id: str | None = None
    text: str | None = None

    @property
    def message(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


# ------------------------------------------------------------------------ files

def _open_text(path: str):
    fs, p = storage.filesystem(path)
    try:
        raw = fs.open(p, "rb")
    except FileNotFoundError:
        raise InputError("source file not found", path=path) from None
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="")


def sniff(path: str) -> Literal["json", "jsonl"]:
    """'json' when the file is one top-level JSON list, else 'jsonl'."""
    with _open_text(path) as f:
        while True:
            try:
                block = f.read(4096)
            except UnicodeDecodeError as e:
                raise InputError(f"not UTF-8 text ({e.reason})", path=path) from None
            if not block:
                return "jsonl"
            stripped = block.lstrip()
            if stripped:
                return "json" if stripped[0] == "[" else "jsonl"


def iter_json_list(path: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[tuple[int, object, str | None]]:
    """Yield (index, element, None) for each element of a top-level JSON list, reading
    `chunk_chars` characters at a time. Memory holds the current chunk plus one element.
    Raises InputError if the list itself is broken (unbalanced, truncated, not a list)."""
    decoder = json.JSONDecoder()
    with _open_text(path) as f:
        buf, pos, consumed, eof = "", 0, 0, False

        def refill() -> bool:
            nonlocal buf, pos, consumed, eof
            if eof:
                return False
            try:
                block = f.read(chunk_chars)
            except UnicodeDecodeError as e:
                raise InputError(f"not UTF-8 text near character {consumed + len(buf)} ({e.reason})",
                                 path=path) from None
            if not block:
                eof = True
                return False
            consumed += pos              # drop what is parsed, keep the tail
            buf = buf[pos:] + block
            pos = 0
            return True

        def skip_ws() -> str | None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not refill():
                    return None

        if skip_ws() != "[":
            raise InputError("not a JSON list (expected '[' at the start)", path=path)
        pos += 1
        index = 0
        expect_value = True            # after '[' or ','
        while True:
            c = skip_ws()
            if c is None:
                raise InputError(f"JSON list ends without ']' after {index} records (truncated file?)",
                                 path=path)
            if c == "]":
                if expect_value and index > 0:
                    raise InputError(f"trailing ',' before ']' at character {consumed + pos}", path=path)
                pos += 1
                if skip_ws() is not None:
                    raise InputError(f"extra data after the JSON list at character {consumed + pos}",
                                     path=path)
                return
            if c == ",":
                if expect_value:
                    raise InputError(f"unexpected ',' at character {consumed + pos}", path=path)
                pos += 1
                expect_value = True
                continue
            if not expect_value:
                raise InputError(f"expected ',' or ']' at character {consumed + pos} "
                                 f"(after record {index - 1})", path=path)
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    # Most likely the element continues in the next chunk; a real error
                    # persists at EOF (or once one element exceeds MAX_RECORD_CHARS).
                    if len(buf) - pos > MAX_RECORD_CHARS or not refill():
                        raise InputError(f"record {index} is not valid JSON ({e.msg} at character "
                                         f"{consumed + e.pos}); the list cannot be read past it",
                                         path=path) from None
                    continue
                if (not eof and isinstance(obj, (int, float)) and len(buf) - end < 64
                        and (end == len(buf) or buf[end] in _NUMBER_CHARS)):
                    # a number cut at the chunk boundary decodes "successfully" as its
                    # prefix ("-0" of "-0.5e-3"): read on, and decode it again
                    if refill():
                        continue
                break
            yield index, obj, None
            index += 1
            pos = end
            expect_value = False


def iter_jsonl(path: str) -> Iterator[tuple[int, object, str | None]]:
    """Yield (index, object, None) per non-blank line, or (index, None, error) for a
    line that is not valid JSON (the error text includes the line, cut short)."""
    fs, p = storage.filesystem(path)
    try:
        f = fs.open(p, "rb")
    except FileNotFoundError:
        raise InputError("source file not found", path=path) from None
    with f:
        index = 0
        for n, line in enumerate(f):
            if n == 0 and line.startswith(b"\xef\xbb\xbf"):     # a UTF-8 byte order mark
                line = line[3:]
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                text = line.decode("utf-8", errors="replace").rstrip("\r\n")
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                yield index, None, f"{msg}\x00{text[:RECORD_TEXT_LIMIT]}"
            else:
                yield index, obj, None
            index += 1


def iter_raw(path: str) -> Iterator[tuple[int, object, str | None]]:
    """Elements of a JSON list or lines of a JSON Lines file, sniffed from the content."""
    return iter_json_list(path) if sniff(path) == "json" else iter_jsonl(path)


# --------------------------------------------------------------------- formats

def raw_text(obj) -> str:
    """The record as JSON text, cut to RECORD_TEXT_LIMIT characters (for the rejects table)."""
    try:
        text = json.dumps(obj, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(obj)
    return text[:RECORD_TEXT_LIMIT]


def _id_of(obj: dict, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        v = obj.get(k)
        if isinstance(v, bool):
            continue
        if isinstance(v, str) and v.strip():
            return v
        if isinstance(v, int):
            return str(v)
    return None


def _turns(obj: dict, row: int, rid: str | None, keys=("conversations",)) -> list[dict] | Bad:
    """Turns as [{"from": human|gpt, "value": str}]; role names mapped; no judging of
    order or content here (that is validate's job)."""
    key = next((k for k in keys if k in obj), None)
    if key is None:
        return Bad(row, "missing_field", f"no '{keys[0]}'", rid, raw_text(obj))
    conv = obj[key]
    if not isinstance(conv, list):
        return Bad(row, "bad_field", f"'{key}' is {type(conv).__name__}, not a list", rid, raw_text(obj))
    out = []
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return Bad(row, "bad_field", f"turn {k} is {type(turn).__name__}, not an object", rid,
                       raw_text(obj))
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if not isinstance(role, str):
            return Bad(row, "missing_field", f"turn {k} has no 'from'", rid, raw_text(obj))
        if not isinstance(value, str):
            what = "no 'value'" if value is None else f"a {type(value).__name__} 'value'"
            return Bad(row, "missing_field" if value is None else "bad_field", f"turn {k} has {what}",
                       rid, raw_text(obj))
        r = role.strip().lower()
        if r in HUMAN_ROLES:
            role = "human"
        elif r in GPT_ROLES:
            role = "gpt"
        else:
            return Bad(row, "bad_role", f"turn {k} is from {role!r}", rid, raw_text(obj))
        out.append({"from": role, "value": value})
    return out


def _image(obj: dict, row: int, rid: str) -> str | None | Bad:
    img = obj.get("image")
    if img is None:
        return None
    if not isinstance(img, str):
        kind = "a list (multi-image records are not supported)" if isinstance(img, list) \
            else type(img).__name__
        return Bad(row, "bad_field", f"'image' is {kind}", rid, raw_text(obj))
    return img if img.strip() else None


def to_record(fmt: Format, source: str, row: int, obj: object) -> Record | Bad:
    """Turn one parsed element of a `fmt` source into a Record, or say why not."""
    if not isinstance(obj, dict):
        return Bad(row, "not_an_object", f"element is {type(obj).__name__}", None, raw_text(obj))
    if fmt == "wizardlm" and "conversations" not in obj and ("instruction" in obj or "output" in obj):
        rid = _id_of(obj, ("idx", "id")) or f"{source}-{row}"
        instruction, output, extra = obj.get("instruction"), obj.get("output"), obj.get("input")
        for name, v in (("instruction", instruction), ("output", output)):
            if v is None:
                return Bad(row, "missing_field", f"no '{name}'", rid, raw_text(obj))
            if not isinstance(v, str):
                return Bad(row, "bad_field", f"'{name}' is {type(v).__name__}", rid, raw_text(obj))
        if extra is not None and not isinstance(extra, str):
            return Bad(row, "bad_field", f"'input' is {type(extra).__name__}", rid, raw_text(obj))
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return Record(row, rid, None, [{"from": "human", "value": prompt},
                                       {"from": "gpt", "value": output}], obj)
    if fmt == "llava":
        rid = _id_of(obj, ("id",))
        if rid is None:
            return Bad(row, "missing_field", "no 'id'", None, raw_text(obj))
        conv = _turns(obj, row, rid)
    elif fmt in ("sharegpt", "wizardlm"):
        rid = _id_of(obj, ("id", "idx"))
        if rid is None:
            if fmt == "sharegpt":
                return Bad(row, "missing_field", "no 'id'", None, raw_text(obj))
            rid = f"{source}-{row}"
        conv = _turns(obj, row, rid, ("conversations", "messages"))
    else:  # pragma: no cover — the recipe validates formats
        raise ValueError(fmt)
    if isinstance(conv, Bad):
        return conv
    image = _image(obj, row, rid)
    if isinstance(image, Bad):
        return image
    return Record(row, rid, image, conv, obj)


def read(path: str, fmt: Format, source: str) -> Iterator[Record | Bad]:
    """Every element of a source file as a Record or a Bad, in file order."""
    for row, obj, err in iter_raw(path):
        if err is not None:
            msg, _, text = err.partition("\x00")
            yield Bad(row, "malformed_json", msg, None, text)
        else:
            yield to_record(fmt, source, row, obj)
