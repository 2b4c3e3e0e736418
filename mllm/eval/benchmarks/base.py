"""What every benchmark module shares: finding its folder, reading its files with errors
that name the file and row, and pairing an answers list with the questions.

A benchmark subclasses `Base` and writes two things: `items(root)` (every question of its
file, in file order, with what the scorer needs to know about it) and `evaluate(...)`
(its official metric over the answer texts). `questions`, `score` and `per_question`
(the `mllm.eval.types.Benchmark` protocol) follow from those.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Literal

from mllm.eval.types import Question
from pipelines.errors import ConfigError, InputError

MCQ = "Answer with the option's letter from the given choices directly."
SHORT = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class Item:
    """One question and what its scorer needs (never shown to the model).

    alias  (bare id, prompt) where the published file repeats the id: how LLaVA's own
           answers name this question (its scripts match such answers by prompt)
    """

    question: Question
    gold: Any = None
    alias: tuple | None = None

    @property
    def qid(self):
        return self.question.question_id


@dataclass
class Result:
    n: int                 # questions the scores cover
    scores: dict
    credits: dict          # question_id -> credit towards the headline (per_question)


def key(qid) -> str:
    """Question ids compare as text: LLaVA's files mix "5" and 5 across tools."""
    return str(qid)


class Base:
    name: str
    headline: str
    folders: tuple[str, ...]    # the sub-folder(s) of the eval root, LLaVA's name first
    markers: tuple[str, ...]    # files that identify the benchmark's folder
    # What the official script does with a question that has no answer:
    #   error  it fails or silently misaligns -> we refuse, naming the first one
    #   wrong  it counts the question wrong
    #   skip   it leaves the question out of the denominator
    missing: Literal["error", "wrong", "skip"] = "error"
    missing_why: str = ""
    hint: str = ""               # added to "no files" errors (e.g. which split is local)

    # ---- to implement -------------------------------------------------------------
    def items(self, root: str) -> list[Item]:
        raise NotImplementedError

    def evaluate(self, root: str, items: list[Item], texts: dict, limited: bool) -> Result:
        """`texts`: question_id -> answer text (None: unanswered, for `missing` = wrong or
        skip). `limited`: the items are the first N of the file (population checks that
        need the whole file are off)."""
        raise NotImplementedError

    def scoring_items(self, root: str) -> list[Item]:
        """items() for scoring: a benchmark may skip what only the model needs (images)."""
        return self.items(root)

    def needs_answer(self, item: Item) -> bool:
        """Whether the official script needs an answer for this question (GQA: balanced)."""
        return True

    def answer_id(self, row: dict):
        """The question id an answers row names (MMBench folds in LLaVA's round_id)."""
        return row["question_id"]

    # ---- the protocol -------------------------------------------------------------
    def root(self, data_dir: str) -> str:
        """The benchmark's folder: `data_dir/<folder>` (data_dir is LLaVA's eval root)
        or `data_dir` itself (it is the benchmark's folder)."""
        data_dir = os.path.expanduser(str(data_dir))
        if not os.path.isdir(data_dir):
            raise InputError("no such folder", path=data_dir)
        for base in [os.path.join(data_dir, f) for f in self.folders] + [data_dir]:
            for marker in self.markers:
                if os.path.isfile(os.path.join(base, marker)):
                    return os.path.abspath(base)
        raise InputError(
            f"no {self.name} files: expected {self.folders[0]}/{self.markers[0]} under the eval "
            f"root, or {self.markers[0]} in the benchmark's own folder (see docs/eval.md)"
            + (f"; {self.hint}" if self.hint else ""), path=data_dir)

    def questions(self, data_dir: str) -> Iterator[Question]:
        root = self.root(data_dir)
        items = self.items(root)
        check_unique(self, items)
        for item in items:
            image = item.question.image
            if isinstance(image, str) and not os.path.isfile(image):
                raise InputError(f"image of question {item.qid!r} not found", path=image)
            yield item.question

    def result(self, data_dir: str, answers: list[dict], limit: int | None = None) -> Result:
        if limit is not None and limit < 1:
            raise ConfigError(f"--limit must be at least 1, not {limit}")
        root = self.root(data_dir)
        everything = self.scoring_items(root)
        items = everything if limit is None else everything[:limit]
        texts = match(self, items, everything, answers)
        return self.evaluate(root, items, texts, limited=len(items) < len(everything))

    def score(self, data_dir: str, answers: list[dict], limit: int | None = None) -> dict:
        return self.result(data_dir, answers, limit).scores

    def per_question(self, data_dir: str, answers: list[dict], limit: int | None = None) -> dict:
        return self.result(data_dir, answers, limit).credits

    def image(self, root: str, *parts: str) -> str:
        return os.path.join(root, *parts)


class Answers(list):
    """Answer rows read from a file, remembering where each came from for errors."""

    def __init__(self, rows=(), path: str = "answers", lines: list[int] | None = None):
        super().__init__(rows)
        self.path = path
        self.lines = lines


def _where(answers, i: int) -> str:
    lines = getattr(answers, "lines", None)
    return f"line {lines[i]}" if lines else f"answer {i + 1}"


def check_unique(bench: Base, items: list[Item]) -> None:
    seen: set[str] = set()
    for it in items:
        if key(it.qid) in seen:
            raise InputError(f"question_id {it.qid!r} appears twice in the {bench.name} question "
                             "file (ids are compared as text)", path=bench.markers[0])
        seen.add(key(it.qid))


def match(bench: Base, items: list[Item], everything: list[Item], answers: list[dict]) -> dict:
    """question_id -> answer text for `items` (None where unanswered and the benchmark's
    official script allows it). Every answer must name a question of the file once."""
    path = getattr(answers, "path", "answers")
    check_unique(bench, everything)
    by_key = {key(it.qid): it.qid for it in everything}
    aliases: dict[tuple, list] = {}
    for it in everything:
        if it.alias is not None:
            aliases.setdefault((key(it.alias[0]), it.alias[1]), []).append(it.qid)
    wanted = {key(it.qid) for it in items}
    texts: dict = {}
    first: dict = {}
    for i, row in enumerate(answers):
        where = _where(answers, i)
        if not isinstance(row, dict):
            raise InputError(f"{where}: not a JSON object", path=path)
        for field, types in (("question_id", (str, int)), ("text", (str,))):
            if field not in row:
                raise InputError(f"{where}: no '{field}'", path=path)
            if not isinstance(row[field], types) or isinstance(row[field], bool):
                raise InputError(f"{where}: '{field}' is {type(row[field]).__name__}, "
                                 f"expected {' or '.join(t.__name__ for t in types)}", path=path)
        named = bench.answer_id(row)
        qid = by_key.get(key(named))
        if qid is None:
            queue = aliases.get((key(named), row.get("prompt")))
            if queue:
                qid = queue.pop(0)
            elif (key(named), row.get("prompt")) in aliases:
                raise InputError(f"{where}: a second answer for question {named!r} with this "
                                 "prompt", path=path)
        if qid is None:
            shared = any(a[0] == key(named) for a in aliases)
            raise InputError(f"{where}: question_id {named!r} " + (
                "names several questions and its prompt matches none of them" if shared else
                f"is not a question of {bench.name}"), path=path)
        if key(qid) not in wanted:
            continue                                      # past --limit
        if qid in texts:
            raise InputError(f"{where}: a second answer for question {qid!r} "
                             f"(first at {first[qid]})", path=path)
        texts[qid] = row["text"]
        first[qid] = where
    required = [it for it in items if bench.needs_answer(it)]
    absent = [it.qid for it in required if it.qid not in texts]
    if absent and bench.missing == "error":
        raise InputError(f"no answer for {len(absent)} of {len(required)} {bench.name} questions "
                         f"(first: {absent[0]!r}); {bench.missing_why}", path=path)
    for it in items:
        texts.setdefault(it.qid, None)
    return texts


# ---- reading published files ------------------------------------------------------
def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError("file not found", path=path) from None
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON (line {e.lineno}: {e.msg})", path=path) from None


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    rows = []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise InputError("file not found", path=path) from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"line {n}: not valid JSON ({e.msg})", path=path) from None
            if not isinstance(obj, dict):
                raise InputError(f"line {n}: not a JSON object", path=path)
            rows.append((n, obj))
    return rows


def field(obj: dict, name: str, path: str, where: str, types=None):
    """obj[name], or an InputError naming file, row and field."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: not a JSON object", path=path)
    if name not in obj:
        raise InputError(f"{where}: no '{name}'", path=path)
    value = obj[name]
    if types is not None and (not isinstance(value, types) or isinstance(value, bool)):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise InputError(f"{where}: '{name}' is {type(value).__name__}, expected {names}", path=path)
    return value


def first_file(root: str, names: tuple[str, ...]) -> str:
    """The first of `names` that exists under root (the first name if none does, so the
    error names the expected file)."""
    for name in names:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return os.path.join(root, names[0])


def unique_ids(rows: list, id_of) -> list:
    """Warren's question id per row: the file's id, or `"<id>#<k>"` for the k-th of an id
    the file repeats (MME, LLaVA's TextVQA)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[key(id_of(r))] = counts.get(key(id_of(r)), 0) + 1
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        k = key(id_of(r))
        if counts[k] == 1:
            out.append(id_of(r))
        else:
            out.append(f"{id_of(r)}#{seen.get(k, 0)}")
            seen[k] = seen.get(k, 0) + 1
    return out


def ratio(num: float, den: float):
    """num / den, or None (JSON null) where the population is empty."""
    return num / den if den else None
