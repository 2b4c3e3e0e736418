"""Many shards: the selection's stages mapped over a real Dask LocalCluster (4 worker
processes) write the same bytes as a local run, and per-shard tasks touch only their
own shard's files (the plan holds the shard list: O(files) once, not per task)."""
import os

import pytest

from pipelines import select, storage
from pipelines.synth import embeddings as synth


def in_worker(stage, *args):
    """Run a stage in a worker; report which process ran it."""
    return stage(*args), os.getpid()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    synth.generate(synth.SynthConfig(n=6000, dim=32, shards=12, avg_cluster=600, seed=2),
                   str(root / "src"), progress=False)
    return str(root / "src")


CFG = dict(k=8, buckets=6, target=900, dedup_scope="global")


def test_four_dask_workers_write_the_local_bytes(src, tmp_path):
    from distributed import Client, LocalCluster

    cfg = select.SelectConfig(**CFG)
    local = str(tmp_path / "local")
    select.run(cfg, src, local, progress=False)
    out = str(tmp_path / "dask")
    p = select.plan(cfg, src, out)
    with LocalCluster(n_workers=4, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        def mapped(stage, units):
            futures = [client.submit(in_worker, stage, cfg, src, out, u, pure=False) for u in units]
            return [f.result() for f in futures]
        pids = {pid for _, pid in mapped(select.stage_validate, range(p["shards"]))}
        client.submit(in_worker, select.stage_train, cfg, src, out, pure=False).result()
        pids |= {pid for _, pid in mapped(select.stage_assign, range(p["shards"]))}
        pids |= {pid for _, pid in mapped(select.stage_dedup, range(p["buckets"]))}
        workers = set(client.run(os.getpid).values())
        client.submit(in_worker, select.stage_finish, cfg, src, out, pure=False).result()
    assert len(workers) == 4 and pids <= workers and len(pids) >= 2 and os.getpid() not in pids
    for f in ("coreset.parquet", "rejects.parquet", "centroids.npy"):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(local, f), "rb").read(), f
    # the shuffle: one file per shard, whatever the bucket count
    assert len(os.listdir(os.path.join(out, "_work", "assign"))) == p["shards"] == 12


def test_a_shard_task_opens_only_its_own_shard(src, tmp_path, monkeypatch):
    cfg = select.SelectConfig(k=8, buckets=6)
    out = str(tmp_path / "out")
    p = select.plan(cfg, src, out)
    for s in range(p["shards"]):
        select.stage_validate(cfg, src, out, s)
    select.stage_train(cfg, src, out)
    opened = []
    real = storage.filesystem
    monkeypatch.setattr(storage, "filesystem", lambda path: (opened.append(str(path)), real(path))[1])
    select.stage_validate(cfg, src, out, 5)      # done: reads its marker only
    os.remove(os.path.join(out, "_work", "_completions", "validate-00005.json"))
    opened.clear()
    select.stage_validate(cfg, src, out, 5)
    select.stage_assign(cfg, src, out, 5)
    inputs = {os.path.basename(f) for f in opened if f.startswith(src)}
    assert inputs == {"img_emb_0005.npy", "text_emb_0005.npy", "metadata_0005.parquet"}
