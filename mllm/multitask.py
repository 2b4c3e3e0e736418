"""TinyGPT-V's multi-task templates: task identifiers and boxes.

TinyGPT-V (after MiniGPT-v2) trains its last stage on a mix of tasks, each question
led by an identifier so one model can tell a caption request from a referring-expression
query:

    ###Human: <image>\\n[refer] give me the location of the red square ###Assistant: {<10><20><55><80>}<eos>

Identifiers: `[vqa]`, `[caption]`, `[refer]`, `[grounding]`, `[identify]`, `[detection]`.
Boxes are `{<x1><y1><x2><y2>}` on a 0-100 grid (see pipelines.mix.tasks, which also tags
MIX records by task).

Registered templates (in mllm.templates.REGISTRY):
  tinygptv          renders the identifier a record already carries (tag records with
                    pipelines.mix.tasks); untagged and text-only records render as plain
                    instructions, as in TinyGPT-V's instruction stage
  tinygptv-<task>   the same, and tags an untagged first human turn that has the image
                    with <task> (text-only turns stay untagged, as in pipelines.mix.tasks.tag)

The identifier is its own untrained segment, so the label mask stays exact: labels are
the answer tokens and the end token, IGNORE_INDEX everywhere else, token by token.
"""
from __future__ import annotations

from dataclasses import dataclass

from mllm import templates
from mllm.templates import ConversationError, Template
from pipelines.mix.tasks import (GRID, TASKS, box_to_pixels, format_box, format_grounded, identifier,
                             parse_boxes, tag_text, task_in)

__all__ = ["TASKS", "GRID", "TaskTemplate", "format_box", "format_grounded", "parse_boxes",
           "box_to_pixels", "instruction", "task_in", "TEMPLATE_NAME"]

TEMPLATE_NAME = "tinygptv"

# MiniGPT-v2-style instructions, one per task ({} is the subject: a phrase, a box, ...).
INSTRUCTIONS = {
    "vqa": "{}",
    "caption": "Briefly describe this image.",
    "refer": "give me the location of {}",
    "grounding": "describe this image in detail",
    "identify": "what object is in this location {}",
    "detection": "{}",
}


def instruction(task: str, subject: str = "") -> str:
    """The tagged first human turn for `task` (with the image): e.g.
    instruction('refer', 'the red square') -> '<image>\\n[refer] give me the location of the red square'."""
    return f"<image>\n{identifier(task)} {INSTRUCTIONS[task].format(subject)}".rstrip()


@dataclass(frozen=True)
class TaskTemplate(Template):
    """A Template whose first human turn is split into (image, identifier, question)
    segments, all untrained. `task` tags untagged conversations; `require_task` refuses
    image conversations that carry no identifier."""

    task: str | None = None
    require_task: bool = False

    def _tagged(self, conversations: list[dict]) -> list[dict]:
        out = [dict(t) for t in conversations]
        first = next((t for t in out if t.get("from") == "human"), None)
        if first is None:
            return out
        # Text-only turns stay plain instructions, as the mix builder leaves them.
        if self.task is not None and "<image>" in first["value"] and task_in(first["value"]) is None:
            first["value"] = tag_text(first["value"], self.task)
        if self.require_task and "<image>" in first["value"] and task_in(first["value"]) is None:
            raise ConversationError(f"template '{self.name}' needs a task identifier "
                                    f"({', '.join('[' + t + ']' for t in TASKS)}) in the first "
                                    "human turn: tag the records with pipelines.mix.tasks")
        return out

    def segments(self, conversations: list[dict], tokenizer,
                 add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        conv = self._tagged(conversations)
        segs = super().segments(conv, tokenizer, add_generation_prompt)
        first = next((t for t in conv if t.get("from") == "human"), None)
        task = task_in(first["value"]) if first is not None else None
        if task is None:
            return segs
        # The identifier becomes a segment of its own, so it is tokenized the same way
        # whatever question follows it (and generation prompts match training).
        tag = identifier(task)
        for k, (text, trainable) in enumerate(segs):
            if not trainable and tag in text:
                i = text.index(tag)
                pieces = [(text[:i], False), (tag, False), (text[i + len(tag):], False)]
                return segs[:k] + [p for p in pieces if p[0]] + segs[k + 1:]
        return segs


def _register() -> None:
    common = dict(prefix="", user="###Human: {content} ", assistant="###Assistant:",
                  answer=" {content}{end}", system="")
    templates.register(TaskTemplate(name=TEMPLATE_NAME, **common))
    for task in TASKS:
        templates.register(TaskTemplate(name=f"{TEMPLATE_NAME}-{task}", task=task, **common))


_register()
