"""Prefect flow `train`: stage 1 (projector) then stage 2 (LoRA) on a manifest.

The flow only wires mllm.train: one task per stage, run in order (stage 2 starts from
stage 1's exported model). A stage whose `final/` model and `summary.json` exist is
skipped; an interrupted stage resumes from its latest checkpoint. So a retried flow run
continues where it stopped.

Curation -> stage-1 table -> mix -> manifest -> train -> eval is one deployment already:
the `pipeline` flow (flows/pipeline.py) runs this flow as one of its parts, from one
config file (configs/pipeline/*.yaml), served by `warren serve`:

    prefect deployment run 'pipeline/demo' --watch

Or serve this flow alone: `python -c "from flows.train import train; train.serve(name='train')"`
then `prefect deployment run 'train/train' --param manifest_path=... --param config_path=...`.
Tasks return summaries (small dicts of numbers and paths), never models.
"""
from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NONE


@task(name="train-stage", cache_policy=NONE)
def train_stage(config_path: str, manifest_path: str, output_dir: str, stage: int,
                overrides: dict | None = None) -> dict:
    from mllm import config as config_mod
    from mllm import train as trainer
    done = trainer.completed(output_dir, stage)
    if done is not None:
        return done
    cfg = config_mod.load(config_path, overrides)
    return trainer.train(cfg, manifest_path, output_dir, stage=stage, resume=True, progress=False)


@flow(name="train")
def train(manifest_path: str, config_path: str, output_dir: str | None = None,
          stages: list[int] = (1, 2), overrides: dict | None = None) -> dict:
    """Train the listed stages in order; returns {"stage1": summary, "stage2": summary}.
    `overrides` are dotted config keys (e.g. {"stage1.max_steps": 10})."""
    from mllm import config as config_mod
    out = output_dir or config_mod.load(config_path, overrides).run.output_dir
    return {f"stage{n}": train_stage(config_path, manifest_path, out, int(n), overrides)
            for n in sorted(stages)}
