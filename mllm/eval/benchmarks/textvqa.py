"""TextVQA val, as LLaVA's eval_textvqa.py (VQA accuracy of m4c_evaluator.py).

Layout (LLaVA's playground/data/eval/textvqa/):
    llava_textvqa_val_v051_ocr.jsonl   {"question_id": <image id>, "image", "text"} per line;
                                       text = question + "\\nReference OCR token: ..." +
                                       "\\nAnswer the question using a single word or phrase."
    TextVQA_0.5.1_val.json             {"data": [{"image_id", "question", "answers": [10 x str]}]}
    train_images/<image>

LLaVA's question file names each question by its image, so an image's questions share an
id; Warren numbers the repeats "<image id>#<k>" and still accepts LLaVA's answers under the
bare id, matched by prompt. The reference finds the annotation by (image id, question
lower-cased), the question cut from the prompt (the line before "Reference OCR token:",
or the first of two lines); when two annotations share that pair the later one wins.

Missing answers: eval_textvqa.py scores the answers it is given, so an unanswered question
is left out of the mean (and out of "n").
"""
from __future__ import annotations

import os
import re

from mllm.eval.benchmarks import vqa_accuracy
from mllm.eval.benchmarks.base import (Base, InputError, Item, Result, field, read_json,
                                       read_jsonl, unique_ids)
from mllm.eval.types import Question, register


def question_of(prompt: str) -> str | None:
    """The question inside a LLaVA TextVQA prompt, lower-cased (None: unknown shape)."""
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        return m.group(1).lower() if m else None
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    if len(lines) == 2:
        return lines[0].lower()
    return None


@register("textvqa")
class TextVQA(Base):
    headline = "accuracy"
    folders = ("textvqa",)
    markers = ("llava_textvqa_val_v051_ocr.jsonl",)
    missing = "skip"

    def items(self, root: str) -> list[Item]:
        qpath = os.path.join(root, "llava_textvqa_val_v051_ocr.jsonl")
        apath = os.path.join(root, "TextVQA_0.5.1_val.json")
        release = read_json(apath)
        if not isinstance(release, dict) or not isinstance(release.get("data"), list):
            raise InputError("expected {\"data\": [...]}", path=apath)
        annotations = {}
        for i, a in enumerate(release["data"]):
            where = f"data[{i}]"
            pair = (field(a, "image_id", apath, where, (str, int)),
                    field(a, "question", apath, where, str).lower())
            annotations[pair] = field(a, "answers", apath, where, list)   # later wins
        rows = read_jsonl(qpath)
        ids = unique_ids(rows, lambda r: r[1].get("question_id"))
        items = []
        for (n, row), qid in zip(rows, ids):
            where = f"line {n}"
            bare = field(row, "question_id", qpath, where, (str, int))
            text = field(row, "text", qpath, where, str)
            question = question_of(text)
            if question is None:
                raise InputError(f"{where}: prompt is not of a shape eval_textvqa.py reads "
                                 "(question, OCR line, instruction)", path=qpath)
            answers = annotations.get((bare, question))
            if answers is None:
                raise InputError(f"{where}: no annotation for image {bare!r} and question "
                                 f"{question!r} in TextVQA_0.5.1_val.json", path=qpath)
            if len(answers) != 10 or not all(isinstance(a, str) for a in answers):
                raise InputError(f"{where}: its annotation has {len(answers)} answers; VQA "
                                 "accuracy needs 10 strings", path=apath)
            items.append(Item(Question(qid, text, os.path.join(
                root, "train_images", field(row, "image", qpath, where, str)), {}, 128),
                gold=answers, alias=(bare, text) if qid != bare else None))
        return items

    def evaluate(self, root, items, texts, limited) -> Result:
        credits = {it.qid: vqa_accuracy.credit(texts[it.qid], it.gold)
                   for it in items if texts[it.qid] is not None}
        accuracy = 100. * vqa_accuracy.mean(list(credits.values())) if credits else None
        return Result(len(credits), {"accuracy": accuracy}, credits)
