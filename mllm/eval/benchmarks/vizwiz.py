"""VizWiz-VQA val (local; unanswerable questions included), with m4c's VQA accuracy.

test is scored only by the EvalAI server (LLaVA's vizwiz.sh writes an upload file);
Warren scores val, whose ten human answers per question are public. "unanswerable" is an
answer like any other: a model that says "Unanswerable" where 3+ humans did gets credit.

Layout (playground/data/eval/vizwiz/, the official release):
    val.json        [{"image", "question", "answers": [{"answer", ...} x10], "answerable", ...}]
    val/<image>

question_id: the entry's index in val.json (LLaVA numbers its test file the same way).
Prompt (LLaVA's llava_test.jsonl): question + "\\nWhen the provided information is
insufficient, respond with 'Unanswerable'.\\nAnswer the question using a single word or
phrase." Missing answers: convert_vizwiz_for_submission.py asserts each question has one.
"""
from __future__ import annotations

import os

from mllm.eval.benchmarks import vqa_accuracy
from mllm.eval.benchmarks.base import SHORT, Base, InputError, Item, Result, field, read_json
from mllm.eval.types import Question, register

UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."


@register("vizwiz")
class VizWiz(Base):
    headline = "accuracy"
    folders = ("vizwiz",)
    markers = ("val.json",)
    missing = "error"
    hint = ("VizWiz test is scored only by the EvalAI server; Warren scores val (val.json and "
            "val/ from the VizWiz release)")
    missing_why = "convert_vizwiz_for_submission.py asserts every question has an answer"

    def items(self, root: str) -> list[Item]:
        path = os.path.join(root, "val.json")
        entries = read_json(path)
        if not isinstance(entries, list):
            raise InputError("expected a JSON list (VizWiz val.json)", path=path)
        items = []
        for i, e in enumerate(entries):
            where = f"entry {i}"
            answers = [field(h, "answer", path, f"{where}.answers", str)
                       for h in field(e, "answers", path, where, list)]
            if len(answers) != 10:
                raise InputError(f"{where}: {len(answers)} answers; VQA accuracy needs 10", path=path)
            prompt = field(e, "question", path, where, str) + "\n" + UNANSWERABLE + "\n" + SHORT
            items.append(Item(Question(i, prompt, os.path.join(
                root, "val", field(e, "image", path, where, str)),
                {"answerable": e.get("answerable")}, 128), gold=answers))
        return items

    def evaluate(self, root, items, texts, limited) -> Result:
        credits = {it.qid: vqa_accuracy.credit(texts[it.qid], it.gold) for it in items}
        accuracy = 100. * vqa_accuracy.mean(list(credits.values())) if credits else None
        return Result(len(credits), {"accuracy": accuracy}, credits)
