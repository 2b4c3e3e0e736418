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
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import yaml
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows import runners
from pipelines import download, embed, manifest, select, storage
from pipelines.errors import ConfigError, InputError

MODES = ("urls", "embeddings")


# -- configuration --------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceConfig:
    kind: Literal["urls", "embeddings"] = "urls"
    path: str = ""                        # urls: metadata Parquet (file or folder);
                                          # embeddings: LAION layout or Warren Parquet folder
    uid_column: str | None = None         # None: "uid" for urls, "key" (LAION) for embeddings
    url_column: str = "url"
    caption_column: str | None = "caption"
    shard_rows: int = 10_000              # urls: rows per download / embedding shard
    coreset_shard_rows: int = 10_000      # rows per coreset-download part

    def __post_init__(self):
        p = []
        if self.kind not in MODES:
            p.append(f"source.kind must be urls or embeddings (got {self.kind!r})")
        if not self.path:
            p.append("source.path is required (metadata Parquet for urls, a folder for embeddings)")
        if self.shard_rows < 1 or self.coreset_shard_rows < 1:
            p.append("source.shard_rows and coreset_shard_rows must be >= 1")
        if p:
            raise ConfigError(p, source="source config")

    @property
    def uid(self) -> str:
        return self.uid_column or ("uid" if self.kind == "urls" else "key")


@dataclass(frozen=True)
class CurateConfig:
    """A whole curation run. Load with `load_config` (YAML + `key=value` overrides)."""
    output: str
    source: SourceConfig
    download: download.DownloadConfig = field(default_factory=download.DownloadConfig)
    embed: embed.EmbedConfig = field(default_factory=embed.EmbedConfig)
    select: select.SelectConfig = field(default_factory=select.SelectConfig)
    runner: runners.RunnerConfig = field(default_factory=runners.RunnerConfig)
    coreset_images: Literal["download", "pool", "none"] = "download"
    report: bool = True

    def __post_init__(self):
        p = []
        if not self.output:
            p.append("output is required")
        if self.coreset_images not in ("download", "pool", "none"):
            p.append(f"coreset_images must be download, pool or none (got {self.coreset_images!r})")
        if self.coreset_images == "pool" and self.source.kind != "urls":
            p.append("coreset_images: pool needs source.kind urls (embeddings have no pool images)")
        if p:
            raise ConfigError(p, source="curate config")

    def to_dict(self) -> dict:
        return {"output": self.output, "source": dataclasses.asdict(self.source),
                "download": self.download.to_dict(), "embed": self.embed.to_dict(),
                "select": self.select.to_dict(), "runner": self.runner.to_dict(),
                "coreset_images": self.coreset_images, "report": self.report}

    @classmethod
    def from_dict(cls, d: dict, source: str = "curate config") -> "CurateConfig":
        """Build every group, collecting the problems of all of them before raising."""
        d = copy.deepcopy(d or {})
        problems: list[str] = []
        known = {"output", "source", "download", "embed", "select", "runner",
                 "coreset_images", "report"}
        problems += [f"unknown key '{k}'" for k in sorted(set(d) - known)]
        if not d.get("output"):
            problems.append("output is required (config `output:` or --output)")

        def group(name, build):
            try:
                return build(d.get(name) or {})
            except ConfigError as e:
                problems.extend(f"{name}: {x}" if not x.startswith(name) else x for x in e.problems)
            except TypeError as e:
                problems.append(f"{name}: {e}")
            return None

        src = group("source", lambda g: SourceConfig(**_known(g, SourceConfig, "source", problems)))
        dl = group("download", download.DownloadConfig.from_dict)
        em = group("embed", embed.EmbedConfig.from_dict)
        sel_d = dict(d.get("select") or {})
        if src is not None and src.kind == "embeddings":
            sel_d.setdefault("uid_column", src.uid)
        sel = group("select", lambda g: select.SelectConfig.from_dict(sel_d))
        rn = group("runner", lambda g: runners.RunnerConfig(**_known(g, runners.RunnerConfig,
                                                                      "runner", problems)))
        if problems or None in (src, dl, em, sel, rn):
            raise ConfigError(problems or ["invalid configuration"], source=source)
        try:
            return cls(output=str(d.get("output") or ""), source=src, download=dl, embed=em,
                       select=sel, runner=rn, coreset_images=d.get("coreset_images", "download"),
                       report=bool(d.get("report", True)))
        except ConfigError as e:
            raise ConfigError(e.problems, source=source) from None


def _known(g: dict, cls, name: str, problems: list[str]) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    for k in sorted(set(g) - names):
        problems.append(f"{name}: unknown option '{k}'")
    return {k: v for k, v in g.items() if k in names}


def apply_overrides(d: dict, sets: list[str] | None) -> dict:
    """`a.b=value` strings onto a nested dict; values are parsed as YAML (`5`, `null`,
    `[0.4, 0.6]`, `true`)."""
    d = copy.deepcopy(d)
    for s in sets or []:
        if "=" not in s:
            raise ConfigError(f"override {s!r} must look like key=value (e.g. select.k=100)",
                              source="--set")
        key, value = s.split("=", 1)
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {s!r}: '{p}' is not a group", source="--set")
        node[parts[-1]] = yaml.safe_load(value)
    return d


def load_config(path: str | None, sets: list[str] | None = None, output: str | None = None,
                dask_address: str | None = None) -> CurateConfig:
    """Read a YAML config, apply overrides, and validate every group at once."""
    d: dict = {}
    if path:
        try:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise InputError("config file not found", path=path) from None
        except yaml.YAMLError as e:
            raise InputError(f"not valid YAML ({e})", path=path) from None
        if not isinstance(d, dict):
            raise InputError("a curate config must be a mapping", path=path)
    d = apply_overrides(d, sets)
    if output:
        d["output"] = output
    if dask_address:
        d.setdefault("runner", {})["dask_address"] = dask_address
    return CurateConfig.from_dict(d, source=path or "curate config")


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


@task(name="split", **TASK)
def t_split(cfg: dict) -> dict:
    c = CurateConfig.from_dict(cfg)
    s = c.source
    return download.split_input(s.path, RunPaths(c.output).dl, s.shard_rows, s.uid,
                                s.url_column, s.caption_column)


@task(name="download", task_run_name="download-{i}", **TASK)
def t_download(cfg: dict, i: int) -> dict:
    c = CurateConfig.from_dict(cfg)
    r = RunPaths(c.output)
    part = storage.join(r.dl, "parts", f"part_{i:05d}.parquet")
    info = download.download_part(part, r.dl_part(i), r.pool(i), r.dl_rejects(i), c.download)
    get_run_logger().info("download %d: %d images, failures %s", i, info["images"], info["failed"])
    return info


@task(name="embed", task_run_name="embed-{i}", **TASK)
def t_embed(cfg: dict, i: int, downloaded: dict | None = None) -> dict:
    c = CurateConfig.from_dict(cfg)
    r = RunPaths(c.output)
    name = f"embed-{i:05d}"
    if storage.is_done(r.emb_work, name):
        return storage.done_info(r.emb_work, name)
    log = get_run_logger()
    last = [0.0]

    def progress(done: int, total: int) -> None:
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
    c = CurateConfig.from_dict(cfg)
    return select.plan(c.select, source_dir, c.output)


@task(name="validate", task_run_name="validate-{shard}", **TASK)
def t_validate(cfg: dict, source_dir: str, shard: int) -> dict:
    c = CurateConfig.from_dict(cfg)
    return select.stage_validate(c.select, source_dir, c.output, shard)


@task(name="train-kmeans", **TASK)
def t_train(cfg: dict, source_dir: str, wait: list | None = None) -> dict:
    c = CurateConfig.from_dict(cfg)
    return select.stage_train(c.select, source_dir, c.output)


@task(name="assign", task_run_name="assign-{shard}", **TASK)
def t_assign(cfg: dict, source_dir: str, shard: int) -> dict:
    c = CurateConfig.from_dict(cfg)
    return select.stage_assign(c.select, source_dir, c.output, shard)


@task(name="dedup", task_run_name="dedup-{bucket}", **TASK)
def t_dedup(cfg: dict, source_dir: str, bucket: int) -> dict:
    c = CurateConfig.from_dict(cfg)
    return select.stage_dedup(c.select, source_dir, c.output, bucket)


@task(name="finish", **TASK)
def t_finish(cfg: dict, source_dir: str, extra_rejects: list[str]) -> dict:
    c = CurateConfig.from_dict(cfg)
    return select.stage_finish(c.select, source_dir, c.output, extra_rejects)


@task(name="coreset-split", **TASK)
def t_coreset_split(cfg: dict) -> dict:
    c = CurateConfig.from_dict(cfg)
    r = RunPaths(c.output)
    return download.split_table(storage.join(c.output, "coreset.parquet"), r.cs,
                                c.source.coreset_shard_rows)


@task(name="coreset-download", task_run_name="coreset-download-{i}", **TASK)
def t_coreset_download(cfg: dict, i: int) -> dict:
    c = CurateConfig.from_dict(cfg)
    r = RunPaths(c.output)
    part = storage.join(r.cs, "parts", f"part_{i:05d}.parquet")
    return download.download_part(part, r.cs_part(i), r.cs_images(i), r.cs_rejects(i),
                                  c.download, stage="coreset_download")


@task(name="coreset-images", **TASK)
def t_coreset_images(cfg: dict, parts: int, pool_shards: int) -> dict:
    c = CurateConfig.from_dict(cfg)
    r = RunPaths(c.output)
    if storage.is_done(r.work, "coreset-images"):
        return storage.done_info(r.work, "coreset-images")
    if c.coreset_images == "pool":
        info = download.gather_from_pool(storage.join(c.output, "coreset.parquet"),
                                         [r.pool(i) for i in range(pool_shards)],
                                         r.images, r.images_missing)
    else:
        info = download.merge_images([r.cs_images(i) for i in range(parts)],
                                     [r.cs_rejects(i) for i in range(parts)],
                                     r.images, r.images_missing)
    storage.mark_done(r.work, "coreset-images", info)
    return info


@task(name="report", **TASK)
def t_report(cfg: dict) -> str:
    from pipelines import report
    c = CurateConfig.from_dict(cfg)
    return report.write(c.output)


# -- the flows ------------------------------------------------------------------------------
def _collect(futures, artifact: str | None = None, what: str = "") -> list:
    """Results of mapped futures in submission order; a progress artifact moves as they
    finish. The first failure is raised (its unit is redone on the next run)."""
    futures = list(futures)
    pid = create_progress_artifact(0.0, key=artifact, description=what) if artifact and futures else None
    for n, f in enumerate(as_completed(futures), 1):
        f.wait()
        if pid is not None:
            update_progress_artifact(pid, 100.0 * n / len(futures),
                                     description=f"{what}: {n}/{len(futures)}")
    return [f.result() for f in futures]


def _check_same_config(c: CurateConfig) -> None:
    """A rerun into a folder must be the same run (runner and output may differ)."""
    path = storage.join(c.output, "curate_config.json")
    d = c.to_dict()
    keep = {k: v for k, v in d.items() if k not in ("runner", "output", "report")}
    if storage.exists(path):
        old = storage.read_json(path)
        old_keep = {k: v for k, v in old.items()
                    if k not in ("runner", "output", "report", "code_version")}
        if json.loads(json.dumps(old_keep)) != json.loads(json.dumps(keep)):
            diff = sorted(k for k in set(keep) | set(old_keep) if old_keep.get(k) != keep.get(k))
            raise ConfigError(f"{c.output} holds a run with another config (differs in "
                              f"{', '.join(diff)}); use a new output folder or delete it",
                              source="curate")
        return
    storage.write_json(path, {**d, "code_version": manifest.code_version()})


@flow(name="curate-run", log_prints=True)
def curate_run(cfg: dict) -> dict:
    """Every step of one curation run (the task runner is set by the caller)."""
    c = CurateConfig.from_dict(cfg)
    cfg = c.to_dict()
    log = get_run_logger()
    r = RunPaths(c.output)
    t0 = time.perf_counter()
    storage.makedirs(c.output)
    _check_same_config(c)
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
        dl = t_download.map(unmapped(cfg), list(range(n_parts)))
        em = t_embed.map(unmapped(cfg), list(range(n_parts)), dl)
        dl_infos = _collect(dl, "curate-download", "downloaded shards")
        timings["download"] = time.perf_counter() - s
        em_infos = _collect(em, "curate-embed", "embedded shards")
        timings["embed"] = time.perf_counter() - s - timings["download"]
        source_dir = r.embeddings
        extra = [r.input_rejects] + [r.dl_rejects(i) for i in range(n_parts)] \
            + [r.emb_rejects(i) for i in range(n_parts)]
        funnel_head = {"input": split["rows"],
                       "has_url": split["rows"] - split["missing_url"],
                       "downloaded": sum(d["images"] for d in dl_infos),
                       "embedded": sum(e["embedded"] for e in em_infos)}
    else:
        source_dir = c.source.path

    s = time.perf_counter()
    p = t_plan.submit(cfg, source_dir).result()
    _collect(t_validate.map(unmapped(cfg), unmapped(source_dir), list(range(p["shards"]))))
    t_train.submit(cfg, source_dir).result()
    _collect(t_assign.map(unmapped(cfg), unmapped(source_dir), list(range(p["shards"]))),
             "curate-assign", "assigned shards")
    _collect(t_dedup.map(unmapped(cfg), unmapped(source_dir), list(range(p["buckets"]))),
             "curate-dedup", "deduplicated buckets")
    stats = t_finish.submit(cfg, source_dir, extra).result()
    timings["select"] = time.perf_counter() - s

    images_info = None
    if c.coreset_images != "none":
        s = time.perf_counter()
        parts = 0
        if c.coreset_images == "download":
            parts = t_coreset_split.submit(cfg).result()["parts"]
            _collect(t_coreset_download.map(unmapped(cfg), list(range(parts))),
                     "curate-coreset-download", "coreset parts downloaded")
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
           output: str | None = None, dask_address: str | None = None) -> dict:
    """Load a curate config (YAML path + `key=value` overrides) and run it on the
    configured task runner. This is the flow that `warren curate` runs and that the
    deployments serve."""
    c = load_config(config, overrides, output=output, dask_address=dask_address)
    run = curate_run.with_options(task_runner=runners.make(c.runner))
    return run(c.to_dict())


def run_local(cfg: CurateConfig | dict) -> dict:
    """Run a config in this process (tests, the demo): `curate_run` on its runner."""
    c = cfg if isinstance(cfg, CurateConfig) else CurateConfig.from_dict(cfg)
    return curate_run.with_options(task_runner=runners.make(c.runner))(c.to_dict())


def summarize(summary: dict) -> str:
    f = summary["funnel"]
    return " -> ".join(f"{k} {v:,}" for k, v in f.items())

