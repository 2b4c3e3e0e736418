"""Kill a training process (SIGKILL) mid-run, resume it, and get the same losses as a
run that was never interrupted (CPU, within 1e-6)."""
from __future__ import annotations

import json
import os
import multiprocessing
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from mllm import presets, train
from mllm_fixtures import cached_stage1
from pipelines.errors import InputError
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "train", "tiny.yaml")
STEPS, SAVE_EVERY, KILL_AFTER = 60, 10, 15
SETTINGS = {"stage2.max_steps": STEPS, "stage2.save_every": SAVE_EVERY}


def _warren(args):
    from flows.cli import main
    os._exit(main(args))


def metric_rows(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def stage2_dir(tmp_path, name, stage1_out):
    run = tmp_path / name
    run.mkdir()
    os.symlink(os.path.join(stage1_out, "stage1"), run / "stage1")
    return str(run)


def test_resume_after_sigkill_repeats_the_uninterrupted_losses(tmp_path, tmp_path_factory):
    manifest_path, stage1_out = cached_stage1(tmp_path_factory)

    # The reference: one uninterrupted run (stage 2: LoRA dropout draws from the RNG).
    ref_dir = stage2_dir(tmp_path, "ref", stage1_out)
    train.train(presets.tiny(SETTINGS), manifest_path, ref_dir, stage=2, progress=False)
    reference = [r["loss"] for r in metric_rows(os.path.join(ref_dir, "stage2", "metrics.jsonl"))]
    assert len(reference) == STEPS

    run = stage2_dir(tmp_path, "killed", stage1_out)
    args = ["train", "--manifest", manifest_path, "--config", TINY_YAML, "--output", run,
            "--stage", "2", "--no-progress"] + [f"--set={k}={v}" for k, v in SETTINGS.items()]
    metrics = os.path.join(run, "stage2", "metrics.jsonl")
    # A forked child runs `warren train` (forking skips re-importing torch/transformers).
    proc = multiprocessing.get_context("fork").Process(target=_warren, args=(args,))
    proc.start()
    try:
        deadline = time.time() + 120
        while len(metric_rows(metrics)) < KILL_AFTER and proc.is_alive() and time.time() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    done_before_kill = len(metric_rows(metrics))
    assert KILL_AFTER <= done_before_kill < STEPS
    assert not os.path.exists(os.path.join(run, "stage2", "final"))

    from flows.cli import main
    assert main(args + ["--resume"]) == 0
    with open(os.path.join(run, "stage2", "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["resumed_from"] == (done_before_kill // SAVE_EVERY) * SAVE_EVERY
    losses = [r["loss"] for r in metric_rows(metrics)]
    assert [r["step"] for r in metric_rows(metrics)] == list(range(1, STEPS + 1))
    assert max(abs(a - b) for a, b in zip(losses, reference)) < 1e-6
    # and the trained weights are the same
    a = load_file(os.path.join(ref_dir, "stage2", "checkpoints", f"step-{STEPS:08d}", "trainable.safetensors"))
    b = load_file(os.path.join(run, "stage2", "checkpoints", f"step-{STEPS:08d}", "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_resume_refuses_changed_batch_settings(tmp_path, tmp_path_factory):
    manifest_path, stage1_out = cached_stage1(tmp_path_factory)
    run = stage2_dir(tmp_path, "run", stage1_out)
    train.train(presets.tiny({"stage2.max_steps": 2}), manifest_path, run, stage=2, progress=False)
    changed = presets.tiny({"stage2.max_steps": 4, "stage2.global_batch_size": 4})
    with pytest.raises(InputError, match="batch settings changed"):
        train.train(changed, manifest_path, run, stage=2, resume=True, progress=False)
