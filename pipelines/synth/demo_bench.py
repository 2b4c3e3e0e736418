"""A small held-out benchmark about shapes and colours, in published formats.

`build(root)` draws procedural scenes with the demo pool's generator
(pipelines/synth/demo_pool.py: 1-3 coloured shapes on a background) from a random
stream the pool never uses, so no image is one the model trained on, and writes two
benchmarks under `root` as LLaVA's playground/data/eval/ lays them out (through
mllm.eval.benchmarks.fixtures, the writers the benchmark tests use):

- pope/: POPE's yes/no object probing. Per image, one "Is there a <shape> in the
  image?" per shape drawn (answer yes) and as many about shapes not drawn (answer no),
  in POPE's three categories: `random` (absent shapes drawn uniformly), `popular` (the
  most frequent shapes of the set that are absent), `adversarial` (the absent shapes
  that co-occur most often with the image's own). Images pope/val2014/COCO_val2014_*.jpg.
- gqa/: GQA-style short answers: "What color is the <shape>?" (shapes drawn once in
  the image), "What shape is <color>?" (colours used once), and the colour of a plain
  background. Images gqa/data/images/n*.jpg.

Same config, same files. Returns counts: images, pope (questions), gqa (questions).
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipelines import storage
from pipelines.errors import ConfigError
from pipelines.synth import demo_pool

# The pool draws from default_rng(seed); this stream is keyed apart from it.
_STREAM = 0xBE7C4


@dataclass(frozen=True)
class DemoBenchConfig:
    images: int = 24       # held-out scenes (each asked about in both benchmarks)
    seed: int = 1
    size: int = 96         # pixels, as the pool's originals

    def __post_init__(self):
        if self.images < 3:
            raise ConfigError(f"images must be >= 3 (got {self.images})", source="demo bench")
        if not 32 <= self.size <= 1024:
            raise ConfigError(f"size must be in [32, 1024] (got {self.size})", source="demo bench")


def scenes(cfg: DemoBenchConfig) -> list[dict]:
    rng = np.random.default_rng([_STREAM, cfg.seed])
    return [demo_pool._scene(rng) for _ in range(cfg.images)]


def pope_rows(scs: list[dict], names: list[str], seed: int) -> list[dict]:
    """POPE's three categories over the scenes, in POPE's order (category by category)."""
    rng = np.random.default_rng([_STREAM, seed, 1])
    present = [sorted({s["shape"] for s in sc["shapes"]}) for sc in scs]
    freq = Counter(itertools.chain.from_iterable(present))
    co: Counter = Counter()
    for p in present:
        for a, b in itertools.permutations(p, 2):
            co[(a, b)] += 1
    # ties broken by the shape list's order, so the choice is fixed
    rank = {s: i for i, s in enumerate(demo_pool.SHAPES)}
    rows = []
    for category in ("adversarial", "popular", "random"):
        for name, have in zip(names, present):
            absent = [s for s in demo_pool.SHAPES if s not in have]
            k = min(len(have), len(absent))
            if category == "random":
                neg = [absent[i] for i in rng.choice(len(absent), size=k, replace=False)]
            elif category == "popular":
                neg = sorted(absent, key=lambda s: (-freq[s], rank[s]))[:k]
            else:
                neg = sorted(absent, key=lambda s: (-sum(co[(h, s)] for h in have), -freq[s],
                                                    rank[s]))[:k]
            for shape, label in [(s, "yes") for s in have] + [(s, "no") for s in neg]:
                rows.append({"image": name, "question": f"Is there a {shape} in the image?",
                             "label": label, "category": category})
    return rows


def gqa_rows(scs: list[dict], names: list[str]) -> list[dict]:
    rows = []
    for i, (sc, name) in enumerate(zip(scs, names)):
        shapes = Counter(s["shape"] for s in sc["shapes"])
        colors = Counter(s["color"] for s in sc["shapes"])
        qs = []
        for s in sc["shapes"]:
            if shapes[s["shape"]] == 1:
                qs.append((f"What color is the {s['shape']}?", s["color"]))
            if colors[s["color"]] == 1:
                qs.append((f"What shape is {s['color']}?", s["shape"]))
        if sc["background"] == "plain":
            qs.append(("What color is the background?", sc["bg"]))
        for j, (q, a) in enumerate(qs):
            rows.append({"question_id": f"{2000000 + i * 10 + j}", "image": name,
                         "question": q, "answer": a})
    return rows


def build(root: str, cfg: DemoBenchConfig = DemoBenchConfig()) -> dict:
    """Write pope/ and gqa/ under `root`. Idempotent: a finished build is reused."""
    from mllm.eval.benchmarks import fixtures

    key = {"images": cfg.images, "seed": cfg.seed, "size": cfg.size}
    if storage.is_done(root, "demo-bench") and storage.done_info(root, "demo-bench").get("config") == key:
        return storage.done_info(root, "demo-bench")
    for folder in ("pope", "gqa"):          # another config's files must not linger
        path = storage.join(root, folder)
        if storage.exists(path):
            fs, p = storage.filesystem(path)
            fs.rm(p, recursive=True)
    scs = scenes(cfg)
    pictures = [demo_pool.draw(sc, cfg.size) for sc in scs]
    coco = [f"COCO_val2014_{900000000 + i:012d}.jpg" for i in range(cfg.images)]
    gqa = [f"n{9000000 + i}.jpg" for i in range(cfg.images)]
    pope = pope_rows(scs, coco, cfg.seed)
    short = gqa_rows(scs, gqa)
    fixtures.write_pope(root, pope, images=dict(zip(coco, pictures)))
    fixtures.write_gqa(root, short, images=dict(zip(gqa, pictures)))
    info = {"root": str(root), "images": cfg.images, "pope": len(pope), "gqa": len(short),
            "pope_yes": sum(r["label"] == "yes" for r in pope), "config": key}
    storage.mark_done(root, "demo-bench", info)
    return info
