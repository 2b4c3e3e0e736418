"""A model folder's lineage: where the model came from and how it scored.

`lineage.json` beside the weights holds sections that different steps fill in:

    base       base models (vision tower, LM, tokenizer: hub names or paths)
    recipe     the training config and template of each stage
    data       the manifest(s) trained on: table sha256s, row counts, reject tallies
    training   final metrics of each stage (loss, steps, tokens)
    eval       per benchmark: the scores `warren eval` measured, with the data path

`update(folder, section=value, ...)` merges sections atomically and re-renders the
model card (`README.md` in the folder, as the Hugging Face hub shows it), so every step
that adds to a model's history leaves it readable by a person.
"""
from __future__ import annotations

import json
import os
from typing import Any

from pipelines import storage

LINEAGE = "lineage.json"
CARD = "README.md"


def read(folder: str) -> dict:
    path = os.path.join(folder, LINEAGE)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _merge(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        out = dict(old)
        for k, v in new.items():
            out[k] = _merge(old.get(k), v)
        return out
    return new


def update(folder: str, **sections: Any) -> dict:
    """Merge `sections` into the folder's lineage (dicts merge key by key, anything
    else replaces) and rewrite the model card. Returns the new lineage."""
    doc = _merge(read(folder), sections)
    storage.write_json(os.path.join(folder, LINEAGE), doc)
    storage.write_bytes(os.path.join(folder, CARD), render(doc).encode("utf-8"))
    return doc


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = ["| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return out + [""]


def render(doc: dict) -> str:
    """The model card (Markdown) for a lineage document."""
    lines = ["---", "library_name: transformers", "tags: [warren, vision-language, llava]", "---", "",
             f"# {doc.get('name', 'Warren model')}", ""]
    base = doc.get("base") or {}
    if base:
        lines += ["## Base models", ""] + _table(sorted(base.items()))
    recipe = doc.get("recipe") or {}
    if recipe:
        lines += ["## Recipe", ""]
        for stage, info in sorted(recipe.items()):
            if isinstance(info, dict):
                lines += [f"### {stage}", ""] + _table(sorted((k, v) for k, v in info.items()
                                                             if not isinstance(v, (dict, list))))
            else:
                lines += [f"- {stage}: {info}"]
        lines.append("")
    data = doc.get("data") or {}
    if data:
        lines += ["## Data lineage", "", "```json", json.dumps(data, indent=2, sort_keys=True), "```", ""]
    training = doc.get("training") or {}
    if training:
        lines += ["## Training", ""]
        for stage, info in sorted(training.items()):
            if isinstance(info, dict):
                lines += [f"### {stage}", ""] + _table(sorted((k, v) for k, v in info.items()
                                                             if not isinstance(v, (dict, list))))
        lines.append("")
    evals = doc.get("eval") or {}
    if evals:
        lines += ["## Evaluation", "", "| benchmark | score | value |", "|---|---|---|"]
        for bench, info in sorted(evals.items()):
            scores = info.get("scores", info) if isinstance(info, dict) else {}
            for key, value in _flatten(scores):
                lines.append(f"| {bench} | {key} | {value} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if not isinstance(d, dict):
        return [(prefix or "value", d)]
    out = []
    for k, v in sorted(d.items()):
        key = f"{prefix}.{k}" if prefix else str(k)
        out += _flatten(v, key) if isinstance(v, dict) else [(key, v)]
    return out
