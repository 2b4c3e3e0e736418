"""ScienceQA (test split; IMG = its questions with an image), as LLaVA's eval_science_qa.py.

Layout (LLaVA's playground/data/eval/scienceqa/):
    llava_test_CQM-A.json   [{"id", "image"?, "conversations": [{"from": "human", "value"}, ...]}]
    problems.json           {pid: {"choices": [...], "answer": index, ...}}
    pid_splits.json         {"test": [pid, ...], ...}
    images/test/<image>

Prompt (model_vqa_science.py --single-pred-prompt): the human turn without "<image>",
stripped, + "\\n" + "Answer with the option's letter from the given choices directly."

Parsing: the text itself if it is one of A-E; else its first letter if it reads "B. ...";
else the letter of "The answer is X." when that pattern occurs exactly once (the '.' there
is any character); else FAILED. A letter past the problem's choices, FAILED, and a problem
with no answer are wrong. Scored over pid_splits["test"] in its order.

"img_accuracy" counts a problem as multimodal when its answer's prompt holds "<image>"
(LLaVA writes "<image>\\n" before image questions). Warren decides from the question file
instead ("image" in the entry), which is the same for LLaVA's answers and also right for
answers whose prompt omits the tag. Like the reference, an unanswered problem is wrong and
outside the IMG population (its placeholder prompt has no "<image>").
"""
from __future__ import annotations

import os
import re

from mllm.eval.benchmarks.base import MCQ, Base, InputError, Item, Result, field, read_json
from mllm.eval.types import Question, register

OPTIONS = ["A", "B", "C", "D", "E"]
_THE_ANSWER = re.compile(r"The answer is ([A-Z]).")


def parse(text: str) -> str:
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def choice_index(letter: str, n_choices: int) -> int:
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


@register("scienceqa")
class ScienceQA(Base):
    headline = "img_accuracy"
    folders = ("scienceqa",)
    markers = ("llava_test_CQM-A.json",)
    missing = "wrong"

    def _problems(self, root):
        ppath = os.path.join(root, "problems.json")
        problems = read_json(ppath)
        splits = read_json(os.path.join(root, "pid_splits.json"))
        if not isinstance(problems, dict):
            raise InputError("expected an object {pid: problem}", path=ppath)
        if not isinstance(splits, dict) or not isinstance(splits.get("test"), list):
            raise InputError("no 'test' list", path=os.path.join(root, "pid_splits.json"))
        for pid in splits["test"]:
            prob = problems.get(pid)
            if prob is None:
                raise InputError(f"test problem {pid!r} of pid_splits.json is missing", path=ppath)
            field(prob, "choices", ppath, f"problem {pid!r}", list)
            field(prob, "answer", ppath, f"problem {pid!r}", int)
        return problems, splits["test"]

    def items(self, root: str) -> list[Item]:
        qpath = os.path.join(root, "llava_test_CQM-A.json")
        entries = read_json(qpath)
        if not isinstance(entries, list):
            raise InputError("expected a JSON list of questions", path=qpath)
        problems, test = self._problems(root)
        in_test = set(test)
        items = []
        for i, e in enumerate(entries):
            where = f"entry {i}"
            qid = field(e, "id", qpath, where, (str, int))
            convs = field(e, "conversations", qpath, where, list)
            if not convs or not isinstance(convs[0], dict):
                raise InputError(f"{where}: no human turn", path=qpath)
            value = field(convs[0], "value", qpath, f"{where} turn 0", str)
            if qid not in in_test:
                raise InputError(f"{where}: id {qid!r} is not in pid_splits.json's test split",
                                 path=qpath)
            image = None
            if "image" in e:
                image = os.path.join(root, "images", "test", field(e, "image", qpath, where, str))
            prompt = value.replace("<image>", "").strip() + "\n" + MCQ
            prob = problems[qid]
            items.append(Item(Question(qid, prompt, image, {}, 128),
                              gold=(prob["answer"], len(prob["choices"]), image is not None)))
        return items

    def evaluate(self, root, items, texts, limited) -> Result:
        if limited:
            population = [(it.qid, it.gold) for it in items]
        else:
            problems, test = self._problems(root)
            asked = {it.qid: it.gold for it in items}
            population = [(pid, asked.get(pid, (problems[pid]["answer"], len(problems[pid]["choices"]),
                                                False))) for pid in test]
        correct = total = mm_correct = mm_total = 0
        credits = {}
        for pid, (answer, n_choices, has_image) in population:
            text = texts.get(pid)
            letter = "FAILED" if text is None else parse(text)
            ok = choice_index(letter, n_choices) == answer
            multimodal = has_image and text is not None
            total += 1
            correct += ok
            if multimodal:
                mm_total += 1
                mm_correct += ok
                credits[pid] = 1.0 if ok else 0.0
        scores = {"accuracy": correct / total * 100 if total else None,
                  "img_accuracy": mm_correct / mm_total * 100 if mm_total else None}
        return Result(total, scores, credits)
