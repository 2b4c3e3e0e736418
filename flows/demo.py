"""`warren demo`: the main job on the embedded default, one step function per stage.

    _source  draw a LAION-like pool (procedural images, captions, planted near-duplicates,
             dead links, corrupt files, mismatched captions) and its truth table;
    _curate  serve it on 127.0.0.1 and run the curate flow from URLs (download, embed
             with a tiny random open_clip model, select, coreset images, report);
    _check   compare the rejects with what was planted;
    _mix     the coreset's captions as the stage-1 table, and the Bunny-695K recipe run
             on scaled-down synthetic sources in the real formats (SVIT-mix with its
             ShareGPT part, WizardLM-evol-instruct, malformed records planted);
    _train   the tiny VLM (random weights, local tokenizer): stage 1 on the captions,
             stage 2 (LoRA) on the mix, then one question about a coreset image;
    _eval    a held-out benchmark drawn from new procedural images in published formats
             (POPE-style yes/no, GQA-style short answers: pipelines/synth/demo_bench.py),
             the model evaluated on it (mllm.eval.run.evaluate) and its scores printed.

Layout under the output folder (default runs/demo): source/ (the pool, reused across
runs), curate/ (the curation run; started fresh each time, since the server's port
is part of every URL), stage1/, mix-source/, mix/, train/, and manifest.json listing
the two tables the trainer reads (stage1, mix) with their images.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

from pipelines import storage
from pipelines.synth import demo_pool

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "curate", "demo.yaml")
MODEL_NOTE = ("The CLIP model is a tiny randomly initialised open_clip model "
              "(warren-tiny-random, no pretrained weights): its clip scores measure nothing, "
              "and its duplicates are pixel-level. Real weights come through config: "
              "embed.model / embed.pretrained (see docs/curate.md).")


@dataclass
class DemoResult:
    output: str
    source: str
    curate: dict            # the curate flow's summary (funnel, paths, seconds)
    planted: dict           # planted kind -> how it ended up
    seconds: dict
    mix: dict | None = None       # stage-1 and mix stats, manifest path
    train: dict | None = None     # stage summaries, model folder, the question and answer
    eval: dict | None = None      # evaluate()'s results (results.json) on the demo benchmark


def demo_flow(out_dir: str = "runs/demo", n: int = 3000, sets: list[str] | None = None,
              log=print, train_steps: int = 30) -> DemoResult:
    """Every stage in order; `train_steps` = 0 stops after the mix."""
    t0 = time.perf_counter()
    seconds = {}
    s = time.perf_counter()
    source = _source(out_dir, n, log)
    seconds["source"] = time.perf_counter() - s
    s = time.perf_counter()
    summary = _curate(out_dir, source, sets or [], log)
    seconds["curate"] = time.perf_counter() - s
    planted = _check(source, summary["output"], log)
    s = time.perf_counter()
    mixed = _mix(out_dir, summary, log)
    seconds["mix"] = time.perf_counter() - s
    trained = evaluated = None
    if train_steps > 0:
        s = time.perf_counter()
        trained = _train(out_dir, mixed["manifest"], summary, train_steps, log)
        seconds["train"] = time.perf_counter() - s
        s = time.perf_counter()
        evaluated = _eval(out_dir, trained["model"], log)
        seconds["eval"] = time.perf_counter() - s
    seconds["total"] = time.perf_counter() - t0
    return DemoResult(out_dir, source, summary, planted,
                      {k: round(v, 1) for k, v in seconds.items()}, mixed, trained, evaluated)


def _source(out_dir: str, n: int, log) -> str:
    root = storage.join(out_dir, "source")
    info = demo_pool.build(root, demo_pool.DemoDataConfig(n=n))
    log(f"demo pool: {info['rows']:,} rows in {root} ({info['original']:,} originals, "
        f"{info['near_duplicate']:,} near-duplicate copies in {info['dup_groups']:,} groups, "
        f"{info['dead_link']:,} dead links, {info['corrupt']:,} corrupt files, "
        f"{info['mismatched_caption']:,} mismatched captions)")
    return root


def _curate(out_dir: str, source: str, sets: list[str], log) -> dict:
    run = storage.join(out_dir, "curate")
    if os.path.isdir(run):
        shutil.rmtree(run)
    log(MODEL_NOTE)
    return curate_pool(source, run, CONFIG, sets, log)


def curate_pool(source: str, run: str, config: str, sets: list[str], log) -> dict:
    """Serve the generated pool on 127.0.0.1 and curate it from URLs into `run` (the
    pipeline and ablation flows call this too)."""
    from flows import curate

    with demo_pool.serve(source) as base:
        meta = demo_pool.write_metadata(source, base)
        log(f"serving the pool at {base}; curating into {run}")
        cfg = curate.load_config(config, [f"source.path={meta}"] + list(sets), output=run)
        return curate.run_local(cfg)


def _check(source: str, run: str, log) -> dict:
    """Where each planted kind ended up (rejects by stage/reason, or the coreset)."""
    import polars as pl

    truth = pl.read_parquet(storage.join(source, "truth.parquet")).select("uid", "kind")
    rej = pl.read_parquet(storage.join(run, "rejects.parquet")).select(
        "uid", (pl.col("stage") + ":" + pl.col("reason")).alias("fate"))
    core = pl.read_parquet(storage.join(run, "coreset.parquet")).select(
        "uid", pl.lit("coreset").alias("fate"))
    fate = truth.join(pl.concat([rej, core]), on="uid", how="left")
    out: dict[str, dict[str, int]] = {}
    for row in fate.group_by("kind", "fate").len().sort("kind", "len", descending=[False, True]).iter_rows():
        out.setdefault(row[0], {})[row[1]] = row[2]
    for kind, d in out.items():
        log(f"  planted {kind:<19} " + ", ".join(f"{k} {v}" for k, v in d.items()))
    # planted groups (an original and its copies): how many members passed dedup
    groups = pl.read_parquet(storage.join(source, "truth.parquet")).filter(
        pl.col("dup_group") >= 0).select("uid", "dup_group")
    dedup = pl.read_parquet(storage.join(run, "rejects.parquet")).filter(
        pl.col("stage") == "dedup").select("uid", "kept_uid")
    early = set(rej.filter(pl.col("fate").str.starts_with("download")
                           | pl.col("fate").str.starts_with("embed"))["uid"])
    g = groups.filter(~pl.col("uid").is_in(list(early)))
    passed = g.filter(~pl.col("uid").is_in(dedup["uid"].to_list()))
    per = g.group_by("dup_group").len().join(passed.group_by("dup_group").len(), on="dup_group",
                                             how="left", suffix="_passed").fill_null(0)
    one = int((per["len_passed"] == 1).sum())
    # a drop whose kept uid is outside its planted group links unrelated images
    links = dedup.join(groups, on="uid", how="left").join(
        groups.rename({"uid": "kept_uid", "dup_group": "kept_group"}), on="kept_uid", how="left")
    false = int(links.filter(pl.col("dup_group").is_null() | pl.col("kept_group").is_null()
                             | (pl.col("dup_group") != pl.col("kept_group"))).height)
    out["_groups"] = {"planted": per.height, "collapsed_to_one": one,
                      "drops_outside_planted_groups": false}
    log(f"  planted groups collapsed to one member: {one} of {per.height}; duplicates dropped "
        f"outside any planted group: {false} of {dedup.height}")
    return out


def _mix(out_dir: str, summary: dict, log) -> dict:
    """stage1/ from the coreset, mix/ from the Bunny-695K recipe, and one manifest
    (<out_dir>/manifest.json) that lists both with their images."""
    man = storage.join(out_dir, "manifest.json")
    for old in (man, storage.join(out_dir, "stage1"), storage.join(out_dir, "mix"),
                storage.join(out_dir, "mix-source")):
        if os.path.isdir(old):
            shutil.rmtree(old)
        elif os.path.exists(old):
            os.remove(old)
    s1 = stage1_table(summary["paths"]["coreset"], storage.join(out_dir, "stage1"), man, log)
    # Bunny-695K at 1/500 scale: 1,250 image records, 80 ShareGPT, 140 WizardLM.
    recipe_path = synthetic_sources(storage.join(out_dir, "mix-source"))
    mix_dir = storage.join(out_dir, "mix")
    stats = build_mix(recipe_path, mix_dir, man, log)
    return {"stage1": s1, "mix": stats, "manifest": man,
            "paths": {"stage1": storage.join(out_dir, "stage1", "stage1.parquet"),
                      "mix": stats["table"], "mix_rejects": storage.join(mix_dir, "rejects.parquet"),
                      "manifest": man}}


def stage1_table(coreset: str, out: str, manifest_path: str, log) -> dict:
    """The coreset's captions as the stage-1 table, added to `manifest_path`."""
    from pipelines.mix import stage1

    s1 = stage1.run(stage1.Stage1Config(manifest=manifest_path), coreset, out)
    log(f"stage-1 table: {s1['kept']:,} caption records from the coreset "
        f"({s1['rejected']:,} rejected)")
    return s1


def synthetic_sources(src: str, scale: float = 0.002, max_images: int = 64,
                      recipe: str = "bunny-695k") -> str:
    """Scaled-down synthetic instruction sources in the real formats; returns the path
    of the recipe file pointing at them."""
    from pipelines.synth import mix as synth

    synth.write_sources(src, scale=scale, max_images=max_images)
    return synth.write_recipe(src, recipe)


def build_mix(recipe_path: str, mix_dir: str, manifest_path: str, log) -> dict:
    """Build the mix of a recipe file into `mix_dir` and add it to `manifest_path` as
    table "mix"; returns the mix stats plus "table" (the mix.parquet path)."""
    from pipelines import manifest
    from pipelines.mix import build, recipe, stage1

    r = recipe.load(recipe_path)
    stats = build.run(r, mix_dir)
    for name, st in stats["sources"].items():
        reasons = ", ".join(f"{k} {v:,}" for k, v in st["reasons"].items()) or "none"
        log(f"  mix source {name}: {st['input']:,} in -> {st['kept']:,} kept ({reasons})")
    log(f"mix (recipe {r.name}): {stats['kept']:,} records, text-only share "
        f"{stats['text_only_share']:.1%}")
    built = manifest.load(storage.join(mix_dir, "manifest.json"))
    stage1.add_to_manifest(manifest_path, "mix", built.table_path("mix"), built.images("mix"),
                           config={"recipe": r.to_dict()})
    return {**stats, "table": built.table_path("mix")}


def _train(out_dir: str, manifest_path: str, summary: dict, steps: int, log) -> dict:
    """Train the tiny model and ask it about the first coreset image."""
    import pyarrow.compute as pc

    from mllm import demo as mllm_demo
    from mllm import export, generate

    log(f"training the tiny VLM (random weights, tokenizer built from the manifest's text): "
        f"{steps} steps of stage 1 (projector on the captions), {steps} of stage 2 (LoRA on the mix)")
    res = mllm_demo.train_tiny(manifest_path, storage.join(out_dir, "train"), steps=steps)
    for n in ("stage1", "stage2"):
        st = res[n]
        log(f"  {n}: loss {st['first_loss']:.3f} -> {st['final_loss']:.3f}, "
            f"{st['tokens_per_s']:,.0f} tokens/s, plot {st['plot']}")
    images = storage.read_table(summary["paths"]["images"], columns=["uid", "jpg"])
    core = storage.read_table(summary["paths"]["coreset"], columns=["uid", "caption"])
    uid = images.column("uid")[0].as_py()
    caption = core.filter(pc.equal(core.column("uid"), uid)).column("caption")[0].as_py()
    question = "Describe the image concisely."
    jpg = images.column("jpg")[0].as_py()
    image_path = storage.join(out_dir, "train", f"{uid}.jpg")   # for `warren generate --image`
    storage.write_bytes(image_path, jpg)
    answer = generate.answer(export.load(res["model"]), jpg, question, max_new_tokens=16)
    log(f"asked about coreset image {uid} (its caption: {caption!r}):")
    log(f"  Q: {question}\n  A: {answer}")
    return {**res, "coreset_question": {"uid": uid, "image": image_path, "caption": caption,
                                        "question": question, "answer": answer}}


BENCHMARKS = ["pope", "gqa"]
# Short answers ("a single word or phrase") need a few tokens; a random model never
# says its end token, so LLaVA's budget of 128 would be most of the demo's time.
DEMO_BENCH = dict(images=12, max_new_tokens=8)


def _eval(out_dir: str, model: str, log) -> dict:
    """Draw the held-out benchmark (reused across runs) and evaluate the model on it.
    The model is new each run, so its answers start over."""
    from mllm.eval import run
    from mllm.eval.run import flatten
    from pipelines.synth import demo_bench

    bench = storage.join(out_dir, "bench")
    info = demo_bench.build(bench, demo_bench.DemoBenchConfig(images=DEMO_BENCH["images"]))
    log(f"held-out benchmark: {info['images']} new procedural images, {info['pope']} POPE-style "
        f"yes/no and {info['gqa']} GQA-style short-answer questions in {bench}")
    res = run.evaluate(model, BENCHMARKS, bench, storage.join(out_dir, "eval"), batch_size=32,
                       progress=False, restart=True, max_new_tokens=DEMO_BENCH["max_new_tokens"])
    log("scores of the 2-layer random-weight model (meaningless, the plumbing is the point):")
    for name in BENCHMARKS:
        r = res["benchmarks"][name]
        head = r.get("headline") or {}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in flatten(r["scores"]) if k != head.get("key")
                          and (name != "pope" or k.split(".")[-1] in ("accuracy", "f1", "yes_ratio")))
        lead = f"{head['key']} {head['value']:.4g}; " if head else ""
        log(f"  {name} (n={r['n']}): {lead}{shown}")
    return res
