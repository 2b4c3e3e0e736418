"""Deployments of the curate flow: one per config file, served by this process.

    prefect server start --host 127.0.0.1            # terminal 1
    warren serve                                     # terminal 2 (PREFECT_API_URL set)
    prefect deployment run 'curate/single_machine' \\
        --param output=runs/x --param 'overrides=["select.target=1000"]' --watch

`prefect.yaml` describes the same deployments for a process work pool
(`prefect deploy --all`, then `prefect worker start --pool warren`).
"""
from __future__ import annotations

import os

from pipelines import storage
from pipelines.errors import InputError


def deployment_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0].replace("_", "-")


def deployments(config_dir: str) -> list:
    """RunnerDeployments of `flows.curate:curate`, one per YAML config in config_dir."""
    from flows.curate import curate, load_config

    files = [f for f in storage.listdir(config_dir, "*.yaml")]
    if not files:
        raise InputError("no *.yaml configs to serve", path=config_dir)
    out = []
    for f in files:
        path = os.path.abspath(f)
        with open(path) as fh:
            first = fh.readline().lstrip("# ").strip()
        load_config(path, ["source.path=placeholder"] if _needs_source(path) else [],
                    output="placeholder")  # a broken config fails here, not at run time
        out.append(curate.to_deployment(
            name=deployment_name(path), parameters={"config": path},
            description=f"{os.path.basename(path)}: {first}", tags=["warren", "curate"]))
    return out


def _needs_source(path: str) -> bool:
    import yaml
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    return not (d.get("source") or {}).get("path")


def serve(config_dir: str = "configs/curate", limit: int | None = None) -> None:
    """Serve until interrupted. Needs PREFECT_API_URL pointing at a running server.
    Also serves `eval/eval` and one `pipeline/<name>` per configs/pipeline/*.yaml."""
    from prefect import serve as prefect_serve

    from flows import eval as eval_flow
    from flows import pipeline

    prefect_serve(*deployments(config_dir), eval_flow.deployment(), *pipeline.deployments(),
                  limit=limit)
