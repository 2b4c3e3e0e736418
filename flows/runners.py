"""Which Prefect task runner the curation flow maps its steps on.

- local (default): a thread pool in the flow's process. Download tasks wait on their
  img2dataset subprocess, embed tasks on torch (which releases the GIL) and on the
  decoding processes, so threads are enough on one machine.
- dask: prefect-dask's DaskTaskRunner on an existing cluster (`tcp://host:8786`, from
  the config's `runner.dask_address` or `--dask-address`), or, with `runner.kind: dask`
  and no address, a LocalCluster of `dask_workers` processes started for the run.

Every step is a deterministic function of its inputs and writes by unit (shard or
bucket), so the coreset is the same on either runner and any worker count. Workers
must reach the flow's Prefect API (PREFECT_API_URL) and the run folder (a shared file
system or an fsspec URL).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal

from pipelines.errors import ConfigError, MissingDependencyError


@dataclass(frozen=True)
class RunnerConfig:
    kind: Literal["local", "dask"] = "local"
    dask_address: str | None = None      # tcp://scheduler:8786; implies kind dask
    max_workers: int | None = None       # local: threads (None: max(4, CPUs))
    dask_workers: int = 2                # dask without an address: LocalCluster processes
    dask_threads_per_worker: int = 1

    def __post_init__(self):
        p = []
        if self.kind not in ("local", "dask"):
            p.append(f"runner.kind must be local or dask (got {self.kind!r})")
        if self.max_workers is not None and self.max_workers < 1:
            p.append("runner.max_workers must be >= 1")
        if self.dask_workers < 1 or self.dask_threads_per_worker < 1:
            p.append("runner.dask_workers and dask_threads_per_worker must be >= 1")
        if self.dask_address is not None and "://" not in self.dask_address:
            p.append(f"runner.dask_address must look like tcp://host:port (got {self.dask_address!r})")
        if p:
            raise ConfigError(p, source="runner config")

    @property
    def uses_dask(self) -> bool:
        return self.kind == "dask" or self.dask_address is not None

    def to_dict(self) -> dict:
        return asdict(self)


def make(cfg: RunnerConfig):
    """A fresh Prefect task runner for `cfg` (a runner is entered once per flow run)."""
    if cfg.uses_dask:
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise MissingDependencyError("prefect-dask", "running on a Dask cluster") from None
        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": cfg.dask_workers,
                                              "threads_per_worker": cfg.dask_threads_per_worker,
                                              "processes": True, "host": "127.0.0.1",
                                              "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner
    # Prefect's default is unbounded: 20,000 shards would start 20,000 img2dataset
    # processes at once. Tasks are submitted in stage order and run first-in first-out,
    # so an embed task never holds a thread its own download is waiting for.
    return ThreadPoolTaskRunner(max_workers=local_threads(cfg))


def local_threads(cfg: RunnerConfig) -> int:
    return cfg.max_workers or max(4, os.cpu_count() or 1)


def describe(cfg: RunnerConfig) -> str:
    if cfg.dask_address:
        return f"dask at {cfg.dask_address}"
    if cfg.uses_dask:
        return f"dask LocalCluster ({cfg.dask_workers} worker processes)"
    return f"local threads ({local_threads(cfg)})"
