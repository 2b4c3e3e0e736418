"""A tiny exported model (random weights) and a small benchmark in a file layout of its
own, for the eval engine's tests. The benchmark is registered only while a test uses it
(`registered()`), so the registry other tests see holds the real benchmarks alone.

The question file has the quirks real ones have: a repeated question id, a text-only
question, an image given as bytes, and images in a sub-folder named relative to it.
"""
from __future__ import annotations

import contextlib
import json
import os

import mllm_fixtures as fx
from mllm.eval.types import REGISTRY, Question

NAME = "shapes-test"
PROMPTS = ["What color is the shape?\nAnswer the question using a single word or phrase.",
           "Is there a square in the image?\nAnswer the question using a single word or phrase.",
           "Describe the image."]


def write_model(folder: str, seed: int = 0) -> str:
    """The tiny preset with random weights, exported (no training: seconds)."""
    import torch

    from mllm import export, presets
    from mllm.model import from_config
    if os.path.exists(os.path.join(folder, export.META)):
        return folder
    tok = fx.local_tokenizer()
    cfg = presets.tiny()
    torch.manual_seed(seed)
    vlm = from_config(cfg, tok)
    export.save(vlm, tok, cfg, "bunny", folder)
    return folder


def write_benchmark(root: str, n: int = 40) -> str:
    """`root/shapes-test/questions.jsonl` + images; returns `root`."""
    d = os.path.join(root, NAME)
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    rows = []
    for k, (uid, color, shape) in enumerate(fx.samples(n)):
        image = f"images/{uid}.jpg"
        with open(os.path.join(d, image), "wb") as f:
            f.write(fx.jpeg(color, shape))
        qid = k if k != 7 else 6                         # question ids repeat in real files
        kind = k % 3
        rows.append({"question_id": qid, "image": None if k == 11 else image,
                     "bytes": k == 13, "text": PROMPTS[kind],
                     "answer": color if kind == 0 else ("yes" if shape == "square" else "no")
                     if kind == 1 else f"a {color} {shape}",
                     "max_new_tokens": (4, 4, 12)[kind]})
    with open(os.path.join(d, "questions.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return root


class ShapesTest:
    """Exact-match accuracy (percent) over `questions.jsonl`, and `overlap`: the share
    of the answer's characters the reply contains, per question (a credit a random
    model's replies do not all score 0 on, so paired intervals have width)."""

    name = NAME
    headline = "overlap"

    def questions(self, data_dir: str):
        with open(os.path.join(data_dir, "questions.jsonl"), encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                image = r["image"]
                if image is not None and r["bytes"]:
                    with open(os.path.join(data_dir, image), "rb") as g:
                        image = g.read()
                yield Question(r["question_id"], r["text"], image, {"answer": r["answer"]},
                               r["max_new_tokens"])

    def per_question(self, data_dir: str, answers: list[dict], limit: int | None = None) -> dict:
        out = {}
        for k, a in enumerate(answers):     # by position: question ids repeat in this file
            want = set(a["metadata"]["answer"])
            out[k] = len(want & set(a["text"].lower())) / len(want)
        return out

    def score(self, data_dir: str, answers: list[dict], limit: int | None = None) -> dict:
        n = len(list(self.questions(data_dir))) if limit is None else limit
        if len(answers) != n:                 # as a strict official script: every question answered
            raise ValueError(f"{len(answers)} answers for {n} questions")
        exact = sum(a["text"].strip().lower() == a["metadata"]["answer"] for a in answers)
        credit = self.per_question(data_dir, answers)
        return {"accuracy": 100.0 * exact / len(answers),
                "overlap": 100.0 * sum(credit.values()) / len(answers)}


@contextlib.contextmanager
def registered():
    REGISTRY[NAME] = ShapesTest
    try:
        yield NAME
    finally:
        REGISTRY.pop(NAME, None)
