"""Scoring an answers file: what `warren eval score` prints, for the CLI and the eval flow.

    score(name, data, answers, limit=None) -> {"benchmark", "n", "scores"}
    read_answers(path) -> rows of a LLaVA answers.jsonl, remembering their line numbers
    headline(name, scores) -> the benchmark's headline number

A bad answers file raises InputError naming the file and line: missing file, a line that
is not JSON, an answer for a question the benchmark does not have, a second answer for a
question, and (where the official script cannot score without them) missing answers.
"""
from __future__ import annotations

import json

from mllm.eval import benchmarks  # noqa: F401  (registers every benchmark)
from mllm.eval.benchmarks.base import Answers
from mllm.eval.types import REGISTRY
from pipelines.errors import ConfigError, InputError


def get(name: str):
    """The benchmark registered under `name`, or a ConfigError listing the names."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown benchmark '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]()


def read_answers(path: str) -> Answers:
    rows, lines = [], []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise InputError("answers file not found", path=path) from None
    except IsADirectoryError:
        raise InputError("is a folder, not an answers file", path=path) from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"line {n}: not valid JSON ({e.msg})", path=path) from None
            lines.append(n)
    return Answers(rows, path=path, lines=lines)


def score(name: str, data: str, answers, limit: int | None = None) -> dict:
    """{"benchmark", "n", "scores"}; `answers` is a path or a list of answer rows."""
    bench = get(name)
    if isinstance(answers, str):
        answers = read_answers(answers)
    result = bench.result(data, answers, limit)
    return {"benchmark": name, "n": result.n, "scores": result.scores}


def headline(name: str, scores: dict):
    """The value at the benchmark's headline path (e.g. "average_f1", "accuracy")."""
    value = scores
    for part in get(name).headline.split("."):
        value = value[part]
    return value
