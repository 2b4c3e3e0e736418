"""SEED-Bench, image questions, as LLaVA's convert_seed_for_submission.py scores them.

Layout (LLaVA's playground/data/eval/seed_bench/):
    llava-seed-bench.jsonl     {"question_id", "image", "text"} per line (image and video
                               questions; text = question, "\\nA. ..." per choice, "\\n" +
                               "Answer with the option's letter from the given choices directly.")
    SEED-Bench.json            the release: {"questions": [{"question_id", "answer",
                               "data_type", "question_type_id", ...}], "question_type": {name: id}}
    SEED-Bench-image/<image>

Only image questions (data_type "image", dimensions 1-9) are asked and scored. The
reference counts an answer right when its text equals the answer letter exactly ("A" is
right, "A." and " A" are not) and counts a question without an answer as wrong. Scores:
"accuracy" over all image questions and one per dimension (its name in the release), in
percent.
"""
from __future__ import annotations

import os

from mllm.eval.benchmarks.base import (Base, InputError, Item, Result, field, key, read_json,
                                       read_jsonl)
from mllm.eval.types import Question, register


@register("seed")
class Seed(Base):
    headline = "accuracy"
    folders = ("seed_bench",)
    markers = ("llava-seed-bench.jsonl",)
    missing = "wrong"

    def _release(self, root):
        path = os.path.join(root, "SEED-Bench.json")
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list) \
                or not isinstance(data.get("question_type"), dict):
            raise InputError("expected {\"questions\": [...], \"question_type\": {...}}", path=path)
        names = {v: k for k, v in data["question_type"].items()}
        release = []
        for i, q in enumerate(data["questions"]):
            where = f"questions[{i}]"
            qid = field(q, "question_id", path, where, (str, int))
            dim = field(q, "question_type_id", path, where, int)
            if dim not in names:
                raise InputError(f"{where}: question_type_id {dim} is not in question_type", path=path)
            release.append((key(qid), field(q, "data_type", path, where, str),
                            names[dim], dim, field(q, "answer", path, where, str)))
        return release

    def items(self, root: str) -> list[Item]:
        qpath = os.path.join(root, "llava-seed-bench.jsonl")
        release = {r[0]: r for r in self._release(root)}
        items = []
        for n, row in read_jsonl(qpath):
            where = f"line {n}"
            qid = field(row, "question_id", qpath, where, (str, int))
            ref = release.get(key(qid))
            if ref is None:
                raise InputError(f"{where}: question {qid!r} is not in SEED-Bench.json", path=qpath)
            if ref[1] != "image":
                continue
            items.append(Item(Question(qid, field(row, "text", qpath, where, str), os.path.join(
                root, field(row, "image", qpath, where, str)), {"dimension": ref[2]}, 128),
                gold=ref))
        return items

    def evaluate(self, root, items, texts, limited) -> Result:
        if limited:
            population = [(it.qid, it.gold) for it in items]
        else:
            asked = {key(it.qid): it.qid for it in items}
            population = [(asked.get(r[0], r[0]), r) for r in self._release(root) if r[1] == "image"]
        counts: dict[int, list] = {}
        credits, names = {}, {}
        for qid, (_, _, name, dim, answer) in population:
            text = texts.get(qid)
            ok = text is not None and text == answer
            counts.setdefault(dim, [0, 0])
            counts[dim][0] += 1
            counts[dim][1] += ok
            names[dim] = name
            credits[qid] = float(ok)
        total = correct = 0
        scores: dict = {}
        per_dim = {}
        for dim in sorted(counts):
            per_dim[names[dim]] = counts[dim][1] / counts[dim][0] * 100
            total += counts[dim][0]
            correct += counts[dim][1]
        scores["accuracy"] = correct / total * 100 if total else None
        scores.update(per_dim)
        return Result(total, scores, credits)
