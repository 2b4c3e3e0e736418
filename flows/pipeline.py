"""Prefect flow `pipeline`: shards to scores from one config file.

    source -> curate -> stage-1 table -> mix -> manifest -> train -> eval

    prefect deployment run 'pipeline/demo' --watch          # served by `warren serve`
    python -m flows.pipeline configs/pipeline/demo.yaml      # the same, in this process

One YAML (configs/pipeline/*.yaml) names every part:

    output: runs/pipeline-demo
    source: {demo_pool: {n: 1000}}       # or {path: LAION-style metadata / embeddings}
    curate: {config: configs/curate/demo.yaml, set: [select.k=8]}
    mix:    {synthetic: {scale: 0.002}}   # or {recipe: configs/mix/bunny-695k.yaml}
    train:  {config: configs/train/tiny.yaml, set: {stage1.max_steps: 30}}
    eval:   {benchmarks: [pope, gqa], demo_bench: {images: 24}}   # or data: playground/data/eval

Each part is skipped when complete: a part records, beside its outputs
(`<output>/_pipeline/_completions/<part>.json`), the key it was made from (its config
and the sha256 of the tables it read). A rerun skips a part whose key is unchanged,
redoes one whose input changed, and everything after it whose input changes in turn
(a retrained model is evaluated again; an unchanged stage-1 table is not retrained).
An interrupted part resumes inside: curation by its completion markers (from a static
source; the demo pool is served on a new port each run, so an unfinished curation of it
restarts), training from its last checkpoint, eval from its answers file.

`<output>/pipeline.json` is the one lineage record from shard to score: per part its
key, result and outputs (curation funnel and manifest, table sha256s, the training
summaries, the model, the scores). The model's own lineage (its model card) gets the
same record under `data.pipeline` and the scores under `eval`.

The steps reuse what `warren demo` runs (flows/demo.py: the pool, curation of it, the
stage-1 table, the mix) and the `train` and `eval` flows.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import specs
from pipelines import config, storage
from pipelines.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "pipeline")
TASK = dict(cache_policy=NO_CACHE, persist_result=False)
MARKERS = "_pipeline"


# -- configuration --------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineConfig:
    output: str
    source: specs.SourceSpec
    curate: specs.CurateSpec
    mix: specs.MixSpec
    train: specs.TrainSpec
    eval: specs.EvalSpec

    def to_dict(self) -> dict:
        return specs.to_dict(self)


def load_config(path: str, overrides: list[str] | None = None,
                output: str | None = None) -> PipelineConfig:
    """Read a pipeline YAML, apply `key=value` overrides, check every part at once."""
    d = config.apply_overrides(config.load_yaml(path, "pipeline config"), overrides)
    if output:
        d["output"] = output
    problems: list[str] = []
    cfg = specs.merge_top(PipelineConfig, d, problems)
    if cfg is not None:
        for name in ("source", "curate", "mix", "train", "eval"):
            part = getattr(cfg, name)
            if part is not None:
                problems += part.check(name)
    if problems:
        raise ConfigError(problems, source=path)
    return cfg


# -- parts ------------------------------------------------------------------------------------
def part(out: str, name: str, key: dict, run: Callable[[bool], dict], log) -> dict:
    """Run `run(stale)` unless the part finished from the same key. `stale` is True
    when an earlier result from another key is there to be replaced."""
    root = storage.join(out, MARKERS)
    key = json.loads(json.dumps(key, default=str, sort_keys=True))
    stale = False
    if storage.is_done(root, name):
        info = storage.done_info(root, name)
        if info.get("key") == key:
            log(f"{name}: complete, skipped")
            return {**info["result"], "skipped": True}
        stale = True
        log(f"{name}: its input changed, redoing it")
    t0 = time.perf_counter()
    result = json.loads(json.dumps(run(stale), default=str))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    storage.mark_done(root, name, {"key": key, "result": result})
    return {**result, "skipped": False}


def _fresh(*paths: str) -> None:
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def _logger():
    log = get_run_logger()
    return lambda msg: log.info("%s", msg)


def source_part(output: str, source: specs.SourceSpec, log) -> dict:
    """The demo pool drawn into <output>/source, or the configured path as it is."""
    from pipelines.synth import demo_pool
    if source.demo_pool is None:
        return {"path": source.path}
    root = storage.join(output, "source")

    def run(stale):
        if stale:
            _fresh(root)
        info = demo_pool.build(root, demo_pool.DemoDataConfig(n=source.demo_pool.n,
                                                              seed=source.demo_pool.seed))
        log(f"demo pool: {info['rows']:,} rows in {root}")
        return {"root": root, **info}
    return part(output, "source", specs.to_dict(source), run, log)


@task(name="source", **TASK)
def t_source(cfg: dict) -> dict:
    c = _config(cfg)
    return source_part(c.output, c.source, _logger())


def curate_part(output: str, source: specs.SourceSpec, spec: specs.CurateSpec, found: dict,
                log) -> dict:
    """Curation into <output>/curate (a subflow run of `curate-run`). `found` is what
    source_part returned."""
    from flows import curate, demo
    run_dir = storage.join(output, "curate")
    sets = list(spec.set)
    if source.path is not None:
        sets.append(f"source.path={source.path}")
    # the resolved curate config (source.path of the demo pool is filled in when served)
    resolved = curate.load_config(spec.config, sets + (["source.path=served"]
                                                        if source.demo_pool else []),
                                  output=run_dir).to_dict()
    key = {"curate": resolved, "source": {k: v for k, v in found.items()
                                          if k not in ("skipped", "seconds")}}

    def run(stale):
        if stale or source.demo_pool is not None:
            _fresh(run_dir)     # the demo pool's URLs change with its port: start clean
        if source.demo_pool is not None:
            log(demo.MODEL_NOTE)
            summary = demo.curate_pool(found["root"], run_dir, spec.config, spec.set, log)
        else:
            summary = curate.run_local(curate.load_config(spec.config, sets, output=run_dir))
        log(f"curated: {curate.summarize(summary)}")
        return {"run": run_dir, "funnel": summary["funnel"], "paths": summary["paths"],
                "coreset_rows": summary["coreset_rows"], "rejected_rows": summary["rejected_rows"],
                "coreset_sha256": storage.sha256(summary["paths"]["coreset"])}
    return part(output, "curate", key, run, log)


@task(name="stage1-table", **TASK)
def t_stage1(cfg: dict, cur: dict) -> dict:
    from flows import demo
    c = _config(cfg)
    log = _logger()
    out = storage.join(c.output, "stage1")
    man = storage.join(c.output, "manifest.json")

    def run(stale):
        _fresh(out)
        s1 = demo.stage1_table(cur["paths"]["coreset"], out, man, log)
        return {"table": storage.join(out, "stage1.parquet"), "kept": s1["kept"],
                "rejected": s1["rejected"], "reasons": s1["reasons"]}
    return part(c.output, "stage1", {"coreset_sha256": cur["coreset_sha256"]}, run, log)


def mix_key(spec: specs.MixSpec) -> dict:
    key = {"mix": specs.to_dict(spec)}
    if spec.recipe is not None:
        key["recipe_sha256"] = storage.sha256(spec.recipe)
    return key


def make_mix(spec: specs.MixSpec, out: str, manifest_path: str, log) -> dict:
    """The instruction mix into `<out>/mix` (synthetic sources in `<out>/mix-source`),
    added to `manifest_path` as table "mix"."""
    from flows import demo
    mix_dir = storage.join(out, "mix")
    _fresh(mix_dir)
    if spec.synthetic is not None:
        src = storage.join(out, "mix-source")
        _fresh(src)
        recipe_path = demo.synthetic_sources(src, spec.synthetic.scale, spec.synthetic.max_images,
                                             spec.synthetic.recipe)
    else:
        recipe_path = spec.recipe
    stats = demo.build_mix(recipe_path, mix_dir, manifest_path, log)
    return {"table": stats["table"], "kept": stats["kept"], "input": stats["input"],
            "text_only_share": stats["text_only_share"], "recipe": recipe_path}


@task(name="mix", **TASK)
def t_mix(cfg: dict, after: dict | None = None) -> dict:
    c = _config(cfg)
    log = _logger()
    man = storage.join(c.output, "manifest.json")
    return part(c.output, "mix", mix_key(c.mix),
                lambda stale: make_mix(c.mix, c.output, man, log), log)


@task(name="manifest", **TASK)
def t_manifest(cfg: dict, s1: dict, mx: dict) -> dict:
    """The training manifest, verified (every table's sha256)."""
    from pipelines import manifest
    c = _config(cfg)
    path = storage.join(c.output, "manifest.json")
    m = manifest.load(path, verify=True)
    return {"path": path, "tables": {n: {"sha256": e["sha256"], "rows": e["rows"]}
                                     for n, e in sorted(m.doc["tables"].items())}}


def train_part(c: PipelineConfig, man: dict, log) -> dict:
    """Both stages through the `train` flow (a subflow; finished stages are skipped)."""
    from flows.train import train
    out = storage.join(c.output, "train")
    key = {"tables": man["tables"], "train": c.train.load().to_dict()}

    def run(stale):
        if stale:
            _fresh(out)
        res = train(manifest_path=man["path"], config_path=c.train.config, output_dir=out,
                    overrides=dict(c.train.set))
        for n in ("stage1", "stage2"):
            log(f"train {n}: loss {res[n]['first_loss']:.3f} -> {res[n]['final_loss']:.3f}")
        return {"model": res["stage2"]["final"],
                **{n: {k: res[n].get(k) for k in ("steps", "first_loss", "final_loss", "final",
                                                  "metrics", "plot", "tokens_per_s")}
                   for n in ("stage1", "stage2")}}
    return part(c.output, "train", key, run, log)


def bench_data(spec: specs.EvalSpec, out: str, log) -> str:
    """The benchmark data folder: the configured one, or the demo bench drawn into
    `<out>/bench` (idempotent)."""
    if spec.data is not None:
        return spec.data
    from pipelines.synth import demo_bench
    root = storage.join(out, "bench")
    info = demo_bench.build(root, demo_bench.DemoBenchConfig(images=spec.demo_bench.images,
                                                            seed=spec.demo_bench.seed))
    log(f"demo benchmark: {info['pope']} POPE and {info['gqa']} GQA questions on "
        f"{info['images']} held-out images in {root}")
    return root


def eval_key(spec: specs.EvalSpec, model: str, data: str) -> dict:
    from mllm.eval.run import model_fingerprint
    return {"model": model_fingerprint(model), "benchmarks": list(spec.benchmarks),
            "data": os.path.abspath(data), "limit": spec.limit,
            "max_new_tokens": spec.max_new_tokens}


def evaluate_model(spec: specs.EvalSpec, model: str, data: str, out: str, restart: bool) -> dict:
    from mllm.eval import run
    res = run.evaluate(model, list(spec.benchmarks), data, out, batch_size=spec.batch_size,
                       workers=spec.workers, limit=spec.limit, device=spec.device,
                       progress=False, restart=restart, max_new_tokens=spec.max_new_tokens)
    return {"results": storage.join(out, run.RESULTS), "scores": storage.join(out, run.SCORES),
            "benchmarks": {b: {k: r.get(k) for k in ("n", "scores", "headline", "answers")}
                           for b, r in res["benchmarks"].items()}}


@task(name="eval", **TASK)
def t_eval(cfg: dict, model: str) -> dict:
    c = _config(cfg)
    log = _logger()
    data = bench_data(c.eval, c.output, log)
    out = storage.join(c.output, "eval")
    res = part(c.output, "eval", eval_key(c.eval, model, data),
               lambda stale: evaluate_model(c.eval, model, data, out, restart=stale), log)
    for b, r in res["benchmarks"].items():
        head = r.get("headline")
        log(f"eval {b}: n={r['n']}" + (f", {head['key']} = {head['value']:.4g}" if head else ""))
    return res


def _config(d: dict) -> PipelineConfig:
    problems: list[str] = []
    cfg = specs.merge_top(PipelineConfig, d, problems)
    if problems:
        raise ConfigError(problems, source="pipeline config")
    return cfg


# -- the flow --------------------------------------------------------------------------------
@flow(name="pipeline", log_prints=True)
def pipeline(config: str, overrides: list[str] | None = None, output: str | None = None) -> dict:
    """Every part of one pipeline config, in order; returns pipeline.json's content."""
    from mllm import lineage
    from pipelines import manifest as manifest_mod

    c = load_config(config, overrides, output)
    cfg = c.to_dict()
    log = _logger()
    t0 = time.perf_counter()
    storage.makedirs(c.output)
    log(f"pipeline {config} -> {c.output}")
    parts: dict[str, dict] = {}
    parts["source"] = t_source(cfg)
    parts["curate"] = curate_part(c.output, c.source, c.curate, parts["source"], log)
    parts["stage1"] = t_stage1(cfg, parts["curate"])
    parts["mix"] = t_mix(cfg, parts["stage1"])
    parts["manifest"] = t_manifest(cfg, parts["stage1"], parts["mix"])
    parts["train"] = train_part(c, parts["manifest"], log)
    model = parts["train"]["model"]
    parts["eval"] = t_eval(cfg, model)
    record = {"config": os.path.abspath(config), "overrides": list(overrides or []),
              "resolved": cfg, "output": c.output, "model": model,
              "code_version": manifest_mod.code_version(), "order": list(parts), "parts": parts,
              "seconds": round(time.perf_counter() - t0, 2)}
    storage.write_json(storage.join(c.output, "pipeline.json"), record)
    lineage.update(model, data={"pipeline": {
        "record": os.path.abspath(storage.join(c.output, "pipeline.json")),
        "curation": {"manifest": parts["curate"]["paths"]["manifest"],
                     "funnel": parts["curate"]["funnel"],
                     "coreset_sha256": parts["curate"]["coreset_sha256"]},
        "training_manifest": parts["manifest"]}})
    _artifacts(record)
    return record


def _artifacts(record: dict) -> None:
    from flows.eval import publish
    from mllm.eval.run import RESULTS
    md = [f"# Pipeline `{record['config']}`", "", "| part | ran | seconds |", "|---|---|---:|"]
    for name, p in record["parts"].items():
        md.append(f"| {name} | {'skipped (complete)' if p.get('skipped') else 'ran'} | "
                  f"{p.get('seconds', '')} |")
    md += ["", f"Model: `{record['model']}`; lineage: `{record['output']}/pipeline.json`."]
    create_markdown_artifact("\n".join(md), key="pipeline-summary",
                             description=f"pipeline run into {record['output']}")
    results = storage.read_json(storage.join(record["output"], "eval", RESULTS))
    publish(results, list(record["parts"]["eval"]["benchmarks"]), key_prefix="pipeline-eval")


def deployments(config_dir: str = CONFIGS) -> list:
    """One deployment `pipeline/<file stem>` per YAML in config_dir (for `warren serve`)."""
    from flows.serve import deployment_name
    out = []
    for f in storage.listdir(config_dir, "*.yaml") if os.path.isdir(config_dir) else []:
        path = os.path.abspath(f)
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().lstrip("# ").strip()
        load_config(path)  # a broken config fails here, not at run time
        out.append(pipeline.to_deployment(name=deployment_name(path), parameters={"config": path},
                                          description=f"{os.path.basename(path)}: {first}",
                                          tags=["warren", "pipeline"]))
    return out


if __name__ == "__main__":
    print(json.dumps(pipeline(sys.argv[1], sys.argv[2:]), indent=2, default=str))
