"""Deployments against a real `prefect server start`: `warren serve`, then
`prefect deployment run 'curate/<name>' --param ... --watch`, then the outputs."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import stop_group
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)


def test_prefect_yaml_deployments_point_at_real_things():
    with open(os.path.join(REPO, "prefect.yaml")) as f:
        doc = yaml.safe_load(f)
    deps = [d for d in doc["deployments"] if d["entrypoint"].startswith("flows/curate.py")]
    assert len(deps) >= 3
    configs = {os.path.join("configs", "curate", f)
               for f in os.listdir(os.path.join(REPO, "configs", "curate"))}
    for d in deps:
        path, fn = d["entrypoint"].split(":")
        assert fn == "curate" and os.path.exists(os.path.join(REPO, path))
        assert d["parameters"]["config"] in configs
    assert {d["parameters"]["config"] for d in deps} == configs


@pytest.mark.slow
def test_serve_then_deployment_run_watch(curate_small, demo_pool, prefect_api, tmp_path):
    ref, _ = curate_small
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    with open(os.path.join(REPO, "configs", "curate", "demo.yaml")) as f:
        d = yaml.safe_load(f)
    d["source"].update(path=demo_pool[2], shard_rows=60, coreset_shard_rows=100)
    d["select"].update(k=4, buckets=4)
    d["embed"]["batch_size"] = 32
    (cfg_dir / "small_pool.yaml").write_text("# warren serve --configs DIR\n" + yaml.safe_dump(d))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--configs", str(cfg_dir)],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            r = subprocess.run([os.path.join(BIN, "prefect"), "deployment", "inspect",
                                "curate/small-pool"], env=env, capture_output=True, text=True)
            if r.returncode == 0:
                break
            assert server.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
            assert time.monotonic() < deadline, "deployment never appeared"
            time.sleep(1)
        out = str(tmp_path / "run")
        r = subprocess.run([os.path.join(BIN, "prefect"), "deployment", "run", "curate/small-pool",
                            "--param", f"output={out}", "--watch", "--watch-timeout", "400"],
                           env=env, capture_output=True, text=True, timeout=450)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "Completed" in r.stdout + r.stderr
    finally:
        stop_group(server, grace=30)
    served = open(tmp_path / "serve.log").read()
    assert "HTTP Request:" not in served and "Traceback" not in served, served[-3000:]
    for t in ("coreset.parquet", "rejects.parquet", "images/coreset_images.parquet"):
        assert pq.read_table(f"{out}/{t}").equals(pq.read_table(f"{ref}/{t}")), t
    assert os.path.exists(f"{out}/report.html")
