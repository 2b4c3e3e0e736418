"""Prefect flows for the instruction mix: `mix` (recipe -> mix.parquet) and `stage1`
(coreset -> stage-1 caption table).

The flow only wires pipelines.mix steps: one task lists the image root, one `prepare`
task per source (submitted together; each writes its own files under `_work/` and a
completion marker, so a rerun skips finished sources), then `assemble` and the optional
LLaVA export. Tasks return small dicts and paths, never records.

Run it: `warren mix --recipe FILE --output DIR --prefect`, or from Python
`from flows.mix import mix; mix(recipe_path=..., output=...)`.
"""
from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NONE

from pipelines.mix import build, export, recipe as recipes, stage1 as stage1_step


@task(name="mix-image-index", cache_policy=NONE)
def image_index(r: recipes.Recipe):
    return build.image_index(r)


@task(name="mix-prepare", cache_policy=NONE)
def prepare(r: recipes.Recipe, source: recipes.Source, output: str, images) -> dict:
    return build.prepare(r, source, output, images=images)


@task(name="mix-assemble", cache_policy=NONE)
def assemble(r: recipes.Recipe, output: str, prepared: dict[str, dict]) -> dict:
    return build.assemble(r, output, prepared)


@task(name="mix-export-llava", cache_policy=NONE)
def export_llava(mix_path: str, out_path: str) -> int:
    return export.to_llava(mix_path, out_path)


@flow(name="mix")
def mix(recipe_path: str, output: str, data_root: str | None = None, image_root: str | None = None,
        export_llava_path: str | None = None) -> dict:
    """Build the mix a recipe file describes into `output`; returns the stats."""
    r = recipes.load(recipe_path, data_root=data_root, image_root=image_root)
    images = image_index(r)
    futures = {s.name: prepare.submit(r, s, output, images) for s in r.sources}
    prepared = {name: f.result() for name, f in futures.items()}
    stats = assemble(r, output, prepared)
    if export_llava_path:
        stats["exported"] = export_llava(f"{output.rstrip('/')}/mix.parquet", export_llava_path)
    return stats


@flow(name="stage1")
def stage1(coreset_path: str, output: str, prompt: str | None = None, seed: int = 0,
           manifest_path: str | None = None) -> dict:
    """A curation coreset as the stage-1 caption table (see pipelines.mix.stage1)."""
    cfg = stage1_step.Stage1Config(prompt=prompt, seed=seed, manifest=manifest_path)
    return task(stage1_step.run, name="stage1-table", cache_policy=NONE)(cfg, coreset_path, output)
