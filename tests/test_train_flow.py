"""The Prefect flow `train` against a real `prefect server start`: both stages train and
export, a second call skips them, the flow runs as a served deployment (as docs/train.md
says), and `warren generate` answers from the run (with and without int8 quantisation)
in a fresh process, as a user would call it."""
from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import stop_group

import mllm_fixtures as fx
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, "configs", "train", "tiny.yaml")
BIN = os.path.dirname(sys.executable)
STEPS = {1: 3, 2: 4}
OVERRIDES = {"stage1.max_steps": STEPS[1], "stage2.max_steps": STEPS[2],
             "stage1.save_every": 2, "stage2.save_every": 2}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _flow_runs(name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def read():
        async with get_client() as c:
            return await c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
    return asyncio.run(read())


@pytest.fixture(scope="module")
def flow_run(prefect_api, tmp_path_factory):
    """(output folder, first result, second result, mtimes before the second call,
    manifest)."""
    from flows.train import train
    manifest = fx.make_dataset(str(tmp_path_factory.mktemp("flow-data")), n_stage1=8, n_image=6,
                               n_text=2)
    out = str(tmp_path_factory.mktemp("flow-run"))
    with fx.single_thread():
        first = train(manifest_path=manifest, config_path=TINY_YAML, output_dir=out,
                      overrides=OVERRIDES)
        files = {p: os.stat(p).st_mtime_ns for p in _outputs(out)}
        again = train(manifest_path=manifest, config_path=TINY_YAML, output_dir=out,
                      overrides=OVERRIDES)
    return out, first, again, files, manifest


def _outputs(out: str) -> list[str]:
    return [os.path.join(root, f) for root, _, names in os.walk(out) for f in names]


def test_flow_trains_both_stages_and_exports(flow_run):
    from mllm import export
    out, first, *_ = flow_run
    assert sorted(first) == ["stage1", "stage2"]
    for n in (1, 2):
        s = first[f"stage{n}"]
        assert s["stage"] == n and s["steps"] == STEPS[n] and s["resumed_from"] is None
        assert s["last_checkpoint"] == STEPS[n]
        assert math.isfinite(s["first_loss"]) and math.isfinite(s["final_loss"])
        assert s["final"] == os.path.join(out, f"stage{n}", "final")
        with open(s["metrics"], encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        assert [r["step"] for r in rows] == list(range(1, STEPS[n] + 1))
        assert rows[-1]["loss"] == s["final_loss"]
        # checkpoints every 2 steps and at the end; keep_last 2
        want = sorted({f"step-{k:08d}" for k in (*range(2, STEPS[n] + 1, 2), STEPS[n])})[-2:]
        assert sorted(os.listdir(os.path.join(out, f"stage{n}", "checkpoints"))) == want
    loaded = export.load(first["stage2"]["final"])
    assert loaded.template.name == "bunny"
    assert loaded.meta["image_token_id"] == loaded.model.image_token_id
    # stage 2 started from stage 1's export: its frozen vision tower is the same
    s1 = export.load(first["stage1"]["final"]).model.vision.state_dict()
    for k, v in loaded.model.vision.state_dict().items():
        assert v.equal(s1[k]), k


def test_second_flow_call_skips_finished_stages(flow_run):
    out, first, again, files, _ = flow_run
    assert again == json.loads(json.dumps(first))  # the saved summaries, not a retrain
    assert {p: os.stat(p).st_mtime_ns for p in _outputs(out)} == files


def test_flow_runs_are_recorded_by_the_server(flow_run):
    runs = _flow_runs("train")
    assert len(runs) >= 2 and all(r.state.is_completed() for r in runs)


def test_served_deployment_runs_the_stages_it_is_given(flow_run, prefect_api, tmp_path):
    manifest = flow_run[-1]
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-c", "from flows.train import train; "
                               "train.serve(name='train')"], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "run"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([os.path.join(BIN, "prefect"), "deployment", "inspect", "train/train"],
                             env=env, capture_output=True).returncode:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "deployment never appeared"
            time.sleep(1)
        params = {"manifest_path": manifest, "config_path": "configs/train/tiny.yaml",
                  "output_dir": out, "stages": "[1]", "overrides": '{"stage1.max_steps": 2}'}
        r = subprocess.run([os.path.join(BIN, "prefect"), "deployment", "run", "train/train",
                            "--watch", *(a for k, v in params.items() for a in ("--param", f"{k}={v}"))],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "Completed" in r.stdout + r.stderr
    finally:
        stop_group(server, grace=30)
        log.close()
    assert sorted(os.listdir(out)) == ["stage1"]
    with open(out / "stage1" / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["steps"] == 2


@pytest.mark.parametrize("quantize", ["none", "int8-dynamic"])
def test_warren_generate_answers_from_the_run(flow_run, quantize, tmp_path):
    from PIL import Image
    out, first, *_ = flow_run
    image = str(tmp_path / "red.png")
    Image.new("RGB", (40, 32), fx.COLORS["red"]).save(image)
    r = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--checkpoint", out,
                        "--image", image, "--prompt", "What color is the shape?",
                        "--max-new-tokens", "6", "--quantize", quantize],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    # the same greedy answer as the library call on the stage-2 export
    from mllm import generate, quantize as quant
    want = generate.answer(quant.load(first["stage2"]["final"], quantize), image,
                           "What color is the shape?", max_new_tokens=6)
    assert r.stdout == want + "\n" and want  # a tiny model's words, but words
