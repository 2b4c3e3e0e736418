"""The `eval` and `pipeline` flows against a real `prefect server start`: eval writes
results.json, scores.parquet, the lineage and its artifacts; the pipeline deployment
(served by `warren serve`, run with `prefect deployment run 'pipeline/demo' --watch`)
goes from the demo pool's shards to scores, and a second run skips every part."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import polars as pl
import pytest
import yaml
from conftest import stop_group

import engine_fixtures as ef
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as c:
            return await c.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in asyncio.run(read())}


def test_prefect_yaml_lists_the_pipeline_and_eval_deployments():
    from flows import pipeline
    with open(os.path.join(REPO, "prefect.yaml")) as f:
        deps = yaml.safe_load(f)["deployments"]
    mine = {d["entrypoint"]: d for d in deps if not d["entrypoint"].startswith("flows/curate.py")}
    assert set(mine) == {"flows/pipeline.py:pipeline", "flows/eval.py:eval_flow"}
    configs = sorted(os.path.join("configs", "pipeline", f)
                     for f in os.listdir(os.path.join(REPO, "configs", "pipeline")))
    assert configs and [d["parameters"]["config"] for d in deps
                        if d["entrypoint"] == "flows/pipeline.py:pipeline"] == configs
    for c in configs:                         # each loads and checks as the flow would
        cfg = pipeline.load_config(os.path.join(REPO, c))
        assert cfg.eval.benchmarks and cfg.train.config
    names = sorted(d.name for d in pipeline.deployments())
    assert names == sorted(os.path.splitext(os.path.basename(c))[0].replace("_", "-") for c in configs)


def test_bad_pipeline_config_is_one_error_naming_every_problem(tmp_path):
    from flows import pipeline
    from pipelines.errors import ConfigError
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "output": "x", "source": {"demo_pool": {"n": 10}, "path": "y"}, "curate": {"config": "nope.yaml"},
        "mix": {}, "train": {"config": "configs/train/tiny.yaml", "set": {"stage1.max_stepz": 1}},
        "eval": {"benchmarks": [], "demo_bench": {}}, "extra": 1}))
    with pytest.raises(ConfigError) as e:
        pipeline.load_config(str(bad))
    msg = str(e.value)
    for part in ("extra: unknown key", "source: give exactly one of demo_pool or path",
                 "curate.config: nope.yaml not found", "mix: give exactly one of recipe or synthetic",
                 "stage1.max_stepz", "eval.benchmarks: name at least one"):
        assert part in msg, part


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_eval_flow_writes_outputs_lineage_and_artifacts(prefect_api, tmp_path):
    from flows.eval import eval_flow
    from mllm import lineage
    model = ef.write_model(str(tmp_path / "model"))
    data = ef.write_benchmark(str(tmp_path / "data"), n=10)
    out = tmp_path / "eval"
    with ef.registered():
        state = eval_flow(model=model, benchmarks=ef.NAME, data=data, output=str(out),
                          batch_size=4, workers=1, return_state=True)
    assert state.is_completed()
    res = state.result()
    r = res["benchmarks"][ef.NAME]
    assert r["n"] == 10 and r["asked"] == 10
    assert json.load(open(out / "results.json"))["benchmarks"][ef.NAME]["scores"] == r["scores"]
    assert len(open(out / ef.NAME / "answers.jsonl").read().splitlines()) == 10
    table = pl.read_parquet(out / "scores.parquet")
    assert sorted(table["key"]) == ["accuracy", "overlap"] and set(table["n"]) == {10}
    assert lineage.read(model)["eval"][ef.NAME]["scores"] == r["scores"]
    arts = _artifacts(state.state_details.flow_run_id)
    assert {"eval-scores", "eval-summary"} <= set(arts)
    rows = json.loads(arts["eval-scores"].data) if isinstance(arts["eval-scores"].data, str) \
        else arts["eval-scores"].data
    assert sorted((x["key"], x["value"]) for x in rows) == sorted(zip(table["key"], table["value"]))
    assert f"| {ef.NAME} | overlap |" in arts["eval-summary"].data


SMALL = ["source.demo_pool.n=300", "eval.demo_bench.images=6", "eval.workers=1",
         'train.set={"stage1.max_steps": 3, "stage2.max_steps": 3, "stage1.save_every": 3, '
         '"stage2.save_every": 3}']


@pytest.fixture(scope="module")
def served_pipeline(prefect_api, tmp_path_factory):
    """`warren serve`, then `prefect deployment run 'pipeline/demo' --watch` on a small
    demo pool: (output folder, CLI output)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    log = open(tmp / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve"], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp / "run"
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([os.path.join(BIN, "prefect"), "deployment", "inspect", "pipeline/demo"],
                             env=env, capture_output=True).returncode:
            assert server.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "deployment never appeared"
            time.sleep(1)
        r = subprocess.run([os.path.join(BIN, "prefect"), "deployment", "run", "pipeline/demo",
                            "--param", f"output={out}", "--param", f"overrides={json.dumps(SMALL)}",
                            "--watch", "--watch-timeout", "1200"],
                           env=env, capture_output=True, text=True, timeout=1300)
    finally:
        stop_group(server, grace=30)
        log.close()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + (tmp / "serve.log").read_text()[-5000:]
    assert "Completed" in r.stdout + r.stderr
    return out


@pytest.mark.slow
def test_pipeline_deployment_goes_from_shards_to_scores(served_pipeline):
    import pyarrow.parquet as pq

    from mllm import lineage
    from mllm.eval import run
    from pipelines import manifest, storage
    out = served_pipeline
    rec = json.load(open(out / "pipeline.json"))
    assert rec["order"] == ["source", "curate", "stage1", "mix", "manifest", "train", "eval"]
    assert set(rec["parts"]) == set(rec["order"])
    assert not any(p.get("skipped") for p in rec["parts"].values())
    # one chain of hashes from the shards to the scores
    cur = rec["parts"]["curate"]
    assert cur["coreset_sha256"] == storage.sha256(str(out / "curate" / "coreset.parquet"))
    assert cur["funnel"]["input"] == 300
    man = manifest.load(str(out / "manifest.json"))             # verifies every table's sha256
    assert {n: e["sha256"] for n, e in man.doc["tables"].items()} == \
        {n: e["sha256"] for n, e in rec["parts"]["manifest"]["tables"].items()}
    coreset = pq.read_table(out / "curate" / "coreset.parquet").column("uid").to_pylist()
    assert sorted(pq.read_table(man.table_path("stage1")).column("id").to_pylist()) == sorted(coreset)
    model = rec["model"]
    assert model == str(out / "train" / "stage2" / "final")
    for n in ("stage1", "stage2"):
        assert rec["parts"]["train"][n]["steps"] == 3
    # eval: both benchmarks, every question of the drawn benchmark, in question-file order
    ev = rec["parts"]["eval"]["benchmarks"]
    assert set(ev) == {"pope", "gqa"}
    import mllm.eval.benchmarks  # noqa: F401
    from mllm.eval.types import REGISTRY
    for b in ("pope", "gqa"):
        qs = list(REGISTRY[b]().questions(str(out / "bench" / b)))
        lines = run.read_answers(str(out / "eval" / b / "answers.jsonl"))
        assert [x["question_id"] for x in lines] == [q.question_id for q in qs]
        assert ev[b]["n"] == len(qs) > 0
    table = pl.read_parquet(out / "eval" / "scores.parquet")
    assert set(table["benchmark"]) == {"pope", "gqa"}
    # the model card says where the model came from and how it scored
    doc = lineage.read(model)
    assert set(doc["eval"]) == {"pope", "gqa"}
    assert doc["data"]["pipeline"]["record"] == str(out / "pipeline.json")
    assert doc["data"]["pipeline"]["curation"]["coreset_sha256"] == cur["coreset_sha256"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_pipeline_rerun_skips_every_part(served_pipeline, monkeypatch):
    from flows.pipeline import pipeline
    out = served_pipeline
    watched = [out / "train" / "stage2" / "final" / "projector.safetensors",
               out / "eval" / "pope" / "answers.jsonl", out / "curate" / "coreset.parquet"]
    before = {p: os.stat(p).st_mtime_ns for p in watched}
    monkeypatch.chdir(REPO)
    rec = pipeline("configs/pipeline/demo.yaml", SMALL, str(out))
    assert all(p["skipped"] for name, p in rec["parts"].items() if name != "manifest")
    assert {p: os.stat(p).st_mtime_ns for p in watched} == before
