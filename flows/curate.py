"""The curation flow: download -> embed -> select -> coreset images -> manifest, report.

Two entry modes, picked by `source.kind` in the config:
- `urls`: LAION-style metadata (uid, url, caption) is split into shards; each shard is
  downloaded with img2dataset (a subprocess), then embedded with open_clip into
  `<output>/embeddings/emb_{i:05d}.parquet`, which is the selection's source;
- `embeddings`: precomputed embeddings (LAION / clip-retrieval layout, or Warren
  Parquet tables) go straight to selection.
Either way, only the coreset's images are then fetched (or copied from the pool with
`coreset_images: pool`) into one IMAGES table the trainer reads through the manifest.

Every step is a `pipelines` function wrapped as a Prefect task and mapped over download
shards or cluster buckets on the task runner from `flows.runners` (threads, or Dask).
Each unit writes atomically and leaves a completion marker, so rerunning a killed run
into the same output folder skips the finished units and ends with the same coreset.

`curate` is the flow deployments serve (`flows/serve.py`, `prefect.yaml`): it loads the
config file with overrides, then runs `curate_run` as a subflow on the chosen runner.
`curate_run` first checks the run folder (flows/curate_config.py: output apart from the
input, the same config and input as a run already there). A Warren error inside fails
the flow runs with its message; the command prints it as one line.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows import console, runners
from flows.curate_config import (CurateConfig, SourceConfig, check_run, load_config,  # noqa: F401
                                 prepare)
from pipelines import download, embed, manifest, select, storage
from pipelines.config import apply_overrides  # noqa: F401  (kept for callers)
from pipelines.errors import set_setting_style, setting_style

MODES = ("urls", "embeddings")


# -- paths of a run -------------------------------------------------------------------------
@dataclass(frozen=True)
class RunPaths:
    out: str

    @property
    def work(self):
        return storage.join(self.out, "_work")

    @property
    def dl(self):
        return storage.join(self.work, "download")

    def dl_part(self, i):
        return storage.join(self.dl, f"part_{i:05d}")

    def dl_rejects(self, i):
        return storage.join(self.dl, "rejects", f"download_{i:05d}.parquet")

    @property
    def input_rejects(self):
        return storage.join(self.dl, "rejects", "input.parquet")

    def pool(self, i):
        return storage.join(self.out, "pool", f"images_{i:05d}.parquet")

    @property
    def embeddings(self):
        return storage.join(self.out, "embeddings")

    def emb(self, i):
        return storage.join(self.embeddings, f"emb_{i:05d}.parquet")

    @property
    def emb_work(self):
        return storage.join(self.work, "embed")

    def emb_rejects(self, i):
        return storage.join(self.emb_work, "rejects", f"embed_{i:05d}.parquet")

    @property
    def cs(self):
        return storage.join(self.work, "coreset_download")

    def cs_part(self, i):
        return storage.join(self.cs, f"part_{i:05d}")

    def cs_images(self, i):
        return storage.join(self.cs, "images", f"images_{i:05d}.parquet")

    def cs_rejects(self, i):
        return storage.join(self.cs, "rejects", f"missing_{i:05d}.parquet")

    @property
    def images(self):
        return storage.join(self.out, "images", "coreset_images.parquet")

    @property
    def images_missing(self):
        return storage.join(self.out, "images", "missing.parquet")


# -- tasks (thin: each calls one pipelines function) -----------------------------------------
TASK = dict(cache_policy=NO_CACHE, persist_result=False)


def _cfg(cfg: dict) -> CurateConfig:
    """The run's config inside a task. Hints in errors name `--set select.k=`, the way
    this command takes settings (also on Dask workers, which run no CLI; in this process
    the flow's `setting_style` scope puts the caller's style back afterwards)."""
    set_setting_style("set")
    return CurateConfig.from_dict(cfg)


@task(name="split", **TASK)
def t_split(cfg: dict) -> dict:
    c = _cfg(cfg)
    s = c.source
    return download.split_input(s.path, RunPaths(c.output).dl, s.shard_rows, s.uid,
                                s.url_column, s.caption_column, c.download.url_schemes)


@task(name="download", task_run_name="download-{i}", **TASK)
def t_download(cfg: dict, i: int) -> dict:
    c = _cfg(cfg)
    r = RunPaths(c.output)
    part = storage.join(r.dl, "parts", f"part_{i:05d}.parquet")
    info = download.download_part(part, r.dl_part(i), r.pool(i), r.dl_rejects(i), c.download,
                                  progress=lambda done, total: console.report("download", i, done))
    info["shard"] = i
    get_run_logger().info("download %d: %d images, failures %s", i, info["images"], info["failed"])
    return info


@task(name="embed", task_run_name="embed-{i}", **TASK)
def t_embed(cfg: dict, i: int, downloaded: dict | None = None) -> dict:
    c = _cfg(cfg)
    r = RunPaths(c.output)
    name = f"embed-{i:05d}"
    if storage.is_done(r.emb_work, name):
        return storage.done_info(r.emb_work, name)
    log = get_run_logger()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        console.report("embed", i, done)
        if done == total or done / total - last[0] >= 0.25:
            last[0] = done / total
            log.info("embed %d: %d/%d images", i, done, total)

    info = embed.embed_shard(c.embed, r.pool(i), r.emb(i), r.emb_rejects(i), progress)
    info["shard"] = i
    info["pid"] = os.getpid()    # which process embedded it (a Dask worker, or the flow's)
    storage.mark_done(r.emb_work, name, info)
    log.info("embed %d: %s images/s", i, info["images_per_s"])
    return info


@task(name="plan", **TASK)
def t_plan(cfg: dict, source_dir: str) -> dict:
    c = _cfg(cfg)
    return select.plan(c.select, source_dir, c.output)


@task(name="validate", task_run_name="validate-{shard}", **TASK)
def t_validate(cfg: dict, source_dir: str, shard: int) -> dict:
    c = _cfg(cfg)
    return select.stage_validate(c.select, source_dir, c.output, shard)


@task(name="train-kmeans", **TASK)
def t_train(cfg: dict, source_dir: str, wait: list | None = None) -> dict:
    c = _cfg(cfg)
    return select.stage_train(c.select, source_dir, c.output)


@task(name="assign", task_run_name="assign-{shard}", **TASK)
def t_assign(cfg: dict, source_dir: str, shard: int) -> dict:
    c = _cfg(cfg)
    return select.stage_assign(c.select, source_dir, c.output, shard)


@task(name="dedup", task_run_name="dedup-{bucket}", **TASK)
def t_dedup(cfg: dict, source_dir: str, bucket: int) -> dict:
    c = _cfg(cfg)
    return select.stage_dedup(c.select, source_dir, c.output, bucket)


@task(name="finish", **TASK)
def t_finish(cfg: dict, source_dir: str, extra_rejects: list[str]) -> dict:
    c = _cfg(cfg)
    return select.stage_finish(c.select, source_dir, c.output, extra_rejects)


@task(name="coreset-split", **TASK)
def t_coreset_split(cfg: dict) -> dict:
    c = _cfg(cfg)
    r = RunPaths(c.output)
    return download.split_table(storage.join(c.output, "coreset.parquet"), r.cs,
                                c.source.coreset_shard_rows, c.download.url_schemes)


@task(name="coreset-download", task_run_name="coreset-download-{i}", **TASK)
def t_coreset_download(cfg: dict, i: int) -> dict:
    c = _cfg(cfg)
    r = RunPaths(c.output)
    part = storage.join(r.cs, "parts", f"part_{i:05d}.parquet")
    info = download.download_part(
        part, r.cs_part(i), r.cs_images(i), r.cs_rejects(i), c.download, stage="coreset_download",
        progress=lambda done, total: console.report("coreset images", i, done))
    info["shard"] = i
    return info


@task(name="coreset-images", **TASK)
def t_coreset_images(cfg: dict, parts: int, pool_shards: int) -> dict:
    c = _cfg(cfg)
    r = RunPaths(c.output)
    if storage.is_done(r.work, "coreset-images"):
        return storage.done_info(r.work, "coreset-images")
    if c.coreset_images == "pool":
        info = download.gather_from_pool(storage.join(c.output, "coreset.parquet"),
                                         [r.pool(i) for i in range(pool_shards)],
                                         r.images, r.images_missing)
    else:
        not_fetched = storage.join(r.cs, "rejects", "input.parquet")
        info = download.merge_images([r.cs_images(i) for i in range(parts)],
                                     [r.cs_rejects(i) for i in range(parts)]
                                     + ([not_fetched] if storage.exists(not_fetched) else []),
                                     r.images, r.images_missing)
    storage.mark_done(r.work, "coreset-images", info)
    return info


@task(name="report", **TASK)
def t_report(cfg: dict) -> str:
    from pipelines import report
    c = _cfg(cfg)
    return report.write(c.output)


# -- the flows ------------------------------------------------------------------------------
def _collect(futures, artifact: str | None = None, what: str = "", stage: str | None = None,
             shard_rows: dict[int, int] | None = None, unit: str = "rows") -> list:
    """Results of mapped futures in submission order; a progress artifact (Prefect UI)
    and the console's progress (terminal) move as they finish. The first failure is
    raised (its unit is redone on the next run)."""
    futures = list(futures)
    pid = create_progress_artifact(0.0, key=artifact, description=what) if artifact and futures else None
    rows = shard_rows if shard_rows is not None else {i: 1 for i in range(len(futures))}
    bar = console.start(stage, rows, unit=unit) if stage else None
    index = {id(f): i for i, f in enumerate(futures)}
    try:
        for n, f in enumerate(as_completed(futures), 1):
            f.wait()
            if bar is not None and f.state.is_completed():
                bar.shard_done(index[id(f)])
            if pid is not None:
                update_progress_artifact(pid, 100.0 * n / len(futures),
                                         description=f"{what}: {n}/{len(futures)}")
    finally:
        if stage:
            console.stop(stage)
    return [f.result() for f in futures]


@flow(name="curate-run", log_prints=True)
def curate_run(cfg: dict, restart: bool = False) -> dict:
    """Every step of one curation run (the task runner is set by the caller). Hints name
    `--set select.k=` inside it only: run in-process, it leaves the caller's style."""
    with setting_style("set"):
        return _steps(cfg, restart)


def _steps(cfg: dict, restart: bool) -> dict:
    c = _cfg(cfg)
    cfg = c.to_dict()
    log = get_run_logger()
    r = RunPaths(c.output)
    t0 = time.perf_counter()
    prepare(c, restart)          # output apart from input; same config and input as before
    log.info("curate: %s -> %s on %s", c.source.kind, c.output, runners.describe(c.runner))
    timings: dict[str, float] = {}
    extra: list[str] = []
    funnel_head: dict[str, int] = {}
    dl_infos: list[dict] = []
    em_infos: list[dict] = []
    n_parts = 0

    if c.source.kind == "urls":
        if c.embed.random_init:
            log.warning("embed: %s is randomly initialised (no pretrained weights): clip scores "
                        "and duplicate links are not meaningful; set embed.pretrained for "
                        "real runs", c.embed.model)
        s = time.perf_counter()
        split = t_split.submit(cfg).result()
        n_parts = split["parts"]
        part_rows = dict(enumerate(split.get("part_rows") or [c.source.shard_rows] * n_parts))
        dl = t_download.map(unmapped(cfg), list(range(n_parts)))
        em = t_embed.map(unmapped(cfg), list(range(n_parts)), dl)
        dl_infos = _collect(dl, "curate-download", "downloaded shards", "download", part_rows)
        download.check_downloaded(split, dl_infos)    # 0 of N: stop here, not at selection
        timings["download"] = time.perf_counter() - s
        em_infos = _collect(em, "curate-embed", "embedded shards", "embed",
                            {d["shard"]: d["images"] for d in dl_infos})
        timings["embed"] = time.perf_counter() - s - timings["download"]
        source_dir = r.embeddings
        extra = [r.input_rejects] + [r.dl_rejects(i) for i in range(n_parts)] \
            + [r.emb_rejects(i) for i in range(n_parts)]
        funnel_head = {"input": split["rows"],
                       "has_url": split["rows"] - split["missing_url"]
                       - split.get("bad_url_scheme", 0),
                       "downloaded": sum(d["images"] for d in dl_infos),
                       "embedded": sum(e["embedded"] for e in em_infos)}
    else:
        source_dir = c.source.path

    s = time.perf_counter()
    p = t_plan.submit(cfg, source_dir).result()
    _collect(t_validate.map(unmapped(cfg), unmapped(source_dir), list(range(p["shards"]))),
             stage="validate", unit="shards")
    t_train.submit(cfg, source_dir).result()
    _collect(t_assign.map(unmapped(cfg), unmapped(source_dir), list(range(p["shards"]))),
             "curate-assign", "assigned shards", "assign", unit="shards")
    _collect(t_dedup.map(unmapped(cfg), unmapped(source_dir), list(range(p["buckets"]))),
             "curate-dedup", "deduplicated buckets", "dedup", unit="buckets")
    stats = t_finish.submit(cfg, source_dir, extra).result()
    timings["select"] = time.perf_counter() - s

    images_info = None
    if c.coreset_images != "none":
        s = time.perf_counter()
        parts = 0
        if c.coreset_images == "download":
            split = t_coreset_split.submit(cfg).result()
            parts = split["parts"]
            rows = dict(enumerate(split.get("part_rows") or [1] * parts))
            _collect(t_coreset_download.map(unmapped(cfg), list(range(parts))),
                     "curate-coreset-download", "coreset parts downloaded", "coreset images", rows)
        images_info = t_coreset_images.submit(cfg, parts, n_parts).result()
        timings["coreset_images"] = time.perf_counter() - s

    summary = _write_outputs(c, stats, funnel_head, dl_infos, em_infos, images_info, timings)
    if c.report:
        s = time.perf_counter()
        summary["report"] = t_report.submit(cfg).result()
        timings["report"] = time.perf_counter() - s
    timings["total"] = time.perf_counter() - t0
    summary["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    storage.write_json(storage.join(c.output, "curate_stats.json"), summary)
    _artifacts(c, summary)
    log.info("curate: %s", " -> ".join(f"{k} {v:,}" for k, v in summary["funnel"].items()))
    return summary


def _write_outputs(c: CurateConfig, stats: dict, head: dict, dl_infos, em_infos,
                   images_info, timings) -> dict:
    """The full funnel (download and embed included), and the manifest with the coreset's
    images entry (select's manifest lists the tables; this one adds where images are)."""
    out = c.output
    r = RunPaths(out)
    f = stats["funnel"]
    # in URL mode select's "input" is the embedded rows: the head already counts them
    funnel = {**head, **{k: v for k, v in f.items() if k != "input"}} if head else dict(f)
    images = None
    extra = {"curate": {"mode": c.source.kind, "embed_model": c.embed.model,
                        "embed_pretrained": c.embed.pretrained,
                        "random_init_model": c.embed.random_init}}
    if images_info is not None:
        images = {"coreset": {"kind": "parquet",
                              "path": os.path.relpath(r.images, out) if "://" not in out else r.images}}
        extra["coreset_images"] = images_info
        funnel["with_image"] = images_info["images"]
    manifest.write(storage.join(out, "manifest.json"),
                   {"coreset": storage.join(out, "coreset.parquet"),
                    "rejects": storage.join(out, "rejects.parquet")},
                   config={"curate": c.to_dict()}, images=images, extra=extra)
    return {"output": out, "mode": c.source.kind, "funnel": funnel,
            "rejects_by_stage": stats["rejects_by_stage"],
            "coreset_rows": stats["coreset_rows"], "rejected_rows": stats["rejected_rows"],
            "coreset_images": images_info,
            "download": {"shards": len(dl_infos),
                         "messages": _merge_counts([d.get("messages", {}) for d in dl_infos])},
            "embed": {"model": c.embed.model, "pretrained": c.embed.pretrained,
                      "random_init": c.embed.random_init,
                      "images_per_s": [e.get("images_per_s") for e in em_infos]},
            "paths": {"coreset": storage.join(out, "coreset.parquet"),
                      "rejects": storage.join(out, "rejects.parquet"),
                      "manifest": storage.join(out, "manifest.json"),
                      "images": r.images if images_info is not None else None,
                      "report": storage.join(out, "report.html") if c.report else None}}


def _merge_counts(ds: list[dict]) -> dict:
    out: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _artifacts(c: CurateConfig, summary: dict) -> None:
    funnel = summary["funnel"]
    rows, prev = [], None
    for stage, n in funnel.items():
        rows.append({"stage": stage, "rows": n,
                     "kept_of_previous": f"{100.0 * n / prev:.1f}%" if prev else ""})
        prev = n or prev
    create_table_artifact(rows, key="curate-funnel", description=f"funnel of {c.output}")
    reasons = [{"stage": st, "reason": re_, "rows": n}
               for st, d in sorted(summary["rejects_by_stage"].items()) for re_, n in sorted(d.items())]
    create_table_artifact(reasons, key="curate-rejects", description="rejects per stage and reason")
    md = [f"# Curation run `{c.output}`", ""]
    if c.embed.random_init:
        md += [f"**The embedding model `{c.embed.model}` is randomly initialised**: clip scores "
               "and duplicates are not meaningful. Set `embed.pretrained` for real runs.", ""]
    md += ["| stage | rows |", "|---|---:|"] + [f"| {k} | {v:,} |" for k, v in funnel.items()]
    md += ["", "| output | path |", "|---|---|"] + \
          [f"| {k} | `{v}` |" for k, v in summary["paths"].items() if v]
    create_markdown_artifact("\n".join(md), key="curate-summary",
                             description=f"curation summary of {c.output}")



@flow(name="curate", log_prints=True)
def curate(config: str | None = None, overrides: list[str] | None = None,
           output: str | None = None, dask_address: str | None = None,
           restart: bool = False) -> dict:
    """Load a curate config (YAML path + `key=value` overrides) and run it on the
    configured task runner. This is the flow that `warren curate` runs and that the
    deployments serve. A Warren error fails the run with its one-line message."""
    with setting_style("set"):
        c = load_config(config, overrides, output=output, dask_address=dask_address)
        run = curate_run.with_options(task_runner=runners.make(c.runner))
        return run(c.to_dict(), restart)


def run_local(cfg: CurateConfig | dict, restart: bool = False) -> dict:
    """Run a config in this process (tests, the demo): `curate_run` on its runner."""
    c = cfg if isinstance(cfg, CurateConfig) else CurateConfig.from_dict(cfg)
    return curate_run.with_options(task_runner=runners.make(c.runner))(c.to_dict(), restart)


def summarize(summary: dict) -> str:
    f = summary["funnel"]
    return " -> ".join(f"{k} {v:,}" for k, v in f.items())
