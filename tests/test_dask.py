"""The same coreset on a real Dask LocalCluster (2 worker processes) as on local threads."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from conftest import small_curate_config


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_coreset(curate_small, demo_pool, prefect_api, tmp_path):
    from distributed import Client, LocalCluster

    from flows import curate

    ref, _ = curate_small
    out = str(tmp_path / "run")
    # workers inherit PREFECT_API_URL from os.environ (set by the prefect_api fixture)
    assert os.environ["PREFECT_API_URL"] == prefect_api
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        cfg = small_curate_config(demo_pool[2], out,
                                  f"runner.dask_address={cluster.scheduler_address}")
        summary = curate.run_local(cfg)
        # the mapped steps really ran in the worker processes
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids
        embedded_by = {json.load(open(f"{out}/_work/embed/_completions/embed-{i:05d}.json"))["pid"]
                       for i in range(3)}
        assert embedded_by <= pids
    assert summary["funnel"]["sample"] > 0
    for t in ("coreset.parquet", "rejects.parquet", "images/coreset_images.parquet"):
        assert pq.read_table(f"{out}/{t}").equals(pq.read_table(f"{ref}/{t}")), t
    for i in range(3):
        e = f"embeddings/emb_{i:05d}.parquet"
        assert pq.read_table(f"{out}/{e}").equals(pq.read_table(f"{ref}/{e}")), e
