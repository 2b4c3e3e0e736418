"""POPE (object hallucination), as LLaVA's eval_pope.py scores it, with Bunny's average F1.

Layout (LLaVA's playground/data/eval/pope/):
    llava_pope_test.jsonl              {"question_id", "image", "text", "category"} per line
    coco/coco_pope_<category>.json     JSON lines {"question_id", "image", "text", "label"}
    val2014/<image>                    COCO val2014 images

eval_pope.py pairs the k-th answer of a category with the k-th line of its label file.
Here the k-th question of a category in llava_pope_test.jsonl is paired with the k-th label
line (same result on answers in question-file order, and checked: image and question must
agree, so a misaligned file is an error instead of a silent wrong score).

Parsing (eval_pope.py): keep the text before the first '.', drop ',', split on single
spaces; "no" if a word is exactly "No", "no" or "not", else "yes" ("not sure" is no,
"Yes, there is." is yes, "NO" is yes, "No\\n" is yes: the newline sticks to the word).
A label other than "no" counts as yes.
"""
from __future__ import annotations

import os

from mllm.eval.benchmarks.base import Base, InputError, Item, Result, field, read_jsonl
from mllm.eval.types import Question, register

CATEGORIES = ("adversarial", "popular", "random")


def says_no(text: str) -> bool:
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "No" in words or "not" in words or "no" in words


def confusion(preds: list[int], labels: list[int]) -> dict:
    """eval_pope.py's five numbers. Where it divides by zero (no "yes" predicted, or no
    "yes" label) precision / recall / F1 are 0.0, as sklearn's zero_division=0 gives."""
    tp = sum(1 for p, l in zip(preds, labels) if p == 1 and l == 1)
    fp = sum(1 for p, l in zip(preds, labels) if p == 1 and l == 0)
    tn = sum(1 for p, l in zip(preds, labels) if p == 0 and l == 0)
    fn = sum(1 for p, l in zip(preds, labels) if p == 0 and l == 1)
    precision = float(tp) / float(tp + fp) if tp + fp else 0.0
    recall = float(tp) / float(tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / (tp + tn + fp + fn), "precision": precision,
            "recall": recall, "f1": f1, "yes_ratio": preds.count(1) / len(preds)}


@register("pope")
class Pope(Base):
    headline = "average_f1"
    folders = ("pope",)
    markers = ("llava_pope_test.jsonl",)
    missing = "error"
    missing_why = "eval_pope.py pairs answers with labels by position, so every question needs one"

    def items(self, root: str) -> list[Item]:
        qpath = os.path.join(root, "llava_pope_test.jsonl")
        rows = read_jsonl(qpath)
        labels = {}
        coco = os.path.join(root, "coco")
        if not os.path.isdir(coco):
            raise InputError("no coco/ folder of POPE label files (coco_pope_<category>.json)",
                             path=root)
        for name in sorted(os.listdir(coco)):
            if name.startswith("coco_pope_") and name.endswith(".json"):
                labels[name[len("coco_pope_"):-len(".json")]] = read_jsonl(os.path.join(coco, name))
        by_cat: dict[str, int] = {}
        items = []
        for n, row in rows:
            where = f"line {n}"
            qid = field(row, "question_id", qpath, where, (int, str))
            text = field(row, "text", qpath, where, str)
            image = field(row, "image", qpath, where, str)
            cat = field(row, "category", qpath, where, str)
            if cat not in labels:
                raise InputError(f"{where}: category '{cat}' has no coco/coco_pope_{cat}.json",
                                 path=qpath)
            k = by_cat.get(cat, 0)
            by_cat[cat] = k + 1
            lpath = os.path.join(coco, f"coco_pope_{cat}.json")
            if k >= len(labels[cat]):
                raise InputError(f"{where}: question {k + 1} of category '{cat}' has no label "
                                 f"line (the label file has {len(labels[cat])})", path=qpath)
            ln, lab = labels[cat][k]
            label = field(lab, "label", lpath, f"line {ln}", str)
            if field(lab, "image", lpath, f"line {ln}", str) != image or \
                    text.split("\n")[0] != str(lab.get("text", "")).split("\n")[0]:
                raise InputError(f"line {ln}: does not match question {k + 1} of category "
                                 f"'{cat}' in llava_pope_test.jsonl (line {n}); eval_pope.py "
                                 "pairs them by position", path=lpath)
            items.append(Item(Question(qid, text, os.path.join(root, "val2014", image),
                                       {"category": cat}, 128),
                              gold=(cat, 0 if label == "no" else 1)))
        for cat, lines in labels.items():
            if by_cat.get(cat, 0) != len(lines):
                raise InputError(f"{len(lines)} labels but {by_cat.get(cat, 0)} '{cat}' questions "
                                 "in llava_pope_test.jsonl",
                                 path=os.path.join(coco, f"coco_pope_{cat}.json"))
        return items

    def evaluate(self, root, items, texts, limited) -> Result:
        scores, credits = {}, {}
        per_cat: dict[str, tuple[list, list]] = {}
        for it in items:
            cat, label = it.gold
            pred = 0 if says_no(texts[it.qid]) else 1
            preds, labels = per_cat.setdefault(cat, ([], []))
            preds.append(pred)
            labels.append(label)
            credits[it.qid] = 1.0 if pred == label else 0.0
        for cat in sorted(per_cat):
            scores[cat] = confusion(*per_cat[cat])
        f1 = 0
        for cat in sorted(per_cat):
            f1 += scores[cat]["f1"]
        scores["average_f1"] = f1 / len(per_cat) if per_cat else None
        return Result(len(items), scores, credits)
