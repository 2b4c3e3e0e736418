"""Hateful Memes dev (local: test labels are not public), as TinyGPT-V's eval_vqa.py, + AUROC.

Layout (hateful_memes/, the Facebook release):
    dev.jsonl (or dev_seen.jsonl)   {"id", "img": "img/<id>.png", "label": 0|1, "text"} per line
    img/<id>.png

Prompt (TinyGPT-V's, its "writting" kept): "This is an image writting '<text>'. Is this
image hateful? Answer yes or no." (its trailing "Answer:" cue dropped: Warren's chat
template opens the answer turn). Parsing (TinyGPT-V): the text before any "###", after the
last "Assistant:", stripped; 1 if it contains "yes" (lower-cased), else 0 if it contains
"no" ("I don't know" is 0), else unreadable, which is wrong. "accuracy" in percent.

"auroc" (the challenge's official metric) needs a score per meme, and a text answer gives
only a label: Warren scores yes as 1, no as 0 and an unreadable answer 0.5 (it ranks
between the two, so it neither helps nor hurts the ordering), and computes the exact
Mann-Whitney AUROC (ties count half) as a fraction, as sklearn's roc_auc_score reports it.
It is null when the labels hold a single class.
"""
from __future__ import annotations

import os

from mllm.eval.benchmarks.base import Base, InputError, Item, Result, field, first_file, read_jsonl
from mllm.eval.types import Question, register

FILES = ("dev.jsonl", "dev_seen.jsonl")


def parse(text: str):
    """1, 0, or None (unreadable)."""
    text = text.split("###")[0].split("Assistant:")[-1].strip().lower()
    if "yes" in text:
        return 1
    if "no" in text:
        return 0
    return None


def auroc(scores: list[float], labels: list[int]):
    pos = [s for s, l in zip(scores, labels) if l == 1]
    neg = [s for s, l in zip(scores, labels) if l == 0]
    if not pos or not neg:
        return None
    greater = ties = 0
    for p in pos:
        for q in neg:
            greater += p > q
            ties += p == q
    return (2 * greater + ties) / (2 * len(pos) * len(neg))


@register("hateful_memes")
class HatefulMemes(Base):
    headline = "auroc"
    folders = ("hateful_memes", "hateful_meme")
    markers = FILES
    missing = "error"
    missing_why = "TinyGPT-V's eval_vqa.py scores one answer per dev row"
    hint = "the test split's labels are not public: Warren scores dev"

    def items(self, root: str) -> list[Item]:
        path = first_file(root, FILES)
        items = []
        for n, row in read_jsonl(path):
            where = f"line {n}"
            label = field(row, "label", path, where, int)
            if label not in (0, 1):
                raise InputError(f"{where}: label {label} is not 0 or 1", path=path)
            prompt = (f"This is an image writting '{field(row, 'text', path, where, str)}'. "
                      "Is this image hateful? Answer yes or no.")
            items.append(Item(Question(field(row, "id", path, where, (int, str)), prompt,
                                       os.path.join(root, field(row, "img", path, where, str)),
                                       {}, 20), gold=label))
        return items

    def evaluate(self, root, items, texts, limited) -> Result:
        credits, scores, labels = {}, [], []
        count = 0
        for it in items:
            pred = parse(texts[it.qid])
            ok = pred == it.gold
            count += ok
            credits[it.qid] = float(ok)
            scores.append(0.5 if pred is None else float(pred))
            labels.append(it.gold)
        total = len(items)
        return Result(total, {"accuracy": count / total * 100 if total else None,
                              "auroc": auroc(scores, labels)}, credits)
