"""Image and text embeddings with open_clip, one downloaded shard at a time.

Models:
- `model: ViT-L-14, pretrained: openai` (any open_clip name and pretrained tag, as in
  `open_clip.list_pretrained()`), or `model: hf-hub:org/name`;
- `pretrained: /path/to/checkpoint.pt` (or .safetensors): a local checkpoint for that
  architecture, which is how real weights reach a machine without internet;
- `model: warren-tiny-random` with `pretrained: null`: a tiny architecture registered
  here with `open_clip.add_model_config` and initialised from `seed`. Its image tower
  sees the whole image as one patch, so an untrained tower is close to a random
  projection of the pixels and keeps their cosine geometry (an untrained ViT with small
  patches averages them away and maps every image to nearly the same vector).
  Its clip scores measure nothing: real runs set a real model.

Speed: JPEG decoding and resizing run in worker processes (numpy + PIL only, no torch,
so they start in a fraction of a second), a bounded number of batches ahead of the
model; the model runs in this process. Inside a daemonic process (a Dask worker), where
child processes are not allowed, decoding falls back to threads. The preprocessing is
open_clip's inference transform (resize the shortest side with the model's
interpolation, centre crop, scale, normalise) reproduced exactly, tested against it.

Output per shard: the embedding table (schema `embedding_table(d)` + width, height),
rows in the input order, both embeddings L2-normalised and stored as float16, and the
rows whose image does not decode as rejects (stage "embed").
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import io
import json
import multiprocessing
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import numpy as np
import pyarrow as pa

from pipelines import lifeline, schemas, storage
from pipelines.errors import ConfigError, InputError, MissingDependencyError


TINY_MODEL = "warren-tiny-random"
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 64, "layers": 2, "width": 128,
                   "head_width": 32, "pool_type": "avg"},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}
DECODE_ERROR = "corrupt_image"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EmbedConfig:
    """Which open_clip model embeds, and how the work is spread."""
    model: str = TINY_MODEL           # open_clip architecture name, or hf-hub:org/name
    pretrained: str | None = None     # tag ("openai", "laion2b_s32b_b82k") or local checkpoint path
    seed: int = 0                     # initialisation seed when pretrained is None
    batch_size: int = 128
    workers: int = 2                  # decoding processes (0: decode in the calling thread)
    device: str = "cpu"               # "cuda" where there is one
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    threads: int | None = None        # torch intra-op threads; None keeps torch's default
    prefetch: int = 2                 # batches in flight per decoding worker

    def __post_init__(self):
        p = []
        if not self.model:
            p.append("model must be an open_clip model name")
        if self.batch_size < 1:
            p.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.workers < 0:
            p.append(f"workers must be >= 0 (got {self.workers})")
        if self.precision not in ("fp32", "bf16", "fp16"):
            p.append(f"precision must be fp32, bf16 or fp16 (got {self.precision!r})")
        if self.threads is not None and self.threads < 1:
            p.append("threads must be >= 1")
        if self.prefetch < 1:
            p.append("prefetch must be >= 1")
        if p:
            raise ConfigError(p, source="embed config")

    @property
    def random_init(self) -> bool:
        return self.pretrained is None and not self.model.startswith("hf-hub:")

    def to_dict(self) -> dict:
        return asdict(self)


# -- the model ----------------------------------------------------------------------------
_LOCK = threading.Lock()


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise MissingDependencyError("open-clip-torch", "embedding images") from None
    return open_clip


def register_tiny() -> None:
    """Make `warren-tiny-random` known to open_clip (idempotent)."""
    open_clip = _open_clip()
    if TINY_MODEL in open_clip.list_models():
        return
    d = tempfile.mkdtemp(prefix="warren-openclip-")
    path = os.path.join(d, f"{TINY_MODEL}.json")
    with open(path, "w") as f:
        json.dump(TINY_CONFIG, f)
    open_clip.add_model_config(path)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    preprocess: object                # open_clip's transform (reference; not used in workers)
    image: dict                       # size, mean, std, interpolation, resize_mode
    dim: int
    lock: threading.Lock = field(default_factory=threading.Lock)


@functools.lru_cache(maxsize=2)
def _load(model: str, pretrained: str | None, seed: int, device: str, precision: str) -> Loaded:
    import torch
    open_clip = _open_clip()
    if model == TINY_MODEL:
        register_tiny()
    if pretrained is not None and (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))) \
            and not os.path.exists(pretrained):
        raise InputError("checkpoint not found (embed.pretrained)", path=pretrained)
    if pretrained is None:
        torch.manual_seed(seed)       # the same random weights in every process
    try:
        m, _, pre = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device,
            precision={"fp32": "fp32", "bf16": "pure_bf16", "fp16": "pure_fp16"}[precision])
    except RuntimeError as e:
        raise InputError(f"cannot create open_clip model {model!r} with pretrained "
                         f"{pretrained!r}: {e}", field="embed.model") from None
    m.eval()
    tok = open_clip.get_tokenizer(model)
    pcfg = dict(getattr(m.visual, "preprocess_cfg", {}) or {})
    size = pcfg.get("size", m.visual.image_size)
    size = size if isinstance(size, int) else int(size[0]) if size[0] == size[1] else tuple(size)
    image = {"size": size, "mean": tuple(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
             "std": tuple(pcfg.get("std", open_clip.OPENAI_DATASET_STD)),
             "interpolation": pcfg.get("interpolation", "bicubic"),
             "resize_mode": pcfg.get("resize_mode", "shortest")}
    dim = int(m.text_projection.shape[1]) if getattr(m, "text_projection", None) is not None \
        and hasattr(m.text_projection, "shape") else int(m.encode_text(tok(["a"]).to(device)).shape[1])
    return Loaded(m, tok, pre, image, dim)


def load(cfg: EmbedConfig) -> Loaded:
    """The model for `cfg`, built once per process (tasks in one process share it)."""
    with _LOCK:
        return _load(cfg.model, cfg.pretrained, cfg.seed, cfg.device, cfg.precision)


# -- decoding (runs in worker processes: numpy + PIL only) --------------------------------
def _resample(name: str):
    from PIL import Image
    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
            "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}[name]


def decode(blob: bytes, size, interpolation: str = "bicubic",
           resize_mode: str = "shortest") -> np.ndarray:
    """JPEG/PNG bytes -> uint8 (H, W, 3) exactly as open_clip's inference transform
    sees it before ToTensor (torchvision Resize on PIL + CenterCrop)."""
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        im = im.convert("RGB")
    th, tw = (size, size) if isinstance(size, int) else size
    if resize_mode == "squash":
        im = im.resize((tw, th), _resample(interpolation))
        return np.asarray(im, np.uint8)
    if resize_mode != "shortest":
        raise ConfigError(f"resize_mode {resize_mode!r} is not supported by Warren's decoder",
                          source="embed")
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    target = min(th, tw) if th != tw else th
    if short != target:
        new_short, new_long = target, int(target * long / short)
        nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
        im = im.resize((nw, nh), _resample(interpolation))
    w, h = im.size
    if w < tw or h < th:   # torchvision pads with zeros before cropping
        pad = Image.new("RGB", (max(w, tw), max(h, th)))
        pad.paste(im, ((max(w, tw) - w) // 2, (max(h, th) - h) // 2))
        im, (w, h) = pad, pad.size
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return np.asarray(im.crop((left, top, left + tw, top + th)), np.uint8)


def decode_batch(blobs: list, size, interpolation: str, resize_mode: str):
    """(uint8 (m, H, W, 3), ok (m,)): rows that do not decode are zeros and not ok."""
    th, tw = (size, size) if isinstance(size, int) else size
    out = np.zeros((len(blobs), th, tw, 3), np.uint8)
    ok = np.zeros(len(blobs), bool)
    for i, b in enumerate(blobs):
        if b is None:
            continue
        try:
            out[i] = decode(b, size, interpolation, resize_mode)
            ok[i] = True
        except Exception:  # noqa: BLE001 — any decoder failure makes this row a reject
            pass
    return out, ok


_POOLS: dict[tuple, cf.Executor] = {}


def _executor(workers: int) -> cf.Executor | None:
    """A decoding pool shared by every shard this process embeds."""
    if workers == 0:
        return None
    daemon = multiprocessing.current_process().daemon
    key = ("threads" if daemon else "processes", workers)
    with _LOCK:
        if key not in _POOLS:
            if daemon:
                _POOLS[key] = cf.ThreadPoolExecutor(workers, thread_name_prefix="decode")
            else:
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload(["numpy", "PIL.Image", "pipelines.embed"])
                # workers die with this process even when it is SIGKILLed
                _POOLS[key] = cf.ProcessPoolExecutor(workers, mp_context=ctx,
                                                     initializer=lifeline.worker_init,
                                                     initargs=(os.getpid(),))
        return _POOLS[key]


def shutdown() -> None:
    """Stop the decoding pools (tests, and the end of a command)."""
    with _LOCK:
        for p in _POOLS.values():
            p.shutdown(wait=True, cancel_futures=True)
        _POOLS.clear()


# -- one shard ----------------------------------------------------------------------------
def embed_table(cfg: EmbedConfig, table: pa.Table, progress: Progress | None = None):
    """Embed the rows of a table with uid, jpg, caption.

    Returns (img float32 (n, d) normalised, txt float32 (n, d) normalised, ok (n,))."""
    import torch

    m = load(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    n = table.num_rows
    blobs = table.column("jpg").to_pylist()
    caps = ["" if c is None else c for c in table.column("caption").to_pylist()]
    img = np.zeros((n, m.dim), np.float32)
    txt = np.zeros((n, m.dim), np.float32)
    ok = np.zeros(n, bool)
    mean = torch.tensor(m.image["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(m.image["std"]).view(1, 3, 1, 1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    bs = cfg.batch_size
    starts = list(range(0, n, bs))
    args = (m.image["size"], m.image["interpolation"], m.image["resize_mode"])
    pool = _executor(cfg.workers)
    window = max(1, cfg.workers * cfg.prefetch)
    pending: dict[int, cf.Future] = {}

    def submit(j):
        s = starts[j]
        if pool is None:
            return None
        pending[j] = pool.submit(decode_batch, blobs[s:s + bs], *args)

    for j in range(min(window, len(starts))):
        submit(j)
    done = 0
    with torch.inference_mode():
        for j, s in enumerate(starts):
            e = min(n, s + bs)
            if pool is None:
                pix, good = decode_batch(blobs[s:e], *args)
            else:
                pix, good = pending.pop(j).result()
                if j + window < len(starts):
                    submit(j + window)
            # ToTensor + Normalize, as open_clip's transform does them
            x = torch.from_numpy(pix).permute(0, 3, 1, 2).float().div(255)
            x = ((x - mean) / std).to(cfg.device, dtype)
            tokens = m.tokenizer(caps[s:e]).to(cfg.device)
            # One forward at a time per process: shards embedded by concurrent tasks
            # (threads) would only fight over torch's one intra-op pool; decoding of
            # every shard still runs ahead in the workers meanwhile.
            with m.lock:
                fi = m.model.encode_image(x).float()
                ft = m.model.encode_text(tokens).float()
            img[s:e] = torch.nn.functional.normalize(fi, dim=-1).cpu().numpy()
            txt[s:e] = torch.nn.functional.normalize(ft, dim=-1).cpu().numpy()
            ok[s:e] = good
            done += e - s
            if progress is not None:
                progress(done, n)
    return img, txt, ok


def embed_shard(cfg: EmbedConfig, images: str, out: str, rejects_out: str,
                progress: Progress | None = None) -> dict:
    """Embed one pool shard (POOL schema: uid, jpg, width, height, url, caption) into
    `out` (embedding table) and `rejects_out` (undecodable images). Atomic writes; the
    caller records completion."""
    t0 = time.perf_counter()
    table = storage.read_table(images)
    for c in ("uid", "jpg", "caption"):
        if c not in table.column_names:
            raise InputError(f"missing column '{c}'", path=images, field=c)
    img, txt, ok = embed_table(cfg, table, progress)
    dim = img.shape[1]
    keep = np.flatnonzero(ok)
    t = table.take(pa.array(keep))
    schema = emb_schema(dim)
    cols = {"uid": t.column("uid"), "url": t.column("url") if "url" in t.column_names
            else pa.nulls(len(keep), pa.string()),
            "caption": t.column("caption"),
            "img_emb": _fixed(img[keep], dim), "txt_emb": _fixed(txt[keep], dim),
            "width": t.column("width") if "width" in t.column_names else pa.nulls(len(keep), pa.int32()),
            "height": t.column("height") if "height" in t.column_names else pa.nulls(len(keep), pa.int32())}
    storage.write_table(pa.table(cols), out, schema)
    bad = np.flatnonzero(~ok)
    uids = table.column("uid").take(pa.array(bad))
    rej = pa.table({"uid": uids, "stage": pa.array(["embed"] * len(bad), pa.string()),
                    "reason": pa.array([DECODE_ERROR] * len(bad), pa.string()),
                    "kept_uid": pa.nulls(len(bad), pa.string())}, schema=schemas.REJECTS)
    storage.write_table(rej, rejects_out, schemas.REJECTS)
    seconds = time.perf_counter() - t0
    return {"rows": table.num_rows, "embedded": int(len(keep)), "rejected": int(len(bad)),
            "dim": dim, "seconds": round(seconds, 3),
            "images_per_s": round(table.num_rows / max(seconds, 1e-9), 1)}


def emb_schema(dim: int) -> pa.Schema:
    """Warren's embedding table plus the image size columns carried to the coreset."""
    base = schemas.embedding_table(dim)
    return pa.schema(list(base) + [pa.field("width", pa.int32()), pa.field("height", pa.int32())])


def _fixed(x: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x, np.float16).ravel()), dim)
