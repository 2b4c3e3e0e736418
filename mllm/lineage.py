"""A model folder's lineage: where the model came from and how it scored.

`lineage.json` beside the weights holds sections that different steps fill in:

    base       base models (vision tower, LM, tokenizer: hub names or paths)
    recipe     the training config and template of each stage
    data       per stage, the manifest trained on (its sha256, the table's path, rows and
               sha256), what built the table: the coreset (funnel, rejects by stage), the
               stage-1 caption table and the mix (counts, rejects by reason, sources), and
               the rows the trainer checked before step 1 (trained, rejected by reason)
    training   final metrics of each stage (loss, steps, tokens)
    eval       per benchmark: the scores `warren eval` measured, with the data path
    export     how the folder was written (mllm.llava_hf) and what differs from Warren

`update(folder, section=value, ...)` merges sections atomically and re-renders the
model card (`README.md` in the folder, as the Hugging Face hub shows it), so every step
that adds to a model's history leaves it readable by a person.
"""
from __future__ import annotations

import json
import os
from typing import Any

from pipelines import manifest as manifest_mod
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
        lines += ["## Data lineage", ""] + _render_data(data) + [
            "<details><summary>lineage.json (data)</summary>", "", "```json",
            json.dumps(data, indent=2, sort_keys=True), "```", "", "</details>", ""]
    training = doc.get("training") or {}
    if training:
        lines += ["## Training", ""]
        for stage, info in sorted(training.items()):
            if isinstance(info, dict):
                lines += [f"### {stage}", ""] + _table(sorted((k, v) for k, v in info.items()
                                                             if not isinstance(v, (dict, list))))
        lines.append("")
    export = doc.get("export") or {}
    if export:
        lines += _render_export(export)
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


def _counts(d: dict | None) -> str:
    return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in sorted((d or {}).items()))


def _render_data(data: dict) -> list[str]:
    lines: list[str] = []
    for stage, info in sorted(data.items()):
        if not isinstance(info, dict) or "table" not in info:
            continue
        t = info["table"]
        lines += [f"### {stage}: table `{t.get('name')}`", "", "| | |", "|---|---|",
                  f"| manifest | `{info.get('manifest', {}).get('path')}` |",
                  f"| manifest sha256 | `{info.get('manifest', {}).get('sha256')}` |",
                  f"| table | `{t.get('path')}` |",
                  f"| table rows | {t.get('rows')} |",
                  f"| table sha256 | `{t.get('sha256')}` |"]
        c = info.get("coreset")
        if c:
            lines += [f"| coreset | `{c.get('path')}` ({c.get('rows')} rows, sha256 `{c.get('sha256')}`) |",
                      f"| coreset funnel | {_counts(c.get('funnel'))} |"]
            for where, reasons in sorted((c.get("rejects_by_stage") or {}).items()):
                lines.append(f"| coreset rejects, {where} | {_counts(reasons)} |")
        s1 = info.get("stage1_table")
        if s1:
            lines += [f"| caption table | input {s1.get('input')}, kept {s1.get('kept')}, "
                      f"rejected {s1.get('rejected')} |",
                      f"| caption table rejects | {_counts(s1.get('reasons')) or 'none'} |"]
        m = info.get("mix")
        if m:
            lines += [f"| mix (recipe {m.get('recipe')}) | input {m.get('input')}, kept {m.get('kept')}, "
                      f"rejected {m.get('rejected')}, text-only {m.get('text_only')} |",
                      f"| mix rejects | {_counts(m.get('reasons')) or 'none'} |"]
            for name, src in sorted((m.get("sources") or {}).items()):
                lines.append(f"| mix source {name} | input {src.get('input')}, kept {src.get('kept')}, "
                             f"rejected {src.get('rejected')} |")
        tr = info.get("trainer")
        if tr:
            lines.append(f"| rows checked before step 1 | input {tr.get('input_rows')}, trained "
                         f"{tr.get('trained_rows')}, rejected {tr.get('rejected_rows')}"
                         + (f" ({_counts(tr.get('rejects'))})" if tr.get("rejects") else "") + " |")
        lines.append("")
    return lines


def _render_export(export: dict) -> list[str]:
    lines = ["## Loading", ""]
    if export.get("format") == "llava-hf":
        lines += ["```python",
                  "from transformers import AutoProcessor, LlavaForConditionalGeneration",
                  "model = LlavaForConditionalGeneration.from_pretrained(FOLDER)",
                  "processor = AutoProcessor.from_pretrained(FOLDER, backend=\"pil\")  # pixel-exact with Warren",
                  "```", "",
                  "Warren loads it too: `mllm.export.load(FOLDER)`, `warren generate --checkpoint FOLDER`,",
                  "`stage2.init_from: FOLDER`.", ""]
    lines += _table(sorted((k, v) for k, v in export.items() if not isinstance(v, (dict, list))))
    return lines


# ------------------------------------------------------------------ sections

def base_section(model_cfg, tokenizer: str, vocab: int | None = None) -> dict:
    """Where the weights came from: hub names or paths, or 'random init' with the dims."""
    def describe(part, kind: str) -> str:
        if part.name_or_path:
            return str(part.name_or_path)
        extra = f", {part.image_size} px / {part.patch_size} px patches" if kind == "vision" else ""
        return (f"random init ({part.arch}, {part.num_layers} layers x {part.hidden_size}{extra})")
    tok = ("built locally from the manifest's text (byte-level BPE"
           + (f", {vocab} tokens)" if vocab else ")")) if tokenizer == "local" else tokenizer
    return {"vision_tower": describe(model_cfg.vision, "vision"), "language_model": describe(model_cfg.lm, "lm"),
            "projector": model_cfg.projector, "tokenizer": tok,
            "vision_select_layer": model_cfg.vision.select_layer,
            **({"transforms": ", ".join(model_cfg.transforms)} if model_cfg.transforms else {})}


def recipe_section(cfg, stage: int, init_from: str | None = None) -> dict:
    """The training recipe of one stage, as its config states it."""
    s = cfg.stage(stage)
    info = {"table": s.table, "template": s.template, "lr": s.lr,
            "trains": "projector" if stage == 1 else "LoRA on the LM + projector",
            "steps": s.max_steps if s.max_steps is not None else f"{s.epochs} epoch(s)",
            "global_batch_size": s.global_batch_size, "micro_batch_size": s.micro_batch_size,
            "warmup_ratio": s.warmup_ratio, "schedule": "cosine", "precision": s.precision,
            "max_length": cfg.data.max_length, "image_aspect": cfg.data.image_aspect,
            "seed": cfg.run.seed}
    if stage == 2:
        info.update({"projector_lr": s.projector_lr if s.projector_lr is not None else s.lr,
                     "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout})
    if init_from:
        info["init_from"] = init_from
    return {f"stage{stage}": info}


def _json_near(path: str) -> dict | None:
    try:
        return storage.read_json(path) if storage.exists(path) else None
    except Exception:  # noqa: BLE001 — a stats file we cannot read is left out, not fatal
        return None


def _coreset(path: str) -> dict:
    """The coreset a caption table was built from: rows, sha256 and the curation funnel."""
    folder = os.path.dirname(path)
    out: dict[str, Any] = {"path": path}
    man = _json_near(os.path.join(folder, "manifest.json")) or {}
    entry = (man.get("tables") or {}).get("coreset") or {}
    out["rows"], out["sha256"] = entry.get("rows"), entry.get("sha256")
    stats = _json_near(os.path.join(folder, "curate_stats.json")) or _json_near(os.path.join(folder, "stats.json"))
    if stats:
        out["funnel"] = stats.get("funnel")
        out["rejects_by_stage"] = stats.get("rejects_by_stage")
    return out


def data_section(manifest_path: str, table: str, stage: int) -> dict:
    """One stage's data lineage: the manifest and table it read, and the counts of what
    built the table (stats files beside it: `<table>_stats.json` of a caption table,
    `stats.json` of a mix, the coreset's curation stats)."""
    man = manifest_mod.load(manifest_path, verify=False)
    entry = man.entry(table)
    path = man.table_path(table)
    info: dict[str, Any] = {
        "manifest": {"path": os.path.abspath(manifest_path), "sha256": storage.sha256(manifest_path)},
        "table": {"name": table, "path": os.path.abspath(path) if "://" not in path else path,
                  "rows": entry.get("rows"), "sha256": entry.get("sha256")}}
    folder = os.path.dirname(path)
    config = (man.doc.get("config") or {}).get(table) or {}
    s1 = _json_near(os.path.join(folder, f"{table}_stats.json"))
    if s1 is not None:
        info["stage1_table"] = {k: s1.get(k) for k in ("input", "kept", "rejected", "reasons")}
    if isinstance(config, dict) and config.get("coreset"):
        info["coreset"] = _coreset(str(config["coreset"]))
    mix = _json_near(os.path.join(folder, "stats.json"))
    if mix is not None and "recipe" in mix:
        info["mix"] = {k: mix.get(k) for k in ("recipe", "input", "kept", "rejected", "reasons", "text_only")}
        info["mix"]["sources"] = {name: {k: src.get(k) for k in ("input", "kept", "rejected", "reasons")}
                                  for name, src in (mix.get("sources") or {}).items()}
    return {f"stage{stage}": info}


def training_section(summary: dict) -> dict:
    """A stage's final metrics from its summary."""
    keep = ("steps", "samples", "first_loss", "final_loss", "tokens_per_s", "peak_memory_mb",
            "world_size", "seconds", "code_version", "resumed_from")
    info = {k: summary[k] for k in keep if summary.get(k) is not None}
    for k in ("first_loss", "final_loss", "tokens_per_s", "peak_memory_mb", "seconds"):
        if isinstance(info.get(k), float):
            info[k] = round(info[k], 4)
    return {f"stage{summary['stage']}": info}
