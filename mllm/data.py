"""Manifest -> Parquet conversation table -> training samples.

The trainer reads only what a manifest lists: `manifest.load(path, verify=True)`
refuses tables whose sha256 changed. A table (schema MIX; the stage-1 caption table
has the same shape) is checked up front, every row, before any step runs
(`ConversationDataset`): a row that could stop a run later becomes a `Reject` with a
reason instead, and the run trains on the rest (`data.strict` stops it instead):
  bad_conversation        turns that do not alternate human/gpt, empty turns, ...
  no_image_in_stage1      a text-only row where only the projector trains (no gradient)
  image_missing           no image reference, or no such image in the store
  image_unreadable        an image PIL cannot open, or a truncated one (0 bytes, cut JPEG)
  image_past_max_length   the image tokens end past data.max_length after rendering
  nothing_to_train        no answer token left within data.max_length
Images are checked in bulk on threads: the header is parsed and a JPEG's end-of-image
marker looked for; anything else (no marker, other formats) is decoded in full.

Images resolve through the table's `images` entry in the manifest:
  parquet     a table in schema IMAGES (uid, jpg, width, height), looked up by uid
  files       a folder; `image` is a path relative to it
  webdataset  a folder of .tar shards whose sample keys are the uids
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from mllm.templates import IGNORE_INDEX, Template, check_conversation
from pipelines import schemas, storage
from pipelines.errors import InputError, ManifestError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
HEAD_BYTES = 1 << 16   # enough for any image header (JPEG APP segments are at most 64 KiB)
CHECK_THREADS = 16     # image checks are reads, mostly waiting on storage
ENCODE_BATCH = 1024    # rows per batched tokenizer call when checking a table
REASONS = ("bad_conversation", "no_image_in_stage1", "image_missing", "image_unreadable",
           "image_past_max_length", "nothing_to_train")


def image_problem(head: bytes, size: int, tail: bytes, read_all) -> str | None:
    """Why image bytes cannot be trained on, or None. `head`: the first bytes (all of
    them when `size` fits), `tail`: the last few, `read_all()`: every byte (only called
    when the cheap checks cannot decide)."""
    from PIL import Image
    if size == 0:
        return "empty file (0 bytes)"
    try:
        try:
            fmt = Image.open(io.BytesIO(head)).format
        except Exception:
            if len(head) >= size:
                raise
            head = read_all()  # a header longer than HEAD_BYTES
            fmt = Image.open(io.BytesIO(head)).format
        if fmt == "JPEG" and tail.rstrip(b"\0\r\n\t ").endswith(b"\xff\xd9"):
            return None  # JPEG's end-of-image marker: not cut short
        data = head if len(head) >= size else read_all()
        if fmt == "PNG":
            Image.open(io.BytesIO(data)).verify()  # chunk CRCs and IEND: a cut file fails
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: truncated data fails here
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return f"{type(e).__name__}: {e}"
    return None


# ------------------------------------------------------------------------- images

class ParquetImages:
    """Images stored as bytes in an IMAGES table. The table is memory-mapped; only the
    rows asked for are decoded."""

    def __init__(self, path: str):
        self.path = path
        table = storage.read_table(path, columns=[schemas.UID, "jpg"], schema=schemas.IMAGES)
        self._jpg = table.column("jpg")
        self._row = {uid: i for i, uid in enumerate(table.column(schemas.UID).to_pylist())}

    def __contains__(self, ref: str) -> bool:
        return ref in self._row

    def read(self, ref: str) -> bytes:
        try:
            return self._jpg[self._row[ref]].as_py()
        except KeyError:
            raise InputError(f"image '{ref}' not in the images table", path=self.path) from None

    def probe(self, ref: str) -> tuple[str, str] | None:
        """(reason, detail) when `ref` cannot be trained on, else None."""
        if ref not in self._row:
            return "image_missing", f"'{ref}' is not in the images table"
        data = self.read(ref)
        problem = image_problem(data, len(data), data[-16:], lambda: data)
        return ("image_unreadable", problem) if problem else None


class FileImages:
    """Images as files under a root folder; references are relative paths."""

    def __init__(self, root: str):
        self.root = root

    def _path(self, ref: str) -> str:
        path = os.path.normpath(os.path.join(self.root, ref))
        if os.path.isabs(ref) or not path.startswith(os.path.normpath(self.root) + os.sep):
            raise InputError(f"image reference '{ref}' leaves the image root", path=self.root)
        return path

    def __contains__(self, ref: str) -> bool:
        return storage.exists(self._path(ref))

    def read(self, ref: str) -> bytes:
        fs, p = storage.filesystem(self._path(ref))
        try:
            with fs.open(p, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise InputError(f"image '{ref}' not found", path=self.root) from None

    def probe(self, ref: str) -> tuple[str, str] | None:
        try:
            fs, p = storage.filesystem(self._path(ref))
            with fs.open(p, "rb") as f:
                size = fs.size(p)
                head = f.read(HEAD_BYTES)
                f.seek(max(size - 16, 0))
                tail = f.read()
        except InputError as e:
            return "image_missing", str(e)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return "image_missing", f"'{ref}' not found under {self.root}"
        problem = image_problem(head, size, tail, lambda: self.read(ref))
        return ("image_unreadable", problem) if problem else None


class WebDatasetImages:
    """Images inside webdataset .tar shards (as img2dataset writes them), keyed by the
    sample key (the uid). Shards are indexed once (member offsets), then read by seek,
    so access is random and no shard is unpacked."""

    def __init__(self, root: str):
        self.root = root
        self._index: dict[str, tuple[str, int, int]] = {}
        shards = storage.listdir(root, "*.tar")
        if not shards:
            raise InputError("no .tar shards in the webdataset folder", path=root)
        for shard in shards:
            with tarfile.open(shard, "r") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    name = os.path.basename(m.name)
                    key, _, ext = name.partition(".")
                    if ext.lower() in IMAGE_EXTENSIONS and key not in self._index:
                        self._index[key] = (shard, m.offset_data, m.size)

    def __contains__(self, ref: str) -> bool:
        return ref in self._index

    def read(self, ref: str) -> bytes:
        try:
            shard, offset, size = self._index[ref]
        except KeyError:
            raise InputError(f"image '{ref}' not in any shard", path=self.root) from None
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def probe(self, ref: str) -> tuple[str, str] | None:
        if ref not in self._index:
            return "image_missing", f"'{ref}' is in no shard of {self.root}"
        shard, offset, size = self._index[ref]
        with open(shard, "rb") as f:
            f.seek(offset)
            head = f.read(min(size, HEAD_BYTES))
            f.seek(offset + max(size - 16, 0))
            tail = f.read(min(size, 16))
        problem = image_problem(head, size, tail, lambda: self.read(ref))
        return ("image_unreadable", problem) if problem else None


def image_store(spec: dict | None):
    """The image source a manifest entry describes (None: a text-only table)."""
    if spec is None:
        return None
    kind, path = spec.get("kind"), spec.get("path")
    if kind == "parquet":
        return ParquetImages(path)
    if kind == "files":
        return FileImages(path)
    if kind == "webdataset":
        return WebDatasetImages(path)
    raise ManifestError(f"unknown image kind {kind!r} (expected parquet, files or webdataset)")


class ImageProcessor:
    """Decode, make square (pad with the mean colour, LLaVA-1.5, or plain resize),
    resize to the tower's size and normalise. Pure PIL + torch: no hub files needed."""

    def __init__(self, size: int, mean, std, aspect: str = "pad"):
        self.size, self.aspect = int(size), aspect
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, os.PathLike)):
            image = Image.open(image)
        image = image.convert("RGB")
        if self.aspect == "pad" and image.width != image.height:
            side = max(image.width, image.height)
            fill = tuple(int(m * 255) for m in self.mean.flatten().tolist())  # LLaVA/Bunny: int(), not round()
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        image = image.resize((self.size, self.size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float() / 255.0 - self.mean) / self.std


# ------------------------------------------------------------------------ samples

@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None
    truncated: bool


def truncate(ids: list[int], labels: list[int], max_length: int, image_token_id: int,
             where: str = "") -> tuple[list[int], list[int], bool]:
    """Cut text beyond `max_length`; never cut into the image span. A sample whose
    image span itself ends past `max_length` cannot be trained on without losing its
    image, so it raises (raise data.max_length, or shorten the prompt prefix)."""
    if len(ids) <= max_length:
        return ids, labels, False
    image_end = 0
    for k in range(len(ids) - 1, -1, -1):
        if ids[k] == image_token_id:
            image_end = k + 1
            break
    if image_end > max_length:
        raise InputError(f"the image tokens end at position {image_end}, past data.max_length "
                         f"{max_length}: raise max_length", path=where or None)
    return ids[:max_length], labels[:max_length], True


@dataclass(frozen=True)
class Reject:
    """A table row refused before step 1."""
    row: int
    id: str | None
    uid: str | None
    reason: str
    detail: str


class ConversationDataset(torch.utils.data.Dataset):
    """The trainable rows of a MIX-schema table as tokenized, masked, image-expanded
    samples. Every row is checked when the dataset is built (module docstring);
    `rejects` lists the refused ones, `rows` the table row of each sample, `lengths` the
    exact token count of each sample (after truncation) for length grouping.

    `require_image`: refuse text-only rows (stage 1, where only the projector trains).
    """

    def __init__(self, table_path: str, images, tokenizer, template: Template,
                 num_image_tokens: int, processor: ImageProcessor | None, max_length: int,
                 require_image: bool = False, progress: bool = False):
        self.path = table_path
        self.images = images
        self.tokenizer = tokenizer
        self.template = template
        self.num_image_tokens = num_image_tokens
        self.processor = processor
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        # The columns training needs; `uid` and `system` (added to MIX later) are optional,
        # so tables written before them still train.
        table = storage.read_table(table_path, columns=["id", "image", "conversations", "has_image"],
                                   schema=schemas.MIX)
        self.ids = table.column("id").to_pylist()
        self.image_refs = table.column("image").to_pylist()
        self.conversations = table.column("conversations").to_pylist()
        flags = [bool(f) for f in table.column("has_image").to_pylist()]
        self.uids = _uids(table_path, len(self.ids))
        if images is None and any(flags):
            raise InputError(f"{sum(flags):,} image rows, but the manifest lists no images for this "
                             "table", path=table_path)
        self.rejects, lengths = self._check(flags, require_image, progress)
        refused = {r.row for r in self.rejects}
        self.rows = np.array([k for k in range(len(self.ids)) if k not in refused], dtype=np.int64)
        self.has_image = np.array([flags[k] for k in self.rows], dtype=bool)
        self.lengths = np.array([lengths[k] for k in self.rows], dtype=np.int64)

    def _check(self, flags: list[bool], require_image: bool, progress: bool):
        """(rejects in row order, {row: length}) for every row of the table."""
        bad: dict[int, tuple[str, str]] = {}
        for row, (conv, flag, ref) in enumerate(zip(self.conversations, flags, self.image_refs)):
            reason = check_conversation(conv, flag)
            if reason is not None:
                bad[row] = ("bad_conversation", reason)
            elif require_image and not flag:
                bad[row] = ("no_image_in_stage1", "a text-only row gives the projector no gradient")
            elif flag and not ref:
                bad[row] = ("image_missing", "has_image is true but image is empty")
        lengths: dict[int, int] = {}
        alive = [k for k in range(len(self.ids)) if k not in bad]
        for start in range(0, len(alive), ENCODE_BATCH):
            chunk = alive[start:start + ENCODE_BATCH]
            encoded = self.template.encode_many([self.conversations[k] for k in chunk], self.tokenizer,
                                                self.num_image_tokens)
            for row, result in zip(chunk, encoded):
                if isinstance(result, Exception):
                    bad[row] = ("bad_conversation", str(result))
                    continue
                ids, labels = result
                if flags[row]:
                    image_end = ids.index(self.image_token_id) + self.num_image_tokens
                    if image_end > self.max_length:
                        bad[row] = ("image_past_max_length",
                                    f"the image tokens end at position {image_end}, past "
                                    f"data.max_length {self.max_length}")
                        continue
                if all(lab == IGNORE_INDEX for lab in labels[1:self.max_length]):
                    bad[row] = ("nothing_to_train", f"no answer token within data.max_length "
                                f"{self.max_length}")
                    continue
                lengths[row] = min(len(ids), self.max_length)
        image_rows = [k for k in range(len(self.ids)) if flags[k] and k not in bad]
        for row, problem in zip(image_rows, self._probe([self.image_refs[k] for k in image_rows], progress)):
            if problem is not None:
                bad[row] = problem
        rejects = [Reject(row, self.ids[row], self.uids[row] if self.uids else None, *bad[row])
                   for row in sorted(bad)]
        return rejects, lengths

    def _probe(self, refs: list[str], progress: bool) -> list:
        if not refs:
            return []
        from tqdm.auto import tqdm
        with ThreadPoolExecutor(CHECK_THREADS) as pool:
            return list(tqdm(pool.map(self.images.probe, refs), total=len(refs), disable=not progress,
                             desc="checking images", unit="img", leave=False))

    def __len__(self) -> int:
        return len(self.rows)

    def encode(self, k: int) -> tuple[list[int], list[int], bool]:
        row = int(self.rows[k])
        ids, labels = self.template.encode(self.conversations[row], self.tokenizer,
                                           self.num_image_tokens)
        return truncate(ids, labels, self.max_length, self.image_token_id,
                        where=f"{self.path} row {row} (id {self.ids[row]!r})")

    def __getitem__(self, k: int) -> Sample:
        ids, labels, cut = self.encode(k)
        pixels = None
        if self.has_image[k]:
            row = int(self.rows[k])
            try:
                pixels = self.processor(self.images.read(self.image_refs[row]))
            except Exception as e:  # checked before step 1; a file changed since then
                raise InputError(f"image {self.image_refs[row]!r} cannot be read any more ({e})",
                                 path=self.path, row=row) from None
        return Sample(ids, labels, pixels, cut)

    def reject_table(self, table: str) -> pa.Table:
        """The rejects as a TRAIN_REJECTS table (`table`: the manifest table name)."""
        return pa.Table.from_pylist(
            [{"table": table, "row": r.row, "id": r.id, "uid": r.uid, "reason": r.reason,
              "detail": r.detail} for r in self.rejects], schema=schemas.TRAIN_REJECTS)

    def reject_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(r.reason for r in self.rejects).items()))


def _uids(table_path: str, n: int) -> list | None:
    """The table's `uid` column when it has one (mix tables name the source row)."""
    import pyarrow.parquet as pq
    fs, p = storage.filesystem(table_path)
    with fs.open(p, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    if schemas.UID not in names:
        return None
    uids = storage.read_table(table_path, columns=[schemas.UID]).column(schemas.UID).to_pylist()
    return uids if len(uids) == n else None


class Collator:
    """Right-pads a list of samples; images are stacked in sample order (the model
    fills placeholders in the same order)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        n = max(len(s.input_ids) for s in samples)
        ids = torch.full((len(samples), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), n), dtype=torch.long)
        for k, s in enumerate(samples):
            ids[k, :len(s.input_ids)] = torch.tensor(s.input_ids)
            labels[k, :len(s.labels)] = torch.tensor(s.labels)
            mask[k, :len(s.input_ids)] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        return batch


def texts(table_path: str) -> list[str]:
    """Every turn's text in a conversation table (to train a local tokenizer on)."""
    table = storage.read_table(table_path, columns=["conversations"], schema=schemas.MIX)
    return [t["value"].replace("<image>", "") for conv in table.column("conversations").to_pylist()
            for t in conv]
