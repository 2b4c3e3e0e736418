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
