"""Per-record checks, the image checks, and the duplicate and sampling keys.

A record is trainable (the same rules `mllm.templates.check_conversation` enforces, so
nothing that passes here fails in the trainer) when, after the reader's normalisation
(one leading gpt turn and one trailing human turn dropped, a leading system turn moved
to `system`, image paths with posix separators):
- it has between `min_turns` and `max_turns` turns, alternating human, gpt, human, ...
  and ending with gpt; every value is non-empty text;
- an image record has exactly one `<image>`, in its first human turn; a text-only
  record has none (nor has its system prompt);
- its image reference is a relative path inside the image root, naming a file that is
  there and whose header reads as an image (pipelines.mix.images);
- its text (turns and system prompt) is at most `max_chars` characters.

Reason codes (the part before ':' in the rejects table's `reason`; stats count by code):
    malformed_json, not_an_object, missing_field, bad_field, bad_role, bad_text (readers)
    too_few_turns, too_many_turns, not_alternating, empty_turn, too_long,
    image_tag_missing, image_tag_misplaced, image_tag_without_image,
    bad_image_path, image_not_found, image_unreadable                        (here)
    excluded, bad_task, duplicate, sampled_out                               (build)
"""
from __future__ import annotations

import hashlib
import posixpath

from pipelines.mix.images import ImageIndex
from pipelines.mix.readers import LEADING_GPT, TRAILING_HUMAN, Record
from pipelines.mix.recipe import Limits

IMAGE_TOKEN = "<image>"


def check_image_ref(ref: str) -> str | None:
    """Why a (normalised) image reference cannot resolve under a root (absolute, leaves
    it), or None."""
    if ref.startswith(("/", "\\")) or "://" in ref or (len(ref) > 1 and ref[1] == ":"):
        return f"image {ref!r} is absolute; it must be relative to the image root"
    if not ref.startswith(".") and "/." not in ref and "\\" not in ref:
        return None                   # normalised by the reader, nothing leaves the root
    norm = posixpath.normpath(ref.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return f"image {ref!r} leaves the image root"
    if norm == ".":
        return f"image {ref!r} names the image root itself, not a file"
    return None


def _after(rec: Record) -> str:
    """What normalisation did to the turns, for a reason's detail."""
    done = [what for bit, what in ((LEADING_GPT, "a leading gpt turn"),
                                   (TRAILING_HUMAN, "a trailing human turn")) if rec.norm & bit]
    return f" (after dropping {' and '.join(done)})" if done else ""


def check(rec: Record, limits: Limits) -> tuple[str, str] | None:
    """(reason code, detail) for the first rule `rec` breaks, or None if it is valid.
    The image file itself is checked later (`image_problem`), after the recipe's rules."""
    conv = rec.conversations
    n = len(conv)
    if n < limits.min_turns:
        return "too_few_turns", f"{n} turns{_after(rec)} (need at least {limits.min_turns})"
    if n > limits.max_turns:
        return "too_many_turns", f"{n} turns (limit {limits.max_turns})"
    chars = 0
    n_tags = 0
    for k, turn in enumerate(conv):
        want = "human" if k % 2 == 0 else "gpt"
        if turn["from"] != want:
            return "not_alternating", f"turn {k}{_after(rec)} is from {turn['from']!r}, expected {want!r}"
        value = turn["value"]
        if not value.strip():
            return "empty_turn", f"turn {k} is empty"
        chars += len(value)
        count = value.count(IMAGE_TOKEN)
        if count and k > 0:
            return "image_tag_misplaced", f"<image> in turn {k} (only the first human turn may hold it)"
        n_tags += count
    if n % 2:  # pragma: no cover — the reader drops a trailing human turn
        return "not_alternating", f"{n} turns: the last turn is from 'human', expected 'gpt'"
    if rec.system is not None:
        if IMAGE_TOKEN in rec.system:
            return "image_tag_misplaced", "<image> in the system prompt"
        chars += len(rec.system)
    if chars > limits.max_chars:
        return "too_long", f"{chars} characters (limit {limits.max_chars})"
    if rec.image is None:
        if n_tags:
            return "image_tag_without_image", "text-only record contains <image>"
        return None
    if n_tags == 0:
        return "image_tag_missing", "image record without <image> in its first human turn"
    if n_tags > 1:
        return "image_tag_misplaced", f"{n_tags} <image> tags in the first turn (expected 1)"
    bad = check_image_ref(rec.image)
    if bad:
        return "bad_image_path", bad
    return None


def image_problem(ref: str, images: ImageIndex) -> tuple[str, str] | None:
    """(reason code, detail) when the image file is not there or not readable (its
    header verdict, see pipelines.mix.images), else None."""
    if ref not in images:
        return "image_not_found", f"{ref!r} is not under the image root"
    why = images.problem(ref)
    if why is not None:
        return "image_unreadable", why
    return None


def text_chars(conversations: list[dict], system: str | None = None) -> int:
    return sum(len(t["value"]) for t in conversations) + (len(system) if system else 0)


def digest(image: str | None, conversations: list[dict], system: str | None = None) -> bytes:
    """128-bit key of the normalised record: image reference, system prompt, and each
    turn's role and whitespace-collapsed text. Equal keys = exact duplicates (a false
    match needs a 128-bit collision: below 1e-20 even among 1e9 records)."""
    h = hashlib.blake2b(digest_size=16)
    h.update((image or "").encode())
    if system is not None:
        h.update(b"\x02" + " ".join(system.split()).encode())
    for t in conversations:
        h.update(b"\x00" + t["from"].encode() + b"\x01" + " ".join(t["value"].split()).encode())
    return h.digest()


def sample_key(seed: int, source: str, rid: str, content: bytes) -> int:
    """Seeded 64-bit sampling key of a record: which records a count/fraction keeps
    depends on the seed, the ids and the content only (records sharing an id differ by
    content), not on file order or chunking."""
    h = hashlib.blake2b(f"{seed}\x00{source}\x00{rid}\x00".encode() + content, digest_size=8)
    return int.from_bytes(h.digest(), "little")
