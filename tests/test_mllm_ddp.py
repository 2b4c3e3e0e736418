"""DDP on CPU: `torchrun --nproc_per_node 2` (gloo) takes the same optimizer steps as
one process accumulating the same global batch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import mllm_fixtures as fx
from mllm import presets, train
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"stage2.max_steps": 4, "stage2.save_every": 2, "stage2.micro_batch_size": 4,
            "stage2.global_batch_size": 8, "lora.dropout": 0.0}


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun not installed next to this Python")
def test_two_processes_match_one_process_with_accumulation(tmp_path, tmp_path_factory):
    manifest_path, stage1_out = fx.cached_stage1(tmp_path_factory)
    runs = {}
    for name in ("single", "ddp"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        os.symlink(os.path.join(stage1_out, "stage1"), runs[name] / "stage1")

    train.train(presets.tiny(SETTINGS), manifest_path, str(runs["single"]), stage=2, progress=False)

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mllm.train",
           "--manifest", manifest_path, "--config", os.path.join(ROOT, "configs", "train", "tiny.yaml"),
           "--output", str(runs["ddp"]), "--stage", "2", "--no-progress", "--device", "cpu"] + \
        [f"--set={k}={v}" for k, v in SETTINGS.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    def rows(run):
        with open(run / "stage2" / "metrics.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    single, ddp = rows(runs["single"]), rows(runs["ddp"])
    with open(runs["ddp"] / "stage2" / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["world_size"] == 2 and summary["accum"] == 1
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]
    # identical samples per step -> identical token counts; losses equal up to reduction order
    assert [r["tokens"] for r in ddp] == [r["tokens"] for r in single]
    for a, b in zip(single, ddp):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    # both ranks wrote their RNG state into the checkpoint
    ck = runs["ddp"] / "stage2" / "checkpoints" / "step-00000004"
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= set(os.listdir(ck))
