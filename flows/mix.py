"""Prefect flows for the instruction mix: `mix` (recipe -> mix.parquet) and `stage1`
(coreset -> stage-1 caption table).

The flow only wires pipelines.mix steps: one `prepare` task per source (submitted
together; each writes its own files under `_work/` and a completion marker keyed by
its inputs, so a rerun skips the sources whose inputs did not change), then `assemble`
and the optional LLaVA export. The image root is listed and fingerprinted at most once
per run and shared by the prepare tasks (they run in threads). Tasks return small dicts
and paths, never records.

Run it: `warren mix --recipe FILE --output DIR --prefect`, or from Python
`from flows.mix import mix; mix(recipe_path=..., output=...)`.
"""
from __future__ import annotations

import logging

from prefect import flow, task
from prefect.cache_policies import NONE

from pipelines import storage
from pipelines.mix import build, export, recipe as recipes, stage1 as stage1_step

# Loggers that write one line per HTTP request to the Prefect API (httpx at INFO) or
# per request served by the temporary server (uvicorn's access log).
HTTP_LOGGERS = ("httpx", "httpcore", "uvicorn.access", "uvicorn.error", "prefect.server")


def quiet_http_logs(verbose: bool = False) -> None:
    """Keep Prefect's HTTP traffic off the console unless `verbose` (`warren -v`)."""
    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


@task(name="mix-prepare", cache_policy=NONE)
def prepare(r: recipes.Recipe, source: recipes.Source, output: str, images) -> dict:
    return build.prepare(r, source, output, images=images)


@task(name="mix-assemble", cache_policy=NONE)
def assemble(r: recipes.Recipe, output: str, prepared: dict[str, dict], inputs: dict,
             image_stats: dict | None) -> dict:
    return build.assemble(r, output, prepared, inputs=inputs, image_stats=image_stats)


@task(name="mix-export-llava", cache_policy=NONE)
def export_llava(mix_path: str, out_path: str) -> int:
    return export.to_llava(mix_path, out_path)


@flow(name="mix")
def mix(recipe_path: str, output: str, data_root: str | None = None, image_root: str | None = None,
        export_llava_path: str | None = None, restart: bool = False) -> dict:
    """Build the mix a recipe file describes into `output`; returns the stats."""
    r = recipes.load(recipe_path, data_root=data_root, image_root=image_root)
    build.check_paths(r, output, export_llava_path)
    with build.writing_to(output):
        storage.makedirs(output)
    if restart:
        build.restart(output)
    images = build.Images(r)                   # listed once, shared by the prepare tasks
    try:
        futures = {s.name: prepare.submit(r, s, output, images) for s in r.sources}
        prepared = {name: f.result() for name, f in futures.items()}
    finally:
        images.close()
    inputs = build.inputs_summary(r, images)
    image_stats = images.stats()
    stats = assemble(r, output, prepared, inputs, image_stats)
    if export_llava_path:
        stats["exported"] = export_llava(f"{output.rstrip('/')}/mix.parquet", export_llava_path)
    return stats


@flow(name="stage1")
def stage1(coreset_path: str, output: str, prompt: str | None = None, seed: int = 0,
           manifest_path: str | None = None) -> dict:
    """A curation coreset as the stage-1 caption table (see pipelines.mix.stage1)."""
    cfg = stage1_step.Stage1Config(prompt=prompt, seed=seed, manifest=manifest_path)
    return task(stage1_step.run, name="stage1-table", cache_policy=NONE)(cfg, coreset_path, output)
