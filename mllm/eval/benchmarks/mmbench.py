"""MMBench dev with CircularEval, as MMBench's official eval_mmbench.py scores it.

Layout (LLaVA's playground/data/eval/mmbench/):
    mmbench_dev_20230712.tsv    (or Bunny's MMBench_DEV_EN_legacy.tsv, VLMEvalKit's
                                MMBench_DEV_EN.tsv) columns index, question, hint, A-D,
                                answer, category, l2-category, split, image (base64)

The released dev TSV already holds the circular passes: a question with n options has n
rows, index i, i + 1e6, i + 2e6, ... with the options shifted and the answer letter moved.
Each row is asked once (LLaVA's mmbench.sh). A TSV without those rows (only index < 1e6)
gets them generated as LLaVA's model_vqa_mmbench.py --all-rounds does: round r shows the
options rotated left by r under the same letters; its question_id is index + r x 1e6, the
official numbering, and LLaVA's own all-rounds answers (question_id, round_id) are read
under that id.

Prompt (model_vqa_mmbench.py --single-pred-prompt): [hint + "\\n"] + question, then
"\\n<letter>. <option>" per option (options stop at the first empty one), then "\\n" +
"Answer with the option's letter from the given choices directly." The TSV is read with
pandas, as LLaVA reads it (so a cell "NA" or "None" is empty, as there).

Matching (eval_mmbench.py's exact stage, before it would ask ChatGPT): a lone letter A-E
among the answer's words (unless it is "A" in a reply of more than 3 words: "A" may be an
article), else exactly one letter written "X." "X," "X:" "X)" "X)." "(X)" "(X)." ":X"
":X," ":X." ":X)" ":X).", else the one option whose text appears in the lower-cased
answer. Warren has no ChatGPT: an answer these rules cannot read is wrong (VLMEvalKit's
exact-matching mode does the same). A question counts for circular_accuracy when every
pass is read and right; "accuracy" is the first pass alone. Both are fractions (0-1), as
the script's report.
"""
from __future__ import annotations

import base64
import math

from mllm.eval.benchmarks.base import MCQ, Base, InputError, Item, Result, first_file
from mllm.eval.types import Question, register

TSVS = ("mmbench_dev_20230712.tsv", "MMBench_DEV_EN_legacy.tsv", "MMBench_DEV_EN.tsv")
LETTERS = ["A", "B", "C", "D"]
PASS = 1_000_000
_TUPS = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
         (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")]


def is_none(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def infer_letter(answer: str):
    """The letter an answer names outright, or False."""
    choices = "ABCDE"
    if "Failed to obtain answer via API" in answer:
        return False
    words = [w.strip() for w in answer.split()]

    def count(prefix="", suffix=""):
        return sum(1 for c in choices if prefix + c + suffix in words)

    if count() == 1:
        for ch in choices:
            if "A" in words and len(words) > 3:
                break                      # "A" may be the article: try the spelled forms
            if ch in words:
                return ch
    for prefix, suffix in _TUPS:
        if count(prefix, suffix) == 1:
            for ch in choices:
                if prefix + ch + suffix in words:
                    return ch
    return False


def infer_text(answer: str, choices: dict):
    answer = answer.lower()
    found = [k for k, v in choices.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else False


def infer(answer: str, choices: dict):
    return infer_letter(answer) or infer_text(answer, choices)


@register("mmbench")
class MMBench(Base):
    headline = "circular_accuracy"
    folders = ("mmbench",)
    markers = TSVS
    missing = "error"
    missing_why = "CircularEval needs an answer for every pass of every question"

    def answer_id(self, row: dict):
        qid, r = row["question_id"], row.get("round_id")
        if isinstance(qid, int) and isinstance(r, int) and not isinstance(r, bool) and r > 0:
            return qid + r * PASS          # LLaVA's --all-rounds answers
        return qid

    def scoring_items(self, root: str) -> list[Item]:
        return self.items(root, images=False)

    def _table(self, root):
        path = first_file(root, TSVS)
        import pandas as pd

        try:
            df = pd.read_table(path)
        except Exception as e:              # pandas raises many types for a bad TSV
            raise InputError(f"not a readable TSV ({e})", path=path) from None
        for col in ("index", "question", "answer", "A", "B"):
            if col not in df.columns:
                raise InputError(f"no '{col}' column", path=path)
        return path, df

    def items(self, root: str, images: bool = True) -> list[Item]:
        path, df = self._table(root)
        records = df.to_dict("records")
        indices = []
        for i, rec in enumerate(records):
            idx = rec["index"]
            if isinstance(idx, float) and idx.is_integer():
                idx = int(idx)
            if not isinstance(idx, int) or isinstance(idx, bool):
                try:
                    idx = int(idx)
                except (TypeError, ValueError):
                    raise InputError(f"row {i + 2}: index {rec['index']!r} is not an integer",
                                     path=path) from None
            indices.append(idx)
        if len(set(indices)) != len(indices):
            raise InputError("repeated index values", path=path)
        has_passes = {idx % PASS for idx in indices if idx >= PASS}
        items = []
        for i, (rec, idx) in enumerate(zip(records, indices)):
            where = f"row {i + 2}"          # the header is row 1
            options = []
            for letter in LETTERS:
                value = rec.get(letter)
                if is_none(value):
                    break
                options.append(str(value))
            answer = rec["answer"]
            if answer not in LETTERS[:len(options)]:
                raise InputError(f"{where}: answer {answer!r} is not one of its option letters "
                                 f"{LETTERS[:len(options)]}", path=path)
            if images and (not isinstance(rec.get("image"), str) or not rec["image"]):
                raise InputError(f"{where}: no base64 'image'", path=path)
            image = base64.b64decode(rec["image"]) if images else None
            question = str(rec["question"])
            hint = rec.get("hint")
            if not is_none(hint):
                question = str(hint) + "\n" + question
            category = rec.get("category")
            meta = {"category": None if is_none(category) else str(category), "index": idx % PASS}
            rounds = 1 if (idx >= PASS or idx in has_passes) else len(options)
            a = LETTERS.index(answer)
            for r in range(rounds):
                shown = options[r:] + options[:r]
                prompt = question
                for letter, option in zip(LETTERS, shown):
                    prompt = prompt + "\n" + letter + ". " + option
                prompt = prompt + "\n" + MCQ
                choices = dict(zip(LETTERS, shown))
                if r == 0 and rounds == 1:
                    # a TSV row: its choices are its non-empty A-D cells (build_choices)
                    choices = {l: rec[l] for l in LETTERS if l in rec and not _isna(rec[l])}
                items.append(Item(Question(idx + r * PASS, prompt, image, dict(meta, round=r), 128),
                                  gold=(LETTERS[(a - r) % len(options)], choices)))
        return items

    def evaluate(self, root, items, texts, limited) -> Result:
        read, right = {}, {}
        for it in items:
            text = texts[it.qid]
            # the official evaluator reads predictions back from an .xlsx: "" comes back NaN
            pred = infer("nan" if text == "" else text, dict(it.gold[1]))
            right[it.qid] = bool(pred) and pred == it.gold[0]
        groups: dict[int, list] = {}
        for it in items:
            groups.setdefault(it.qid % PASS, []).append(it.qid)
        mains = [it.qid for it in items if it.qid < PASS]
        hits = {g: all(right[q] for q in groups[g]) for g in mains}
        credits = {q: float(hits[g]) for g in mains for q in groups[g]}
        scores = {"circular_accuracy": sum(hits.values()) / len(mains) if mains else None,
                  "accuracy": sum(right[g] for g in mains) / len(mains) if mains else None}
        return Result(len(credits), scores, credits)


def _isna(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
