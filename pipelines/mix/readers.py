"""Streaming readers for instruction sources, and the adapters that turn each source
format into one conversation shape.

Files
    A top-level JSON list (LLaVA, SVIT, WizardLM releases) is parsed element by element
    from text chunks with `json.JSONDecoder.raw_decode`, so a 1 GB list never sits in
    memory as Python objects. JSON Lines is read line by line. The file kind is sniffed
    from the first non-blank character (`[` = list, anything else = JSON Lines), not
    trusted from the extension. Each element comes with its raw text (the exact slice
    of the file), which the rejects table keeps. Bytes that are not UTF-8 stay in the
    text as escapes (surrogateescape), so one bad record is a reject `bad_text`, not the
    end of the file.

Formats (what a record looks like once parsed)
    llava     {"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]}
              (LLaVA-665K, SVIT-mix-665K, ALLaVA, ShareGPT4V...). Text-only records have
              no "image" key.
    sharegpt  {"id" | "idx", "conversations" | "messages": [...]}: turns as from/value or
              role/content; the roles user/assistant (OpenAI style) are read as
              human/gpt.
    wizardlm  evol-instruct: {"instruction", "input"?, "output"} (70K) or
              {"idx", "conversations"} (V2 143K/196K). The 70K release has no id field:
              the id becomes "<source name>-<row>".

Conversations are normalised the way the reference trainers and data scripts do it
(LLaVA's and Bunny's `preprocess_*`, FastChat's `clean_sharegpt`, which produced the
ShareGPT part of LLaVA-665K): one leading gpt turn is dropped (LLaVA/Bunny skip it), one
trailing human turn is dropped (LLaVA/Bunny render it but train on none of it; FastChat
drops it), and a leading `system` turn (or a top-level "system" string) becomes the
record's `system` field. Each change sets a bit in `Record.norm` (counted in stats.json).
Roles other than human/gpt/system (e.g. ShareGPT's "bing", "chatgpt") are rejected
(`bad_role`): LLaVA/Bunny stop with a KeyError on them and FastChat drops the record.

A problem in one record never stops a file: the reader yields a `Bad` for it with a
reason code and detail, and the builder writes it to the rejects table. Only a JSON
list that is broken as a whole (its element boundaries cannot be found any more) raises
InputError naming the file and the character offset.
"""
from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from typing import Iterator, Literal

from pipelines import storage
from pipelines.errors import InputError

Format = Literal["llava", "sharegpt", "wizardlm"]
FORMATS = ("llava", "sharegpt", "wizardlm")

CHUNK_CHARS = 1 << 20            # text read per refill of the JSON-list buffer
MAX_RECORD_CHARS = 64 << 20      # one element larger than this is a broken file
RECORD_TEXT_LIMIT = 4_000        # raw text kept in the rejects table per record

_NUMBER_CHARS = frozenset("0123456789.eE+-")
# Role names as the reference trainers read them; `sharegpt` also reads OpenAI's.
ROLES = {"human": "human", "gpt": "gpt", "system": "system"}
OPENAI_ROLES = {"user": "human", "assistant": "gpt"}
SHAREGPT_ROLES = ROLES | OPENAI_ROLES

# Record.norm bits: what normalisation changed (stats.json counts them).
LEADING_GPT = 1          # a leading gpt turn was dropped
TRAILING_HUMAN = 2       # a trailing human turn was dropped
SYSTEM = 4               # a system turn (or field) became the `system` field
IMAGE_PATH = 8           # the image path was rewritten (backslashes, ./, //)
NORM_NAMES = {LEADING_GPT: "leading_gpt_dropped", TRAILING_HUMAN: "trailing_human_dropped",
              SYSTEM: "system_kept", IMAGE_PATH: "image_path_normalised"}



@dataclass(frozen=True)
class Record:
    """One conversation in Warren's shape. `raw` is the parsed source object (for filters
    on extra fields) and `text` its raw text in the file (for the rejects table)."""
    row: int
    id: str
    image: str | None
    conversations: list[dict]
    raw: dict
    system: str | None = None
    norm: int = 0
    text: str | None = None
    span: tuple[int, int] | None = None     # (byte offset, bytes) of `text` in the file


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


# ------------------------------------------------------------------------ text

def safe_text(s: str | None, limit: int | None = RECORD_TEXT_LIMIT) -> str | None:
    """`s` as text that encodes to UTF-8 (for Arrow): undecodable bytes kept as
    escapes by the reader become U+FFFD, lone surrogates become backslash escapes; cut
    to `limit` characters."""
    if s is None:
        return None
    if limit is not None:
        s = s[:limit]
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_string(s: str) -> str | None:
    """Why `s` is not valid Unicode text (a lone surrogate, or bytes that were not
    UTF-8), or None."""
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(s[e.start])
        if 0xDC80 <= code <= 0xDCFF:
            # how the reader keeps a byte that is not UTF-8 (surrogateescape); a JSON
            # escape of a lone low surrogate looks the same, and is as unusable
            return f"a byte that is not UTF-8 (0x{code - 0xDC00:02x}) at character {e.start}"
        return f"a lone surrogate (\\u{code:04x}) at character {e.start}"


# ------------------------------------------------------------------------ files

def _open_text(path: str) -> tuple[io.TextIOWrapper, int]:
    """The file as text (undecodable bytes kept as surrogate escapes, newlines as they
    are) and the byte offset where the text starts (3 after a UTF-8 byte order mark)."""
    fs, p = storage.filesystem(path)
    try:
        raw = fs.open(p, "rb")
    except FileNotFoundError:
        raise InputError("source file not found", path=path) from None
    start = 3 if raw.read(3) == b"\xef\xbb\xbf" else 0
    raw.seek(start)
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline=""), start


def nbytes(text: str) -> int:
    """Bytes `text` took in the file (the reader decodes with surrogateescape)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))


def sniff(path: str) -> Literal["json", "jsonl"]:
    """'json' when the file is one top-level JSON list, else 'jsonl'."""
    f, _ = _open_text(path)
    with f:
        while True:
            block = f.read(4096)
            if not block:
                return "jsonl"
            stripped = block.lstrip()
            if stripped:
                return "json" if stripped[0] == "[" else "jsonl"


def iter_json_list(path: str, chunk_chars: int = CHUNK_CHARS) \
        -> Iterator[tuple[int, object, str, None, tuple[int, int]]]:
    """Yield (index, element, raw text, None, (byte offset, bytes)) for each element of a
    top-level JSON list, reading `chunk_chars` characters at a time. Memory holds the
    current chunk plus one element. Raises InputError if the list itself is broken
    (unbalanced, truncated, not a list)."""
    decoder = json.JSONDecoder()
    f, byte_pos = _open_text(path)          # byte_pos: the file offset of buf[pos]
    with f:
        buf, pos, consumed, eof = "", 0, 0, False

        def refill() -> bool:
            nonlocal buf, pos, consumed, eof
            if eof:
                return False
            block = f.read(chunk_chars)
            if not block:
                eof = True
                return False
            consumed += pos              # drop what is parsed, keep the tail
            buf = buf[pos:] + block
            pos = 0
            return True

        def skip_ws() -> str | None:
            nonlocal pos, byte_pos
            while True:
                start = pos
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                byte_pos += pos - start          # JSON whitespace is ASCII: one byte a character
                if pos < len(buf):
                    return buf[pos]
                if not refill():
                    return None

        if skip_ws() != "[":
            raise InputError("not a JSON list (expected '[' at the start)", path=path)
        pos += 1
        byte_pos += 1
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
                byte_pos += 1
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
            text = buf[pos:end]
            size = nbytes(text)
            yield index, obj, text, None, (byte_pos, size)
            index += 1
            byte_pos += size
            pos = end
            expect_value = False


def iter_jsonl(path: str) -> Iterator[tuple[int, object, str, str | None, tuple[int, int]]]:
    """Yield (index, object, raw line, None, (byte offset, bytes)) per non-blank line, or
    (index, None, raw line, error, span) for a line that is not valid JSON. `index`
    counts non-blank lines."""
    fs, p = storage.filesystem(path)
    try:
        f = fs.open(p, "rb")
    except FileNotFoundError:
        raise InputError("source file not found", path=path) from None
    with f:
        index = offset = 0
        for n, line in enumerate(f):
            start = offset
            offset += len(line)
            if n == 0 and line.startswith(b"\xef\xbb\xbf"):     # a UTF-8 byte order mark
                line, start = line[3:], start + 3
            if not line.strip():
                continue
            line = line.rstrip(b"\r\n")
            text = line.decode("utf-8", "surrogateescape")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield index, None, text, e.msg, (start, len(line))
            else:
                yield index, obj, text, None, (start, len(line))
            index += 1


def iter_raw(path: str) -> Iterator[tuple[int, object, str, str | None, tuple[int, int]]]:
    """Elements of a JSON list or lines of a JSON Lines file, sniffed from the content:
    (index, parsed object, raw text, parse error or None, (byte offset, bytes) of the
    raw text in the file)."""
    return iter_json_list(path) if sniff(path) == "json" else iter_jsonl(path)


def raw_texts(path: str, spans: list[tuple[int, int]], limit: int = RECORD_TEXT_LIMIT) -> list[str]:
    """The raw text of elements given as (byte offset, byte length) spans, each cut to
    `limit` characters and made safe for Arrow: how the rejects table gets the text of a
    record dropped after its source was read (a duplicate, a sampled-out record)."""
    fs, p = storage.filesystem(path)
    out = []
    with fs.open(p, "rb") as f:
        for offset, length in spans:
            f.seek(offset)
            data = f.read(min(length, 4 * limit))             # a character is at most 4 bytes
            out.append(safe_text(data.decode("utf-8", "surrogateescape"), limit))
    return out


# --------------------------------------------------------------------- formats

def raw_text(obj) -> str:
    """A parsed record as JSON text, cut to RECORD_TEXT_LIMIT characters (for records
    that have no raw text of their own)."""
    try:
        text = json.dumps(obj, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(obj)
    return safe_text(text)


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


def _turns(obj: dict, row: int, rid: str | None, roles: dict, keys=("conversations",)) \
        -> tuple[list[dict], str | None, int] | Bad:
    """(turns as [{"from": human|gpt, "value": str}], system, norm bits), normalised as
    the module docstring says; no judging of order or content beyond that (validate's
    job)."""
    key = keys[0] if keys[0] in obj else next((k for k in keys[1:] if k in obj), None)
    if key is None:
        return Bad(row, "missing_field", f"no '{keys[0]}'", rid)
    conv = obj[key]
    if not isinstance(conv, list):
        return Bad(row, "bad_field", f"'{key}' is {type(conv).__name__}, not a list", rid)
    out = []
    system, norm = None, 0
    top = obj.get("system")
    if top is not None and not isinstance(top, str):
        return Bad(row, "bad_field", f"'system' is {type(top).__name__}, not text", rid)
    for k, turn in enumerate(conv):
        if type(turn) is not dict:
            if not isinstance(turn, dict):
                return Bad(row, "bad_field", f"turn {k} is {type(turn).__name__}, not an object", rid)
        role = turn.get("from")
        if role is None:
            role = turn.get("role")
        value = turn.get("value")
        if value is None:
            value = turn.get("content")
        if type(value) is not str:
            what = "no 'value'" if value is None else f"a {type(value).__name__} 'value'"
            return Bad(row, "missing_field" if value is None else "bad_field", f"turn {k} has {what}", rid)
        if role == "human" or role == "gpt":             # the common case, as written
            out.append({"from": role, "value": value})
            continue
        if not isinstance(role, str):
            return Bad(row, "missing_field", f"turn {k} has no 'from'", rid)
        mapped = roles.get(role.strip().lower())
        if mapped is None:
            return Bad(row, "bad_role", f"turn {k} is from {role!r} (LLaVA and Bunny train on human "
                                        "and gpt turns only, after one leading system turn)", rid)
        if mapped == "system":
            if k != 0:
                return Bad(row, "bad_role", f"turn {k} is a system turn inside the conversation "
                                            "(only a leading system turn is kept)", rid)
            if top is not None:
                return Bad(row, "bad_field", "both a 'system' field and a system turn", rid)
            system, norm = value, norm | SYSTEM
            continue
        out.append({"from": mapped, "value": value})
    if system is None and top is not None:
        system, norm = top, norm | SYSTEM
    if system is not None and not system.strip():
        system = None                  # an empty system prompt is no system prompt
    if out and out[0]["from"] == "gpt":
        out, norm = out[1:], norm | LEADING_GPT
    if out and out[-1]["from"] == "human":
        out, norm = out[:-1], norm | TRAILING_HUMAN
    return out, system, norm


def normalise_image_path(ref: str) -> str:
    """A relative image path with posix separators and without `./`, `//` or `a/..`
    detours (what the trainer joins to the image root). Absolute paths and URLs are
    returned unchanged for validate to reject."""
    if "\\" not in ref and "//" not in ref and "/." not in ref and not ref.startswith(".") \
            and not ref.endswith("/"):
        return ref                                   # already normal (the common case)
    p = ref.replace("\\", "/")
    if p.startswith("/") or "://" in p or (len(p) > 1 and p[1] == ":"):
        return ref
    return posixpath.normpath(p)


def _image(obj: dict, row: int, rid: str) -> tuple[str | None, int] | Bad:
    img = obj.get("image")
    if img is None:
        return None, 0
    if not isinstance(img, str):
        kind = "a list (multi-image records are not supported)" if isinstance(img, list) \
            else type(img).__name__
        return Bad(row, "bad_field", f"'image' is {kind}", rid)
    if not img.strip():
        return None, 0
    norm = normalise_image_path(img)
    return norm, (IMAGE_PATH if norm != img else 0)


def _check_text(rec: Record) -> Bad | None:
    """bad_text for a record holding a lone surrogate or bytes that were not UTF-8
    (both are non-ASCII, so ASCII strings, the common case, need one fast scan)."""
    named = (("id", rec.id), ("image", rec.image), ("system", rec.system))
    for k, value in enumerate([v for _, v in named] + [t["value"] for t in rec.conversations]):
        if value is None or value.isascii():
            continue
        why = bad_string(value)
        if why is not None:
            name = named[k][0] if k < 3 else f"turn {k - 3}"
            return Bad(rec.row, "bad_text", f"{name} holds {why}", safe_text(rec.id, None), rec.text)
    return None


def to_record(fmt: Format, source: str, row: int, obj: object, text: str | None = None,
              span: tuple[int, int] | None = None) -> Record | Bad:
    """Turn one parsed element of a `fmt` source into a Record, or say why not. `text`
    is the element's raw text and `span` where it is in the file (for the rejects
    table)."""
    if text is None:
        text = raw_text(obj)
    rec = _to_record(fmt, source, row, obj, text, span)
    if isinstance(rec, Bad):
        return Bad(rec.row, rec.reason, rec.detail, rec.id, text)
    return _check_text(rec) or rec


def _to_record(fmt: Format, source: str, row: int, obj: object, text: str, span: tuple[int, int] | None) \
        -> Record | Bad:
    if not isinstance(obj, dict):
        return Bad(row, "not_an_object", f"element is {type(obj).__name__}")
    if fmt == "wizardlm" and "conversations" not in obj and ("instruction" in obj or "output" in obj):
        rid = _id_of(obj, ("idx", "id")) or f"{source}-{row}"
        instruction, output, extra = obj.get("instruction"), obj.get("output"), obj.get("input")
        for name, v in (("instruction", instruction), ("output", output)):
            if v is None:
                return Bad(row, "missing_field", f"no '{name}'", rid)
            if not isinstance(v, str):
                return Bad(row, "bad_field", f"'{name}' is {type(v).__name__}", rid)
        if extra is not None and not isinstance(extra, str):
            return Bad(row, "bad_field", f"'input' is {type(extra).__name__}", rid)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return Record(row, rid, None, [{"from": "human", "value": prompt},
                                       {"from": "gpt", "value": output}], obj, None, 0, text, span)
    if fmt == "llava":
        rid = _id_of(obj, ("id",))
        if rid is None:
            return Bad(row, "missing_field", "no 'id'")
        conv = _turns(obj, row, rid, ROLES)
    elif fmt in ("sharegpt", "wizardlm"):
        rid = _id_of(obj, ("id", "idx"))
        if rid is None:
            if fmt == "sharegpt":
                return Bad(row, "missing_field", "no 'id'")
            rid = f"{source}-{row}"
        conv = _turns(obj, row, rid, SHAREGPT_ROLES if fmt == "sharegpt" else ROLES,
                      ("conversations", "messages"))
    else:  # pragma: no cover — the recipe validates formats
        raise ValueError(fmt)
    if isinstance(conv, Bad):
        return conv
    turns, system, norm = conv
    image = _image(obj, row, rid)
    if isinstance(image, Bad):
        return image
    ref, image_norm = image
    return Record(row, rid, ref, turns, obj, system, norm | image_norm, text, span)


def read(path: str, fmt: Format, source: str) -> Iterator[Record | Bad]:
    """Every element of a source file as a Record or a Bad, in file order."""
    for row, obj, text, err, span in iter_raw(path):
        if err is not None:
            bad = bad_string(text)
            if bad is not None:
                yield Bad(row, "bad_text", f"line holds {bad}", None, text)
            else:
                yield Bad(row, "malformed_json", err, None, text)
        else:
            yield to_record(fmt, source, row, obj, text, span)
