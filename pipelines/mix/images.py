"""The image files of a mix: the image root listed once, headers checked in bulk.

    idx = ImageIndex(root)          every file under root, one walk (no stat per record)
    "coco/x.jpg" in idx             membership
    idx.check(refs)                 header verdicts for the refs not checked yet, in parallel
    idx.problem(ref)                None when readable, else why not
    idx.fingerprint()               files, bytes and a digest of (name, size, mtime)

Header check, once per distinct file (never per record): an empty file is unreadable;
otherwise the first and last 32 bytes must show a known format whose end is present
(JPEG: SOI and the EOI marker; PNG: signature and the IEND chunk; GIF: signature and
trailer; WebP and BMP: the declared size fits the file). A file that fails this — a
truncated one, trailing data after the end marker, a format not known here, something
that is not an image — is decoded in full with Pillow (what the trainer uses) and kept
only if that succeeds. The extension is never trusted: OCR-VQA ships GIFs named .jpg,
which Pillow reads. Two small reads per file, in threads: files on a network disk are
checked at the disk's parallel rate.

Hidden names (starting with '.') are not listed, as `pipelines.runkey` skips them in
its fingerprints: macOS `._x.jpg` files are metadata, not images.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

from pipelines import runkey, storage

EDGE = 32                # bytes read at each end of a file
SUBMIT = 32              # files handed to a checking thread at a time

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"


def complete(head: bytes, tail: bytes, size: int) -> bool:
    """Whether the first and last bytes of a `size`-byte file show a whole image of a
    format known here (see the module docstring). False means: decode it to know."""
    if head.startswith(_JPEG):
        return b"\xff\xd9" in tail     # EOI; 0xFF 0xD9 cannot occur in entropy-coded data
    if head.startswith(_PNG):
        return tail.endswith(_PNG_END)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return tail.endswith(b";")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return size >= int.from_bytes(head[4:8], "little") + 8
    if head[:2] == b"BM" and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return 0 < declared <= size
    return False


def decode_problem(open_file, name: str) -> str | None:
    """Decode a whole image with Pillow; None when it decodes, else why not."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # DecompressionBombWarning, EXIF noise
            with open_file() as f, Image.open(f) as im:
                im.load()
        return None
    except UnidentifiedImageError:
        with open_file() as f:
            start = f.read(12)
        return f"{name} is not an image Pillow can read (starts with {start!r})"
    except Exception as e:  # noqa: BLE001 — every decoder failure is the file's problem
        return f"{name} cannot be decoded ({type(e).__name__}: {e})"


def check_local(path: str, name: str) -> str | None:
    """Header check of one local file (see the module docstring)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as e:
        return f"{name} cannot be opened ({e.strerror})"
    try:
        head = os.read(fd, EDGE)
        size = os.lseek(fd, 0, os.SEEK_END)
        tail = head if size <= EDGE else os.pread(fd, EDGE, size - EDGE)
    except OSError as e:
        return f"{name} cannot be read ({e.strerror})"
    finally:
        os.close(fd)
    if size == 0:
        return f"{name} is empty (0 bytes)"
    if complete(head, tail, size):
        return None
    return decode_problem(lambda: open(path, "rb"), name)


def check_remote(fs, path: str, name: str) -> str | None:
    """Header check of one file on an fsspec file system."""
    try:
        size = fs.size(path)
        head = fs.cat_file(path, 0, EDGE) if size else b""
        tail = head if size <= EDGE else fs.cat_file(path, size - EDGE, size)
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as e:
        return f"{name} cannot be read ({e})"
    if size == 0:
        return f"{name} is empty (0 bytes)"
    if complete(head, tail, size):
        return None
    return decode_problem(lambda: fs.open(path, "rb"), name)


class ImageIndex:
    """Every file under an image root, listed once into a set of relative paths, so a
    membership test replaces one stat per record (665K stats on a network disk take
    minutes; one walk takes seconds), plus header verdicts per file, each computed
    once per run however many records share the file.

    `prefetch(ref)` queues a file's check and returns at once (threads check queued
    files SUBMIT at a time); `problem(ref)` returns the verdict, waiting for it if
    needed. A reader that prefetches some records ahead of the ones it decides on
    keeps the threads busy without holding up its own pass."""

    def __init__(self, root: str, workers: int | None = None):
        self.root = str(root)
        self.remote = "://" in self.root and not self.root.startswith("file://")
        self.workers = workers or min(32, 4 * (os.cpu_count() or 1))
        self.files: set[str] = set()
        self._verdicts: dict[str, str | None] = {}
        self._inflight: dict[str, Future | None] = {}    # None: queued, not handed to a thread
        self._queued: list[str] = []
        self._lock = threading.RLock()
        self._pool: ThreadPoolExecutor | None = None     # kept across calls: no thread start per batch
        self.check_seconds = 0.0                         # in the checking threads, summed
        self.wait_seconds = 0.0                          # callers waiting for a verdict
        if self.remote:
            self.fs, p = storage.filesystem(self.root)
            self._base = p.rstrip("/") + "/"
            for f in self.fs.find(p):
                rel = f[len(self._base):] if f.startswith(self._base) else None
                if rel and not any(part.startswith(".") for part in rel.split("/")):
                    self.files.add(rel)
        else:
            self._base = os.path.abspath(self.root.removeprefix("file://"))
            for dirpath, dirs, names in os.walk(self._base):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                rel = os.path.relpath(dirpath, self._base)
                prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                self.files.update(prefix + n for n in names if not n.startswith("."))

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, ref: str) -> bool:
        return ref in self.files

    # ------------------------------------------------------------------ headers

    def _check_one(self, ref: str) -> str | None:
        if self.remote:
            return check_remote(self.fs, self._base + ref, ref)
        return check_local(os.path.join(self._base, ref), ref)

    def _run(self, refs: list[str]) -> None:
        t = time.perf_counter()
        results = [self._check_one(r) for r in refs]
        with self._lock:
            self._verdicts.update(zip(refs, results))
            for r in refs:
                self._inflight.pop(r, None)
            self.check_seconds += time.perf_counter() - t

    def _submit(self) -> None:
        """Hand the queued files to a thread (or check them here with one worker)."""
        with self._lock:
            chunk, self._queued = self._queued, []
            if not chunk:
                return
            if self.workers > 1:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="image-check")
                fut = self._pool.submit(self._run, chunk)
                for r in chunk:
                    if r in self._inflight:          # not already finished by the thread
                        self._inflight[r] = fut
                return
        self._run(chunk)

    def prefetch(self, ref: str) -> None:
        """Start checking the listed file `ref` (no-op when done, under way or unlisted)."""
        if ref in self._verdicts or ref in self._inflight or ref not in self.files:
            return
        with self._lock:
            if ref in self._verdicts or ref in self._inflight:
                return
            self._inflight[ref] = None
            self._queued.append(ref)
            full = len(self._queued) >= SUBMIT
        if full:
            self._submit()

    def problem(self, ref: str) -> str | None:
        """Why the listed file `ref` is unreadable, or None (waits for its check, or
        checks it now)."""
        try:
            return self._verdicts[ref]
        except KeyError:
            pass
        t = time.perf_counter()
        self.prefetch(ref)
        with self._lock:
            fut = self._inflight.get(ref)
            queued = ref in self._inflight and fut is None
        if queued:
            self._submit()
            with self._lock:
                fut = self._inflight.get(ref)
        if fut is not None:
            fut.result()
        if ref not in self._verdicts:     # being checked by another caller (one worker): do it here
            self._run([ref])
        with self._lock:
            self.wait_seconds += time.perf_counter() - t
            return self._verdicts[ref]

    def check(self, refs) -> None:
        """Header verdicts for every listed file in `refs`, computed in parallel; returns
        when all are known (duplicates and unlisted refs are skipped)."""
        refs = [r for r in dict.fromkeys(refs) if r in self.files]
        for r in refs:
            self.prefetch(r)
        self._submit()
        for r in refs:
            self.problem(r)

    def close(self) -> None:
        """Stop the checking threads (a later check starts them again)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    def stats(self) -> dict:
        bad = sum(v is not None for v in self._verdicts.values())
        return {"listed": len(self.files), "checked": len(self._verdicts), "unreadable": bad,
                "check_seconds": round(self.check_seconds, 3), "wait_seconds": round(self.wait_seconds, 3)}

    # ------------------------------------------------------------------ fingerprint

    def fingerprint(self) -> dict:
        return fingerprint(self.root)


def fingerprint(root: str) -> dict:
    """What the image root holds: file count, bytes, and a digest of every file's
    (name, size, mtime) — `pipelines.runkey`'s fingerprint for a local folder; for a
    remote one the same built from the listing's sizes and modification times/ETags."""
    root = str(root)
    if "://" not in root or root.startswith("file://"):
        return runkey.fingerprint([root])[root]
    fs, p = storage.filesystem(root)
    base = p.rstrip("/") + "/"
    entries = []
    for f, info in sorted(fs.find(p, detail=True).items()):
        rel = f[len(base):] if f.startswith(base) else f
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        stamp = info.get("mtime", info.get("LastModified", info.get("ETag", info.get("etag"))))
        entries.append([rel, info.get("size"), str(stamp)])
    return {"files": len(entries), "bytes": sum(e[1] or 0 for e in entries),
            "digest": hashlib.sha256(json.dumps(entries).encode()).hexdigest(),
            "listing": entries if len(entries) <= 2000 else None}
