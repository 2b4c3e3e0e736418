"""VSR (Visual Spatial Reasoning), zero-shot test split, as TinyGPT-V's eval_vqa.py scores it.

Layout (vsr/, from the VSR release, cambridgeltl/visual-spatial-reasoning):
    test.jsonl (or splits/zeroshot/test.jsonl, data/splits/zeroshot/test.jsonl)
                     {"image", "caption", "label": 0|1, "relation", ...} per line
                     (the same rows as the hub's cambridgeltl/vsr_zeroshot test split)
    images/<image>   COCO 2017 images (TinyGPT-V also looks in train2017/ and val2017/)

question_id: the line's index in the file (VSR rows carry no id). Prompt: TinyGPT-V's
"Based on the image, is this statement true or false? <caption>" without MiniGPT-v2's
"[vqa]" task tag, + "\\n" + LLaVA's short-answer instruction. Scoring: right when "true"
(label 1) or "false" (label 0) occurs anywhere in the lower-cased answer - so "not true"
and "untrue" count as "true", as in the reference. Accuracy in percent.
"""
from __future__ import annotations

import os

from mllm.eval.benchmarks.base import SHORT, Base, InputError, Item, Result, field, first_file, read_jsonl
from mllm.eval.types import Question, register

FILES = ("test.jsonl", "splits/zeroshot/test.jsonl", "data/splits/zeroshot/test.jsonl")
IMAGE_DIRS = ("images", "train2017", "val2017")


def is_right(text: str, label: int) -> bool:
    word = "true" if label == 1 else "false"
    return word in text.replace("<unk>", "").strip().lower()


@register("vsr")
class VSR(Base):
    headline = "accuracy"
    folders = ("vsr",)
    markers = FILES
    missing = "error"
    missing_why = "TinyGPT-V's eval_vqa.py scores one answer per test row"

    def items(self, root: str) -> list[Item]:
        path = first_file(root, FILES)
        items = []
        for i, (n, row) in enumerate(read_jsonl(path)):
            where = f"line {n}"
            label = field(row, "label", path, where, int)
            if label not in (0, 1):
                raise InputError(f"{where}: label {label} is not 0 or 1", path=path)
            name = field(row, "image", path, where, str)
            image = os.path.join(root, IMAGE_DIRS[0], name)
            for d in IMAGE_DIRS:
                if os.path.isfile(os.path.join(root, d, name)):
                    image = os.path.join(root, d, name)
                    break
            prompt = ("Based on the image, is this statement true or false? "
                      + field(row, "caption", path, where, str) + "\n" + SHORT)
            items.append(Item(Question(i, prompt, image, {"relation": row.get("relation")}, 20),
                              gold=label))
        return items

    def evaluate(self, root, items, texts, limited) -> Result:
        credits = {it.qid: float(is_right(texts[it.qid], it.gold)) for it in items}
        count = sum(1 for v in credits.values() if v)
        accuracy = count / len(credits) * 100 if credits else None
        return Result(len(credits), {"accuracy": accuracy}, credits)
