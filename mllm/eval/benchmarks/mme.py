"""MME, as LLaVA's convert_answer_to_mme.py + MME's eval_tool/calculation.py score it.

Layout (LLaVA's playground/data/eval/MME/):
    llava_mme.jsonl                     {"question_id": "<subtask>/<...>/<image>", "image", "text", "category"}
    MME_Benchmark_release_version/      the release: <subtask>/images/ + questions_answers_YN/<stem>.txt,
                                        or <subtask>/<image> + <stem>.txt side by side; each
                                        .txt line "question<TAB>Yes|No"

Both questions of an image share LLaVA's question_id (the image path); Warren's ids are
"<that id>#0" and "#1", and LLaVA's own answers are matched by prompt as the converter does.
The ground truth is found as the converter finds it: the prompt without LLaVA's
instruction, + " Please answer yes or no." (with two spaces where the release has two).

Score of a subtask = acc x 100 + acc+ x 100, where acc is over its questions and acc+ over
its images (both questions right); perception and cognition are the sums over their
subtasks (max 2000 and 800). Parsing (calculation.py, after the converter wrote the answer
into a tab-separated line): only the first line of the answer counts (a newline starts a
line the tool drops); lower-cased, "yes" if its first 4 characters (the line break
included) contain "yes", else "no" if they contain "no", else "other" (wrong). An answer
with a tab would break the tool's line; Warren reads the text before the tab.
"""
from __future__ import annotations

import os
import re

from mllm.eval.benchmarks.base import (Base, InputError, Item, Result, field, key, read_jsonl,
                                       unique_ids)
from mllm.eval.types import Question, register

PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR"]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning"]
RELEASE = "MME_Benchmark_release_version"
_INSTRUCTIONS = ("Answer the question using a single word or phrase.",
                 "Answer the question directly with a short sentence or phrase.")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def parse(text: str) -> str:
    pred = (_LINE_BREAK.split(text)[0].split("\t")[0] + "\n").lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def release_question(prompt: str, truth: dict, subtask: str, txt: str) -> str:
    for instruction in _INSTRUCTIONS:
        if instruction in prompt:
            prompt = prompt.replace(instruction, "").strip()
    if "Please answer yes or no." not in prompt:
        prompt = prompt + " Please answer yes or no."
        if (subtask, txt, prompt) not in truth:
            prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
    return prompt


@register("mme")
class MME(Base):
    headline = "perception"
    folders = ("MME", "mme")
    markers = ("llava_mme.jsonl",)
    missing = "error"
    missing_why = ("calculation.py pairs an image's two answers line by line, so every question "
                   "needs one")

    def _truth(self, root: str, subtask: str, txt: str, truth: dict, read: set) -> None:
        """Read one ground-truth file into truth[(subtask, txt, question)] (once)."""
        if (subtask, txt) in read:
            return
        read.add((subtask, txt))
        base = os.path.join(root, RELEASE, subtask)
        folder = os.path.join(base, "questions_answers_YN") if \
            os.path.isdir(os.path.join(base, "images")) else base
        path = os.path.join(folder, txt)
        try:
            f = open(path, encoding="utf-8")
        except FileNotFoundError:
            raise InputError("ground-truth file not found", path=path) from None
        with f:
            for n, line in enumerate(f, 1):
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise InputError(f"line {n}: expected 'question<TAB>answer'", path=path)
                if parts[1].lower() not in ("yes", "no"):
                    raise InputError(f"line {n}: answer {parts[1]!r} is not Yes or No", path=path)
                truth[(subtask, txt, parts[0])] = parts[1].lower()

    def items(self, root: str) -> list[Item]:
        qpath = os.path.join(root, "llava_mme.jsonl")
        rows = read_jsonl(qpath)
        ids = unique_ids(rows, lambda r: r[1].get("question_id"))
        truth: dict = {}
        read: set = set()
        items, per_image = [], {}
        for (n, row), qid in zip(rows, ids):
            where = f"line {n}"
            bare = field(row, "question_id", qpath, where, str)
            text = field(row, "text", qpath, where, str)
            subtask = bare.split("/")[0]
            if subtask not in PERCEPTION + COGNITION:
                raise InputError(f"{where}: '{subtask}' is not an MME subtask "
                                 f"({', '.join(PERCEPTION + COGNITION)})", path=qpath)
            txt = bare.split("/")[-1].split(".")[0] + ".txt"
            self._truth(root, subtask, txt, truth, read)
            question = release_question(text, truth, subtask, txt)
            if (subtask, txt, question) not in truth:
                raise InputError(f"{where}: {question!r} is not a question of "
                                 f"{subtask}/{txt} in the release", path=qpath)
            per_image.setdefault((subtask, key(bare)), []).append(n)
            items.append(Item(Question(qid, text, os.path.join(
                root, RELEASE, field(row, "image", qpath, where, str)), {"category": subtask}, 128),
                gold=(subtask, key(bare), truth[(subtask, txt, question)]),
                alias=(bare, text) if qid != bare else None))
        for (subtask, image), lines in per_image.items():
            if len(lines) != 2:
                raise InputError(f"image {image!r} has {len(lines)} questions (lines "
                                 f"{', '.join(map(str, lines))}); calculation.py scores each "
                                 "image's two questions together", path=qpath)
        return items

    def evaluate(self, root, items, texts, limited) -> Result:
        right: dict = {}
        images: dict = {}
        for it in items:
            subtask, image, gt = it.gold
            ok = parse(texts[it.qid]) == gt
            right[it.qid] = ok
            images.setdefault(subtask, {}).setdefault(image, []).append(ok)
        scores: dict = {}
        credits: dict = {}
        for group, subtasks in (("perception", PERCEPTION), ("cognition", COGNITION)):
            total = 0
            for subtask in subtasks:
                if subtask not in images:
                    continue
                marks = [ok for oks in images[subtask].values() for ok in oks]
                acc = sum(marks) / len(marks)
                acc_plus = sum(all(oks) for oks in images[subtask].values()) / len(images[subtask])
                score = 0
                score += acc * 100
                score += acc_plus * 100
                scores[subtask] = score
                total += score
            scores[group] = total
        for it in items:
            subtask, image, _ = it.gold
            if subtask in PERCEPTION:
                both = all(images[subtask][image])
                credits[it.qid] = (float(right[it.qid]) + float(both)) / 2
        ordered = {"perception": scores.pop("perception"), "cognition": scores.pop("cognition")}
        ordered.update(scores)
        return Result(len(items), ordered, credits)
