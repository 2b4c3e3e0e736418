"""A small LAION-like image-text pool, drawn procedurally, served over local HTTP.

What is planted, and why (each row's truth is in `truth.parquet`):
- originals: scenes of 1-3 coloured shapes on a gradient or striped background, with a
  caption generated from what was drawn ("a large red circle and a small blue star on
  a green background");
- near-duplicates: copies of some originals re-encoded at low JPEG quality, resized,
  or cropped, each under its own uid and URL, as the web repeats images;
- dead links: URLs the server answers with 404;
- corrupt files: served with status 200 but not decodable (random bytes, an HTML error
  page, a JPEG cut after its header), as LAION's pool has;
- mismatched captions: a caption that describes another image.

The server (`serve`) is a stdlib ThreadingHTTPServer on 127.0.0.1 in a daemon thread;
`write_metadata` writes the LAION-style metadata Parquet (uid, url, caption) for the
base URL it got. Image files depend only on the config and seed, never on the port.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import io
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipelines import storage
from pipelines.errors import ConfigError, InputError

log = logging.getLogger(__name__)

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 220, 40), "purple": (140, 50, 170), "orange": (245, 140, 30),
    "black": (20, 20, 20), "white": (245, 245, 245), "pink": (240, 130, 180),
    "teal": (30, 150, 150), "brown": (120, 70, 30), "grey": (130, 130, 130),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond")
SIZES = {"small": 0.22, "medium": 0.34, "large": 0.48}
BACKGROUNDS = ("plain", "gradient", "stripes", "checks")

KINDS = ("original", "near_duplicate", "dead_link", "corrupt", "mismatched_caption")

TRUTH = pa.schema([
    pa.field("uid", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("file", pa.string(), nullable=False),       # path under images/ (served or not)
    pa.field("dup_group", pa.int64(), nullable=False),   # -1 unless part of a planted group
    pa.field("variant", pa.string()),                    # reencode | resize | crop (near-dups)
    pa.field("true_caption", pa.string()),               # what the image shows
])

METADATA = pa.schema([
    pa.field("uid", pa.string(), nullable=False),
    pa.field("url", pa.string(), nullable=False),
    pa.field("caption", pa.string()),
])


@dataclass(frozen=True)
class DemoDataConfig:
    """How many rows of each kind; shares are of `n`, the total row count."""
    n: int = 3000
    size: int = 96                   # originals are size x size pixels
    seed: int = 0
    dup_share: float = 0.15          # rows that are planted near-duplicate copies
    dead_share: float = 0.03
    corrupt_share: float = 0.02
    mismatch_share: float = 0.05
    quality: int = 90                # JPEG quality of originals

    def __post_init__(self):
        p = []
        if self.n < 20:
            p.append(f"n must be >= 20 (got {self.n})")
        if not 32 <= self.size <= 1024:
            p.append(f"size must be in [32, 1024] (got {self.size})")
        shares = (self.dup_share, self.dead_share, self.corrupt_share, self.mismatch_share)
        if any(s < 0 for s in shares) or sum(shares) >= 0.6:
            p.append("shares must be >= 0 and sum to less than 0.6")
        if not 10 <= self.quality <= 100:
            p.append(f"quality must be in [10, 100] (got {self.quality})")
        if p:
            raise ConfigError(p, source="demo data")


# -- drawing --------------------------------------------------------------------------
def _scene(rng: np.random.Generator) -> dict:
    n_shapes = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    names = list(COLORS)
    bg = str(rng.choice(names))
    shapes = []
    for _ in range(n_shapes):
        color = str(rng.choice([c for c in names if c != bg]))
        shapes.append({"shape": str(rng.choice(SHAPES)), "color": color,
                       "size": str(rng.choice(list(SIZES))),
                       "x": float(rng.uniform(0.25, 0.75)), "y": float(rng.uniform(0.25, 0.75)),
                       "angle": float(rng.uniform(0, 2 * math.pi))})
    return {"bg": bg, "bg2": str(rng.choice(names)), "background": str(rng.choice(BACKGROUNDS)),
            "shapes": shapes, "texture_seed": int(rng.integers(1 << 31))}


def caption(scene: dict) -> str:
    parts = [f"a {s['size']} {s['color']} {s['shape']}" for s in scene["shapes"]]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    bg = {"plain": f"a {scene['bg']} background",
          "gradient": f"a {scene['bg']} to {scene['bg2']} gradient",
          "stripes": f"{scene['bg']} and {scene['bg2']} stripes",
          "checks": f"a {scene['bg']} and {scene['bg2']} checkerboard"}[scene["background"]]
    return f"{things} on {bg}"


def draw(scene: dict, size: int):
    """The scene as a PIL RGB image."""
    from PIL import Image, ImageDraw

    c1, c2 = np.array(COLORS[scene["bg"]], float), np.array(COLORS[scene["bg2"]], float)
    yy, xx = np.mgrid[0:size, 0:size] / size
    kind = scene["background"]
    if kind == "plain":
        t = np.zeros((size, size))
    elif kind == "gradient":
        t = (xx + yy) / 2
    elif kind == "stripes":
        t = (np.floor(xx * 8) % 2)
    else:
        t = (np.floor(xx * 6) + np.floor(yy * 6)) % 2
    arr = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    # A smooth random field per image (an upsampled 6x6 noise grid) modulates the
    # background: it is what makes two different scenes far apart even for a random
    # (untrained) embedding model, while crops and re-encodes of one scene stay close.
    trng = np.random.default_rng(scene["texture_seed"])
    grid = Image.fromarray((trng.uniform(0, 255, (5, 5, 3))).astype(np.uint8), "RGB")
    field = np.asarray(grid.resize((size, size), Image.BICUBIC), float) / 255.0
    arr = arr * 0.6 + (field - 0.5) * 160 + 50
    noise = trng.normal(0, 4, arr.shape)
    img = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for s in scene["shapes"]:
        r = SIZES[s["size"]] * size / 2
        cx, cy, a = s["x"] * size, s["y"] * size, s["angle"]
        col = COLORS[s["color"]]
        box = [cx - r, cy - r, cx + r, cy + r]
        if s["shape"] == "circle":
            d.ellipse(box, fill=col)
        elif s["shape"] == "ring":
            d.ellipse(box, outline=col, width=max(2, int(r / 3)))
        elif s["shape"] == "square":
            d.polygon(_poly(cx, cy, r, 4, a + math.pi / 4), fill=col)
        elif s["shape"] == "diamond":
            d.polygon(_poly(cx, cy, r, 4, 0.0), fill=col)
        elif s["shape"] == "triangle":
            d.polygon(_poly(cx, cy, r, 3, a), fill=col)
        elif s["shape"] == "star":
            pts = []
            for i in range(10):
                rr = r if i % 2 == 0 else r * 0.45
                pts.append((cx + rr * math.cos(a + i * math.pi / 5),
                            cy + rr * math.sin(a + i * math.pi / 5)))
            d.polygon(pts, fill=col)
        else:  # cross
            w = r / 3
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
    return img


def _poly(cx, cy, r, n, a):
    return [(cx + r * math.cos(a + 2 * math.pi * i / n), cy + r * math.sin(a + 2 * math.pi * i / n))
            for i in range(n)]


def _jpeg(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _variant(img, kind: str, rng: np.random.Generator, quality: int) -> bytes:
    """A near-duplicate copy: what re-hosting on the web does to an image."""
    from PIL import Image

    w, h = img.size
    if kind == "reencode":
        return _jpeg(img, int(rng.integers(35, 60)))
    if kind == "resize":
        f = float(rng.uniform(0.6, 0.85))
        return _jpeg(img.resize((max(16, int(w * f)), max(16, int(h * f))), Image.BICUBIC), quality)
    # crop: drop a few percent on each side, keep the crop's own size
    m = rng.uniform(0.02, 0.05, 4)
    box = (int(w * m[0]), int(h * m[1]), w - int(w * m[2]), h - int(h * m[3]))
    return _jpeg(img.crop(box), quality)


def _corrupt(i: int, rng: np.random.Generator, good: bytes) -> bytes:
    kind = i % 3
    if kind == 0:
        return rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
    if kind == 1:
        return b"<html><head><title>404</title></head><body>Image not available</body></html>"
    return good[:48]  # SOI + the first header bytes, no scan data


# -- building the pool ----------------------------------------------------------------
def build(root: str, cfg: DemoDataConfig = DemoDataConfig()) -> dict:
    """Draw the pool under `root/images/` and write `root/truth.parquet`.

    Idempotent: a finished build (its completion marker) is reused. Returns counts."""
    from PIL import Image

    if storage.is_done(root, "demo-data"):
        return storage.done_info(root, "demo-data")
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n
    n_dup, n_dead = int(n * cfg.dup_share), int(n * cfg.dead_share)
    n_corrupt, n_mis = int(n * cfg.corrupt_share), int(n * cfg.mismatch_share)
    n_orig = n - n_dup - n_dead - n_corrupt - n_mis
    images = storage.join(root, "images")
    storage.makedirs(images)
    rows: list[dict] = []
    scenes, blobs = [], []
    for i in range(n_orig + n_mis):
        sc = _scene(rng)
        img = draw(sc, cfg.size)
        scenes.append((sc, img))
        blobs.append(_jpeg(img, cfg.quality))
    # originals (the first n_orig scenes)
    for i in range(n_orig):
        rows.append({"kind": "original", "bytes": blobs[i], "dup_group": -1, "variant": None,
                     "caption": caption(scenes[i][0]), "true_caption": caption(scenes[i][0])})
    # near-duplicate groups: 1-3 copies of a distinct original each
    group_of: dict[int, int] = {}
    left = n_dup
    order = rng.permutation(n_orig)
    g = 0
    while left > 0:
        src = int(order[g % n_orig])
        copies = min(left, int(rng.integers(1, 4)))
        group_of[src] = g
        rows[src]["dup_group"] = g
        for _ in range(copies):
            kind = str(rng.choice(["reencode", "resize", "crop"]))
            sc, img = scenes[src]
            rows.append({"kind": "near_duplicate", "bytes": _variant(img, kind, rng, cfg.quality),
                         "dup_group": g, "variant": kind, "caption": caption(sc),
                         "true_caption": caption(sc)})
        left -= copies
        g += 1
    # mismatched captions: an image with the caption of another scene
    for j in range(n_mis):
        sc, _ = scenes[n_orig + j]
        other = scenes[int(rng.integers(n_orig))][0]
        while caption(other) == caption(sc):
            other = _scene(rng)
        rows.append({"kind": "mismatched_caption", "bytes": blobs[n_orig + j], "dup_group": -1,
                     "variant": None, "caption": caption(other), "true_caption": caption(sc)})
    for j in range(n_dead):
        sc = _scene(rng)
        rows.append({"kind": "dead_link", "bytes": None, "dup_group": -1, "variant": None,
                     "caption": caption(sc), "true_caption": None})
    for j in range(n_corrupt):
        blob = _corrupt(j, rng, blobs[j % len(blobs)])
        _check_undecodable(blob)
        rows.append({"kind": "corrupt", "bytes": blob, "dup_group": -1, "variant": None,
                     "caption": caption(_scene(rng)), "true_caption": None})
    # shuffle so kinds are spread over shards; uids are the shuffled position
    perm = rng.permutation(len(rows))
    truth = {k: [] for k in TRUTH.names}
    captions = []
    for pos, r in enumerate(perm):
        row = rows[int(r)]
        uid = f"demo{pos:06d}"
        fname = f"{uid}.jpg"
        if row["bytes"] is not None:
            storage.write_bytes(storage.join(images, fname), row["bytes"])
        truth["uid"].append(uid)
        truth["kind"].append(row["kind"])
        truth["file"].append(fname)
        truth["dup_group"].append(row["dup_group"])
        truth["variant"].append(row["variant"])
        truth["true_caption"].append(row["true_caption"])
        captions.append(row["caption"])
    table = pa.table(truth, schema=TRUTH).append_column("caption", pa.array(captions, pa.string()))
    storage.write_table(table, storage.join(root, "truth.parquet"))
    info = {"rows": len(rows), **{k: truth["kind"].count(k) for k in KINDS},
            "dup_groups": g, "size": cfg.size, "seed": cfg.seed}
    del Image
    storage.mark_done(root, "demo-data", info)
    return info


def _check_undecodable(blob: bytes) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.load()
    except Exception:  # noqa: BLE001 — any decode failure is what we want
        return
    raise AssertionError("a planted corrupt file decodes; change _corrupt")


def write_metadata(root: str, base_url: str, path: str | None = None) -> str:
    """LAION-style metadata (uid, url, caption) for the pool served at `base_url`."""
    truth = storage.read_table(storage.join(root, "truth.parquet"))
    base = base_url.rstrip("/")
    urls = [f"{base}/images/{f}" if k != "dead_link" else f"{base}/gone/{f}"
            for f, k in zip(truth.column("file").to_pylist(), truth.column("kind").to_pylist())]
    table = pa.table({"uid": truth.column("uid"), "url": pa.array(urls, pa.string()),
                      "caption": truth.column("caption")}, schema=METADATA)
    out = path or storage.join(root, "metadata.parquet")
    storage.write_table(table, out, METADATA)
    return out


# -- serving ----------------------------------------------------------------------------
class _Server(http.server.ThreadingHTTPServer):
    # img2dataset opens dozens of connections at once; the stdlib default backlog of 5
    # drops the excess SYNs, and their retransmits end as client timeouts.
    request_queue_size = 256
    daemon_threads = True

    def handle_error(self, request, client_address):
        # a client that hangs up mid-response (a killed download) is not our error
        log.debug("demo server: request from %s failed", client_address, exc_info=True)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 — stdlib signature
        log.debug("demo server: " + format, *args)


@contextlib.contextmanager
def serve(root: str, port: int = 0) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 in a daemon thread; yields the base URL."""
    if not os.path.isdir(root):
        raise InputError("demo data folder not found", path=root)
    handler = functools.partial(_QuietHandler, directory=root)
    server = _Server(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, name="demo-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
