"""GQA testdev-balanced: LLaVA's convert_gqa_for_eval.py, then GQA's eval.py accuracy.

Layout (LLaVA's playground/data/eval/gqa/):
    llava_gqa_testdev_balanced.jsonl            {"question_id", "image", "text", ...} per line
    data/testdev_balanced_questions.json        GQA's release: {qid: {"answer", "isBalanced", ...}}
                                                (also accepted next to the .jsonl, as Bunny has it)
    data/images/<image>

Answer processing (convert_gqa_for_eval.py): text.rstrip('.').lower() - trailing periods
go, trailing spaces and other punctuation stay. eval.py: exact match with the release's
answer, averaged over the questions with isBalanced, x100 (an empty set gives 0, as its
avg()). It refuses to score when a balanced question has no prediction; so does Warren.
"""
from __future__ import annotations

import os

from mllm.eval.benchmarks.base import (Base, InputError, Item, Result, field, first_file, key,
                                       read_json, read_jsonl)
from mllm.eval.types import Question, register

RELEASE = ("data/testdev_balanced_questions.json", "testdev_balanced_questions.json")


def process(text: str) -> str:
    return text.rstrip(".").lower()


@register("gqa")
class GQA(Base):
    headline = "accuracy"
    folders = ("gqa",)
    markers = ("llava_gqa_testdev_balanced.jsonl",)
    missing = "error"
    missing_why = "GQA's eval.py stops with 'missing predictions' unless every balanced question has one"

    def needs_answer(self, item: Item) -> bool:
        return item.gold[1]

    def _release(self, root):
        path = first_file(root, RELEASE)
        release = read_json(path)
        if not isinstance(release, dict):
            raise InputError("expected an object {questionId: question}", path=path)
        return path, release

    def items(self, root: str) -> list[Item]:
        qpath = os.path.join(root, "llava_gqa_testdev_balanced.jsonl")
        rpath, release = self._release(root)
        items = []
        for n, row in read_jsonl(qpath):
            where = f"line {n}"
            qid = field(row, "question_id", qpath, where, (str, int))
            ref = release.get(key(qid))
            if ref is None:
                raise InputError(f"{where}: question {qid!r} is not in {os.path.basename(rpath)}",
                                 path=qpath)
            answer = field(ref, "answer", rpath, f"question {key(qid)!r}", str)
            balanced = bool(ref.get("isBalanced", False))
            items.append(Item(Question(qid, field(row, "text", qpath, where, str),
                                       os.path.join(root, "data", "images",
                                                    field(row, "image", qpath, where, str)),
                                       {}, 128),
                              gold=(answer, balanced)))
        return items

    def evaluate(self, root, items, texts, limited) -> Result:
        if not limited:
            rpath, release = self._release(root)
            asked = {key(it.qid) for it in items}
            for qid, ref in release.items():
                if isinstance(ref, dict) and ref.get("isBalanced") and qid not in asked:
                    raise InputError(f"balanced question {qid!r} is not in "
                                     "llava_gqa_testdev_balanced.jsonl; eval.py needs a prediction "
                                     "for every one", path=rpath)
        scores, credits = [], {}
        for it in items:
            answer, balanced = it.gold
            if not balanced:
                continue                   # asked, but eval.py scores balanced questions only
            s = float(1 if process(texts[it.qid]) == answer else 0)
            scores.append(s)
            credits[it.qid] = s
        accuracy = float(sum(scores)) / len(scores) * 100 if scores else 0.0
        return Result(len(scores), {"accuracy": accuracy}, credits)
