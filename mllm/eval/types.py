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

    question_id  as in the question file (int or str, kept as is in answers.jsonl),
                 unique within a benchmark. Where the published file repeats an id (MME
                 names both questions of an image by the image; LLaVA's TextVQA file names
                 questions by their image), each repeat is `"<id>#<k>"` (k-th occurrence,
                 from 0); the scorer still accepts LLaVA's own answers under the bare id,
                 matched by prompt as the official scripts match them
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
    # Dotted path into score()'s dict of the number a paper reports for this benchmark
    # ("accuracy", "average_f1", "perception", ...).
    headline: str

    def questions(self, data_dir: str) -> Iterator[Question]:
        """Every question, in question-file order. `data_dir` is the eval root (LLaVA's
        playground/data/eval/) or the benchmark's own folder. Bad files raise InputError
        naming the file and row."""

    def score(self, data_dir: str, answers: list[dict], limit: int | None = None) -> dict:
        """Scores of an answers list (LLaVA answers.jsonl rows: question_id, prompt,
        text, answer_id, model_id, metadata) in the official script's units and
        precision, unrounded. Keys as docs/eval.md lists them. `limit`: score as if the
        question file held only its first `limit` questions (what `--limit` asked)."""

    def per_question(self, data_dir: str, answers: list[dict],
                     limit: int | None = None) -> dict[Any, float]:
        """Each question's credit in [0, 1] towards the headline, keyed by question_id,
        for bootstrapping differences between arms over questions. For accuracy-like
        headlines the mean of the credits is the headline (x100 where it is a percent);
        grouped metrics give every question of a group the group's credit; where the
        headline is not a mean over questions (POPE's F1, Hateful Memes' AUROC) the
        credit is the question's correctness. docs/eval.md says which is which."""


REGISTRY: dict[str, Callable[[], Benchmark]] = {}


def register(name: str):
    """Class decorator: `@register("pope") class Pope: ...`."""
    def deco(cls):
        REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco
