"""Manifest -> Parquet conversation table -> training samples.

The trainer reads only what a manifest lists: `manifest.load(path, verify=True)`
refuses tables whose sha256 changed. A table (schema MIX; the stage-1 caption table
has the same shape) is validated up front, row by row: a malformed conversation raises
`InputError` naming the file, row and id, before any step runs.

Images resolve through the table's `images` entry in the manifest:
  parquet     a table in schema IMAGES (uid, jpg, width, height), looked up by uid
  files       a folder; `image` is a path relative to it
  webdataset  a folder of .tar shards whose sample keys are the uids
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass

import numpy as np
import torch

from mllm.templates import IGNORE_INDEX, Template, check_conversation
from pipelines import schemas, storage
from pipelines.errors import InputError, ManifestError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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


class ConversationDataset(torch.utils.data.Dataset):
    """Rows of a MIX-schema table as tokenized, masked, image-expanded samples."""

    def __init__(self, table_path: str, images, tokenizer, template: Template,
                 num_image_tokens: int, processor: ImageProcessor | None, max_length: int):
        self.path = table_path
        self.images = images
        self.tokenizer = tokenizer
        self.template = template
        self.num_image_tokens = num_image_tokens
        self.processor = processor
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        table = storage.read_table(table_path, schema=schemas.MIX)
        self.ids = table.column("id").to_pylist()
        self.image_refs = table.column("image").to_pylist()
        self.conversations = table.column("conversations").to_pylist()
        has_image = table.column("has_image").to_pylist()
        self.has_image = np.zeros(len(self.ids), dtype=bool)
        self.lengths = np.zeros(len(self.ids), dtype=np.int64)
        for row, (sid, ref, conv, flag) in enumerate(
                zip(self.ids, self.image_refs, self.conversations, has_image)):
            reason = check_conversation(conv, bool(flag))
            if reason is None and flag and not ref:
                reason = "has_image is true but image is empty"
            if reason is None and flag and images is None:
                reason = "image sample, but the manifest lists no images for this table"
            if reason is not None:
                raise InputError(f"id {sid!r}: {reason}", path=table_path, row=row,
                                 field="conversations")
            self.has_image[row] = bool(flag)
            # Cheap length estimate for batching (words ~ tokens); exact lengths would
            # tokenize the whole table up front.
            words = sum(len(t["value"].split()) for t in conv)
            self.lengths[row] = words + (num_image_tokens if flag else 0)

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, row: int) -> tuple[list[int], list[int], bool]:
        ids, labels = self.template.encode(self.conversations[row], self.tokenizer,
                                           self.num_image_tokens)
        return truncate(ids, labels, self.max_length, self.image_token_id,
                        where=f"{self.path} row {row} (id {self.ids[row]!r})")

    def __getitem__(self, row: int) -> Sample:
        ids, labels, cut = self.encode(row)
        pixels = None
        if self.has_image[row]:
            pixels = self.processor(self.images.read(self.image_refs[row]))
        return Sample(ids, labels, pixels, cut)


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
