"""Per-record checks, the image index, and the duplicate key.

A record is trainable (the same rules `mllm.templates.check_conversation` enforces, so
nothing that passes here fails in the trainer) when:
- it has between `min_turns` and `max_turns` turns, alternating human, gpt, human, ...
  and ending with gpt; every value is non-empty text;
- an image record has exactly one `<image>`, in its first human turn; a text-only
  record has none;
- its image reference is a relative path that exists under the image root;
- its text is at most `max_chars` characters.

Reason codes (the part before ':' in the rejects table's `reason`; stats count by code):
    malformed_json, not_an_object, missing_field, bad_field, bad_role        (readers)
    too_few_turns, too_many_turns, not_alternating, empty_turn, too_long,
    image_tag_missing, image_tag_misplaced, image_tag_without_image,
    bad_image_path, image_not_found                                           (here)
    excluded, bad_task, duplicate_id, duplicate, sampled_out                  (build)
"""
from __future__ import annotations

import hashlib
import os
import posixpath

from pipelines import storage
from pipelines.mix.readers import Record
from pipelines.mix.recipe import Limits

IMAGE_TOKEN = "<image>"


class ImageIndex:
    """Every file under an image root, listed once into a set of relative paths, so a
    membership test replaces one stat per record (665K stats on a network disk take
    minutes; one walk takes seconds)."""

    def __init__(self, root: str):
        self.root = str(root)
        self.files: set[str] = set()
        if "://" in self.root:
            fs, p = storage.filesystem(self.root)
            base = p.rstrip("/") + "/"
            self.files = {f[len(base):] for f in fs.find(p) if f.startswith(base)}
        else:
            base = os.path.abspath(self.root)
            for dirpath, _, names in os.walk(base):
                rel = os.path.relpath(dirpath, base)
                prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                self.files.update(prefix + n for n in names)

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, ref: str) -> bool:
        return ref in self.files


def check_image_ref(ref: str) -> str | None:
    """Why an image reference cannot resolve under a root (absolute, escapes it), or None."""
    if ref.startswith(("/", "\\")) or "://" in ref or (len(ref) > 1 and ref[1] == ":"):
        return f"image {ref!r} is absolute; it must be relative to the image root"
    norm = posixpath.normpath(ref.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return f"image {ref!r} leaves the image root"
    return None


def check(rec: Record, limits: Limits, images: ImageIndex | None) -> tuple[str, str] | None:
    """(reason code, detail) for the first rule `rec` breaks, or None if it is valid."""
    conv = rec.conversations
    n = len(conv)
    if n < limits.min_turns:
        return "too_few_turns", f"{n} turns (need at least {limits.min_turns})"
    if n > limits.max_turns:
        return "too_many_turns", f"{n} turns (limit {limits.max_turns})"
    chars = 0
    n_tags = 0
    for k, turn in enumerate(conv):
        want = "human" if k % 2 == 0 else "gpt"
        if turn["from"] != want:
            return "not_alternating", f"turn {k} is from {turn['from']!r}, expected {want!r}"
        value = turn["value"]
        if not value.strip():
            return "empty_turn", f"turn {k} is empty"
        chars += len(value)
        count = value.count(IMAGE_TOKEN)
        if count and k > 0:
            return "image_tag_misplaced", f"<image> in turn {k} (only the first human turn may hold it)"
        n_tags += count
    if n % 2:
        return "not_alternating", f"{n} turns: the last turn is from 'human', expected 'gpt'"
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
    if images is not None and posixpath.normpath(rec.image.replace("\\", "/")) not in images:
        return "image_not_found", f"{rec.image!r} is not under the image root"
    return None


def text_chars(conversations: list[dict]) -> int:
    return sum(len(t["value"]) for t in conversations)


def digest(image: str | None, conversations: list[dict]) -> int:
    """64-bit key of the normalised record: image reference plus each turn's role and
    whitespace-collapsed text. Equal keys = exact duplicates (a 64-bit collision among
    1e6 records has probability ~3e-8)."""
    h = hashlib.blake2b(digest_size=8)
    h.update((image or "").encode())
    for t in conversations:
        h.update(b"\x00" + t["from"].encode() + b"\x01" + " ".join(t["value"].split()).encode())
    return int.from_bytes(h.digest(), "little")


def sample_key(seed: int, source: str, rid: str) -> int:
    """Seeded 64-bit sampling key of a record: which records a count/fraction keeps
    depends on the seed and ids only, not on file order or chunking."""
    h = hashlib.blake2b(f"{seed}\x00{source}\x00{rid}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")
