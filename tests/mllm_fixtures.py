"""Synthetic data for the trainer tests: coloured-shape images, a stage-1 caption table,
an instruction mix (image, multi-turn and text-only rows), and a manifest listing them.

Captions name the colour, so a model that learns anything from the image can answer
"What color is the shape?".
"""
from __future__ import annotations

import contextlib
import io
import os
import tarfile

import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from pipelines import manifest, schemas, storage

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ["square", "circle"]


def jpeg(color: str, shape: str, size: int = 40) -> bytes:
    img = Image.new("RGB", (size + 8, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    box = (8, 6, size - 2, size - 6)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def samples(n: int) -> list[tuple[str, str, str]]:
    """(uid, color, shape) for n images, cycling through the combinations."""
    combos = [(c, s) for c in COLORS for s in SHAPES]
    return [(f"img{k:04d}", *combos[k % len(combos)]) for k in range(n)]


def _conv(*turns: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]


def stage1_rows(n: int) -> list[dict]:
    return [{"id": uid, "source": "coreset", "image": uid,
             "conversations": _conv("<image>\nDescribe the image briefly.", f"a {c} {s}"),
             "n_turns": 2, "has_image": True} for uid, c, s in samples(n)]


def mix_rows(n_image: int, n_text: int, image_ref=lambda uid: uid) -> list[dict]:
    rows = []
    for k, (uid, c, s) in enumerate(samples(n_image)):
        if k % 3 == 2:  # multi-turn
            conv = _conv("<image>\nWhat color is the shape?", f"{c}.",
                         "And what shape is it?", f"a {s}.")
        else:
            conv = _conv("<image>\nWhat color is the shape?", f"{c}.")
        rows.append({"id": f"mix-{uid}", "source": "llava", "image": image_ref(uid),
                     "conversations": conv, "n_turns": len(conv), "has_image": True})
    facts = [("What is two plus two?", "four."), ("Name a warm color.", "red."),
             ("What do bees make?", "honey."), ("Say hello.", "hello!")]
    for k in range(n_text):
        q, a = facts[k % len(facts)]
        rows.append({"id": f"text{k:04d}", "source": "wizardlm", "image": None,
                     "conversations": _conv(q, a), "n_turns": 2, "has_image": False})
    return rows


def write_table(rows: list[dict], path: str) -> str:
    storage.write_table(pa.Table.from_pylist(rows, schema=schemas.MIX), path, schemas.MIX)
    return path


def write_images(root: str, n: int, kind: str = "parquet") -> dict:
    """Images of samples(n) in one of the three layouts; returns the manifest spec."""
    items = [(uid, jpeg(c, s)) for uid, c, s in samples(n)]
    if kind == "parquet":
        path = os.path.join(root, "images", "images.parquet")
        table = pa.table({"uid": [u for u, _ in items], "jpg": [b for _, b in items],
                          "width": [48] * n, "height": [40] * n})
        storage.write_table(table, path, schemas.IMAGES)
    elif kind == "files":
        path = os.path.join(root, "images")
        os.makedirs(os.path.join(path, "sub"), exist_ok=True)
        for uid, b in items:
            with open(os.path.join(path, "sub", f"{uid}.jpg"), "wb") as f:
                f.write(b)
    elif kind == "webdataset":
        path = os.path.join(root, "shards")
        os.makedirs(path, exist_ok=True)
        for shard in range(2):
            with tarfile.open(os.path.join(path, f"{shard:05d}.tar"), "w") as tar:
                for uid, b in items[shard::2]:
                    for name, data in ((f"{uid}.jpg", b), (f"{uid}.txt", b"caption")):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    else:
        raise ValueError(kind)
    return {"kind": kind, "path": os.path.relpath(path, root)}


def make_dataset(root: str, n_stage1: int = 16, n_image: int = 12, n_text: int = 4,
                 kind: str = "parquet") -> str:
    """Write tables, images and manifest.json under `root`; return the manifest path."""
    os.makedirs(root, exist_ok=True)
    images = write_images(root, max(n_stage1, n_image), kind)
    ref = (lambda uid: f"sub/{uid}.jpg") if kind == "files" else (lambda uid: uid)
    s1 = stage1_rows(n_stage1)
    for r in s1:
        r["image"] = ref(r["image"])
    write_table(s1, os.path.join(root, "stage1.parquet"))
    write_table(mix_rows(n_image, n_text, ref), os.path.join(root, "mix.parquet"))
    path = os.path.join(root, "manifest.json")
    manifest.write(path, tables={"stage1": os.path.join(root, "stage1.parquet"),
                                 "mix": os.path.join(root, "mix.parquet")},
                   images={"stage1": images, "mix": images})
    return path


# ------------------------------------------------------------ shared, cached per session
_CACHE: dict[str, object] = {}


def cached_dataset(tmp_path_factory, kind: str = "parquet") -> str:
    """One synthetic dataset per image layout for the whole test session."""
    key = f"data-{kind}"
    if key not in _CACHE:
        _CACHE[key] = make_dataset(str(tmp_path_factory.mktemp(key)), kind=kind)
    return _CACHE[key]


def cached_stage1(tmp_path_factory) -> tuple[str, str]:
    """(manifest, output_dir) with a finished 4-step stage-1 run of the tiny model."""
    if "stage1" not in _CACHE:
        from mllm import presets, train
        manifest_path = cached_dataset(tmp_path_factory)
        out = str(tmp_path_factory.mktemp("stage1-run"))
        with single_thread():
            train.train(presets.tiny({"stage1.max_steps": 4}), manifest_path, out, stage=1,
                        progress=False)
        _CACHE["stage1"] = (manifest_path, out)
    return _CACHE["stage1"]


def local_tokenizer():
    """The tokenizer the tests share: a byte-level BPE trained on the fixture text."""
    if "tokenizer" not in _CACHE:
        from mllm import tokenizer
        from mllm.templates import BUNNY_SYSTEM
        texts = [BUNNY_SYSTEM, "USER: ASSISTANT:"] * 4
        for r in stage1_rows(16) + mix_rows(12, 4):
            texts += [t["value"].replace("<image>", "") for t in r["conversations"]]
        _CACHE["tokenizer"] = tokenizer.build_local(texts, vocab_size=300)
    return _CACHE["tokenizer"]


@contextlib.contextmanager
def single_thread():
    """Tiny models run fastest on one thread, and the test machine is shared: several
    OpenMP threads on oversubscribed cores make a step 10x slower. Restored afterwards;
    subprocesses started inside inherit OMP_NUM_THREADS=1."""
    import torch
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture
def one_thread():
    with single_thread():
        yield
