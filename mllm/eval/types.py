"""The contract between benchmark modules and the generation engine.

A benchmark module (`mllm.eval.benchmarks.<name>`) reads the benchmark's published
files from `data_dir` (laid out as LLaVA's `playground/data/eval/<name>/`), yields its
questions in question-file order, and scores an answers list exactly as the official
script does. It never loads a model; the engine (`mllm.eval.engine`) never parses a
benchmark file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol


@dataclass(frozen=True)
class Question:
    """One question as the model is asked it.

    question_id  as in the question file (int or str, kept as is in answers.jsonl)
    prompt       the user text exactly as LLaVA's eval scripts write it into
                 answers.jsonl's "prompt" (question + "\\n" + the benchmark's instruction);
                 the engine puts the image first (`<image>\\n` + prompt) as training does
    image        a path (absolute, or relative to data_dir), raw bytes (MMBench's base64
                 TSV, decoded), or None for a text-only question
    metadata     whatever the scorer needs back (category, answer, options, ...); copied
                 into the answers line's "metadata"
    max_new_tokens  the benchmark's generation budget (short answers need few tokens)
    """

    question_id: Any
    prompt: str
    image: str | bytes | None = None
    metadata: dict = field(default_factory=dict)
    max_new_tokens: int = 128


class Benchmark(Protocol):
    name: str

    def questions(self, data_dir: str) -> Iterator[Question]:
        """Every question, in question-file order. Bad files raise InputError naming
        the file and row."""

    def score(self, data_dir: str, answers: list[dict]) -> dict:
        """Scores of an answers list (LLaVA answers.jsonl rows: question_id, prompt,
        text, answer_id, model_id, metadata) in the official script's units and
        precision, unrounded. Keys as docs/eval.md lists them."""


REGISTRY: dict[str, Callable[[], Benchmark]] = {}


def register(name: str):
    """Class decorator: `@register("pope") class Pope: ...`."""
    def deco(cls):
        REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco
