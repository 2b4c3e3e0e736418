"""`evaluate`: ask a model every question of some benchmarks, keep the answers, score them.

    evaluate(model="runs/x/train/stage2/final", benchmarks=["pope", "gqa"],
             data="playground/data/eval", output="runs/x/eval")

Output folder:
    <benchmark>/answers.jsonl   LLaVA's answers form (question_id, prompt, text, answer_id,
                                model_id, metadata), one line per question in question-file
                                order; appended and fsynced per batch
    <benchmark>/run.json        what the answers were made from (model fingerprint, data)
    <benchmark>/scores.json     {"benchmark", "n", "scores"} as `warren eval score` prints it
    results.json                every benchmark's scores, n, data, timing
    scores.parquet              one row per score: benchmark, key (dotted), value, n

A killed eval resumes: rerun it into the same output and the answered questions are not
asked again (a partial last line is dropped first). The answers file is always a prefix
of the question file, which is checked, so a rerun with another model or other
questions refuses instead of mixing answers (`restart=True` starts the benchmark over).
Answer ids are derived from the model, question and answer, so a resumed run writes the
same file as an uninterrupted one. The scores also go into the model's lineage (its
model card) when the model folder is one Warren made.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from typing import Sequence

from mllm.eval.types import REGISTRY, Question
from pipelines import runkey, storage
from pipelines.errors import ConfigError, InputError, OutputError

log = logging.getLogger(__name__)

ANSWERS = "answers.jsonl"
RESULTS = "results.json"
SCORES = "scores.parquet"


def _scores_schema():
    import pyarrow as pa
    return pa.schema([
        pa.field("benchmark", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),     # dotted: adversarial.f1
        pa.field("value", pa.float64(), nullable=False),  # the official script's unit, unrounded
        pa.field("n", pa.int64(), nullable=False),        # questions scored
    ])


# -- inputs ------------------------------------------------------------------------------------
def benchmark_names(benchmarks: str | Sequence[str]) -> list[str]:
    """Names from a list or a comma-separated string, checked against the registry."""
    import mllm.eval.benchmarks  # noqa: F401  (registers every benchmark)

    names = [b.strip() for b in (benchmarks.split(",") if isinstance(benchmarks, str) else benchmarks)]
    names = [b for b in names if b]
    problems = [f"unknown benchmark '{b}' (known: {', '.join(sorted(REGISTRY)) or 'none'})"
                for b in names if b not in REGISTRY]
    if not names:
        problems.append("no benchmark given")
    if len(set(names)) != len(names):
        problems.append(f"a benchmark is named twice ({', '.join(names)})")
    if problems:
        raise ConfigError(problems, source="--benchmark")
    return names


def benchmark_dir(data: str, name: str, bench=None) -> str:
    """The benchmark's own folder: its `root(data)` when it finds it itself (the
    benchmarks in mllm.eval.benchmarks do), else `<data>/<name>` when `data` is LLaVA's
    `playground/data/eval/` holding it, else `data` itself (the benchmark's folder)."""
    if hasattr(bench, "root"):
        return bench.root(data)
    inside = os.path.join(data, name)
    return inside if os.path.isdir(inside) else data


def scores_of(bench, ddir: str, answers: list[dict], limit: int | None) -> dict:
    """bench.score, told the limit when there is one (the scorer then knows the answers
    cover the first `limit` questions only)."""
    return bench.score(ddir, answers) if limit is None else bench.score(ddir, answers, limit)


def credits_of(bench, ddir: str, answers: list[dict], limit: int | None) -> dict:
    """bench.per_question, likewise."""
    if limit is None:
        return bench.per_question(ddir, answers)
    return bench.per_question(ddir, answers, limit)


def model_fingerprint(model: str) -> dict:
    """The model folder's files, less the lineage and card that eval itself rewrites."""
    from mllm import lineage
    skip = {lineage.LINEAGE, lineage.CARD}
    files = sorted(os.path.join(model, f) for f in os.listdir(model)
                   if f not in skip and not f.startswith("."))
    return runkey.fingerprint(files)


def model_id(model: str) -> str:
    """The name answers carry: the lineage's name, else the folder (LLaVA uses the
    folder name; a trainer's `.../stage2/final` becomes `stage2-final`)."""
    from mllm import lineage
    name = (lineage.read(model) or {}).get("name")
    if name:
        return str(name)
    parts = os.path.abspath(model).rstrip(os.sep).split(os.sep)
    return "-".join(parts[-2:]) if parts[-1] == "final" and len(parts) > 1 else parts[-1]


def answer_id(model_name: str, index: int, q: Question, text: str) -> str:
    """Deterministic (LLaVA draws a random shortuuid): a resumed run writes the same file."""
    key = json.dumps([model_name, index, q.question_id, text], default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:22]


def answer_line(model_name: str, index: int, q: Question, text: str) -> dict:
    return {"question_id": q.question_id, "prompt": q.prompt, "text": text,
            "answer_id": answer_id(model_name, index, q, text), "model_id": model_name,
            "metadata": q.metadata}


# -- the answers file --------------------------------------------------------------------------
def read_answers(path: str) -> list[dict]:
    """The complete lines of an answers file. A last line without its newline (a kill
    during the write) is cut off the file, so appending continues cleanly."""
    if not os.path.exists(path):
        return []
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        rows = []
        for n, line in enumerate(data[:end].splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"not a JSON line ({e.msg}); delete the file or pass --restart",
                                 path=path, row=n) from None
        if end < len(data):
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return rows


def _same_id(a, b) -> bool:
    return json.dumps(a, default=str) == json.dumps(b, default=str)


def check_prefix(rows: list[dict], questions: Sequence[Question], path: str) -> None:
    """The answers so far must be the first questions of the question file, in order."""
    for n, (row, q) in enumerate(zip(rows, questions), 1):
        if not isinstance(row, dict) or not _same_id(row.get("question_id"), q.question_id) \
                or row.get("prompt") != q.prompt:
            got = row.get("question_id") if isinstance(row, dict) else row
            raise runkey.StaleRunError(
                f"{path}: line {n} answers question {got!r}, but question {n} of the question "
                f"file is {q.question_id!r}: these answers come from other questions; pass "
                "--restart to start over, or choose another output folder")


def append(path: str, lines: list[dict]) -> None:
    """One write per batch, fsynced: a kill loses at most the batch being written."""
    data = "".join(json.dumps(x, ensure_ascii=False, default=str) + "\n" for x in lines).encode()
    try:
        with open(path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(path, e.strerror or str(e)) from None


# -- scores ------------------------------------------------------------------------------------
def flatten(scores: dict, prefix: str = "") -> list[tuple[str, float]]:
    """Dotted keys of the numeric leaves (`adversarial.f1`), in sorted key order."""
    out = []
    for k in sorted(scores, key=str):
        v = scores[k]
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out += flatten(v, key)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((key, float(v)))
    return out


def write_scores_table(results: dict, path: str) -> None:
    import pyarrow as pa

    schema = _scores_schema()
    rows = [(b, k, v, r["n"]) for b, r in sorted(results["benchmarks"].items())
            for k, v in flatten(r["scores"])]
    table = pa.table({"benchmark": [r[0] for r in rows], "key": [r[1] for r in rows],
                      "value": [r[2] for r in rows], "n": [r[3] for r in rows]},
                     schema=schema)
    storage.write_table(table, path, schema)


def headline(bench, scores: dict) -> tuple[str, float] | None:
    """(dotted key, value) of the benchmark's headline score, when it names one."""
    key = getattr(bench, "headline", None)
    if not key:
        return None
    node = scores
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return (key, float(node)) if isinstance(node, (int, float)) else None


# -- the run -----------------------------------------------------------------------------------
def evaluate(model: str, benchmarks: str | Sequence[str], data: str, output: str,
             batch_size: int = 16, workers: int = 2, limit: int | None = None,
             device: str = "auto", progress: bool = True, *, dtype: str | None = None,
             restart: bool = False, update_lineage: bool = True, template: str | None = None,
             max_new_tokens: int | None = None, loaded=None) -> dict:
    """Answer and score each benchmark; returns what results.json holds.

    `limit` asks only the first N questions of each benchmark (quick runs; the scores
    are then of those N). `dtype` overrides the model's saved dtype (e.g. bfloat16 on a
    GPU). `template` names the conversation template of a llava-hf folder Warren did not
    write. `max_new_tokens` caps every question's answer budget (quick runs; the
    benchmark's own budget otherwise). `loaded` reuses a model already loaded from `model`."""
    from mllm import export
    from mllm.eval import engine

    problems = []
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1 (got {batch_size})")
    if workers < 0:
        problems.append(f"workers must be >= 0 (got {workers})")
    if limit is not None and limit < 1:
        problems.append(f"limit must be >= 1 (got {limit})")
    if max_new_tokens is not None and max_new_tokens < 1:
        problems.append(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if problems:
        raise ConfigError(problems, source="eval")
    names = benchmark_names(benchmarks)
    if not os.path.isdir(model):
        raise InputError("model folder not found", path=model)
    if not os.path.exists(data):
        raise InputError("benchmark data not found", path=data)
    runkey.check_apart(output, [model])
    storage.makedirs(output)

    model = os.path.abspath(model)
    fp = model_fingerprint(model)
    benches = {}
    for name in names:              # fail before the model loads: files that are not there
        bench = REGISTRY[name]()
        ddir = os.path.abspath(benchmark_dir(data, name, bench))
        list(itertools.islice(bench.questions(ddir), 1))
        benches[name] = (bench, ddir)
    dev = engine.resolve_device(device)
    if loaded is None:
        extra = {"template": template} if template is not None else {}
        loaded = export.load(model, dtype=dtype, device=str(dev), **extra)
    mid = model_id(model)
    results_path = storage.join(output, RESULTS)
    results = storage.read_json(results_path) if os.path.exists(results_path) else {}
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    if results.get("model_fingerprint") != digest:
        results = {}            # another model's scores never sit beside this one's
    results.update({"model": model, "model_id": mid, "model_fingerprint": digest,
                    "device": str(dev)})
    results.setdefault("benchmarks", {})
    for name in names:
        bench, ddir = benches[name]
        res = _one(bench, name, ddir, loaded, mid, fp, os.path.join(output, name), batch_size,
                   workers, limit, progress, restart, engine, max_new_tokens)
        results["benchmarks"][name] = res
        storage.write_json(results_path, results)
        write_scores_table(results, storage.join(output, SCORES))
        if update_lineage:
            _lineage(model, name, res)
    return results


def _one(bench, name, ddir, loaded, mid, fp, out, batch_size, workers, limit, progress,
         restart, engine, cap) -> dict:
    import dataclasses
    questions = list(bench.questions(ddir))
    if limit is not None:
        questions = questions[:limit]
    if cap is not None:
        questions = [dataclasses.replace(q, max_new_tokens=min(q.max_new_tokens, cap))
                     for q in questions]
    if not questions:
        raise InputError(f"{name}: no questions", path=ddir)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ANSWERS)
    state_path = os.path.join(out, "run.json")
    state = {"benchmark": name, "data": ddir, "model": fp, "max_new_tokens": cap}
    if restart:
        for p in (path, state_path):
            if os.path.exists(p):
                os.remove(p)
    if os.path.exists(state_path):
        old = storage.read_json(state_path)
        runkey.check_same(old.get("model"), fp, out)
        for k, what in (("data", "answers to"), ("max_new_tokens", "answers capped at")):
            if old.get(k) != state[k]:
                raise runkey.StaleRunError(
                    f"{out} holds {what} {old.get(k)}, not {state[k]}; pass --restart to start "
                    "over, or choose another output folder")
    storage.write_json(state_path, state)
    rows = read_answers(path)
    check_prefix(rows, questions, path)
    done = min(len(rows), len(questions))
    if done:
        log.info("%s: %d of %d questions already answered in %s; asking the rest",
                 name, done, len(questions), path)
    t0 = time.perf_counter()
    asked = 0
    for batch in engine.answer_batches(loaded, questions[done:], ddir, batch_size, workers,
                                       progress, desc=name, total=len(questions), initial=done):
        lines = [answer_line(mid, done + asked + k, a.question, a.text) for k, a in enumerate(batch)]
        append(path, lines)
        asked += len(batch)
    seconds = time.perf_counter() - t0
    answers = read_answers(path)[:len(questions)]
    scores = scores_of(bench, ddir, answers, limit)
    summary = {"benchmark": name, "n": len(answers), "scores": scores}
    storage.write_json(os.path.join(out, "scores.json"), summary)
    res = {"n": len(answers), "scores": scores, "data": ddir, "answers": path,
           "asked": asked, "resumed_from": done, "limit": None if limit is None else int(limit),
           "max_new_tokens": cap,
           "seconds": round(seconds, 3),
           "questions_per_s": round(asked / seconds, 3) if asked and seconds > 0 else None}
    head = headline(bench, scores)
    if head is not None:
        res["headline"] = {"key": head[0], "value": head[1]}
    log.info("%s: %d answers scored: %s", name, len(answers),
             ", ".join(f"{k} {v:.4g}" for k, v in flatten(scores)[:8]))
    return res


def _lineage(model: str, name: str, res: dict) -> None:
    """Scores into the model's lineage and card, for folders Warren made (never over a
    card someone else wrote)."""
    from mllm import export, lineage
    if not (os.path.exists(os.path.join(model, lineage.LINEAGE))
            or os.path.exists(os.path.join(model, export.META))):
        log.info("%s is not a Warren model folder: its lineage is left alone", model)
        return
    # limit is always written: a full run replaces the note of an earlier --limit run
    entry = {"scores": res["scores"], "n": res["n"], "data": res["data"], "limit": res["limit"]}
    try:
        lineage.update(model, eval={name: entry})
    except OSError as e:
        log.warning("could not write the scores into %s's lineage (%s)", model, e)
