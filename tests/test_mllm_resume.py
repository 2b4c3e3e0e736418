"""Kill a training process (SIGKILL) mid-run, resume it, and get the same losses as a
run that was never interrupted (CPU, within 1e-6); a damaged latest checkpoint falls
back to the previous intact one with a warning line.

The kill lands at a fixed point (the child parks itself inside step KILL_AT, after the
backward pass, and waits to be killed), so the test does not depend on how fast this
machine is at the moment."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
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
STEPS, SAVE_EVERY, KILL_AT = 60, 10, 25
SETTINGS = {"stage2.max_steps": STEPS, "stage2.save_every": SAVE_EVERY}


def _warren_parked(args, marker, park_at):
    """`warren train` that parks inside step `park_at` (after its backward pass, before
    the optimizer step) until it is killed."""
    import torch.nn.utils as nn_utils
    real, calls = nn_utils.clip_grad_norm_, [0]

    def clip(*a, **kw):
        calls[0] += 1
        if calls[0] == park_at:
            open(marker, "w").close()
            while True:
                time.sleep(60)
        return real(*a, **kw)
    nn_utils.clip_grad_norm_ = clip
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


def _kill_parked(tmp_path, args):
    marker = str(tmp_path / "parked")
    proc = multiprocessing.get_context("fork").Process(target=_warren_parked,
                                                       args=(args, marker, KILL_AT))
    proc.start()
    try:
        deadline = time.monotonic() + 600
        while not os.path.exists(marker) and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(marker), "the training child never reached the kill point"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL


def _reference(tmp_path, stage1_out, manifest_path):
    ref_dir = stage2_dir(tmp_path, "ref", stage1_out)
    train.train(presets.tiny(SETTINGS), manifest_path, ref_dir, stage=2, progress=False)
    reference = [r["loss"] for r in metric_rows(os.path.join(ref_dir, "stage2", "metrics.jsonl"))]
    assert len(reference) == STEPS
    return ref_dir, reference


def _same_as_reference(run, ref_dir, reference):
    metrics = os.path.join(run, "stage2", "metrics.jsonl")
    losses = [r["loss"] for r in metric_rows(metrics)]
    assert [r["step"] for r in metric_rows(metrics)] == list(range(1, STEPS + 1))
    assert max(abs(a - b) for a, b in zip(losses, reference)) < 1e-6
    a = load_file(os.path.join(ref_dir, "stage2", "checkpoints", f"step-{STEPS:08d}", "trainable.safetensors"))
    b = load_file(os.path.join(run, "stage2", "checkpoints", f"step-{STEPS:08d}", "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_resume_after_sigkill_repeats_the_uninterrupted_losses(tmp_path, tmp_path_factory, capfd):
    manifest_path, stage1_out = cached_stage1(tmp_path_factory)
    # The reference: one uninterrupted run (stage 2: LoRA dropout draws from the RNG).
    ref_dir, reference = _reference(tmp_path, stage1_out, manifest_path)

    run = stage2_dir(tmp_path, "killed", stage1_out)
    args = ["train", "--manifest", manifest_path, "--config", TINY_YAML, "--output", run,
            "--stage", "2", "--no-progress"] + [f"--set={k}={v}" for k, v in SETTINGS.items()]
    metrics = os.path.join(run, "stage2", "metrics.jsonl")
    _kill_parked(tmp_path, args)
    assert len(metric_rows(metrics)) == KILL_AT - 1
    assert not os.path.exists(os.path.join(run, "stage2", "final"))
    steps = sorted(os.listdir(os.path.join(run, "stage2", "checkpoints")))
    assert steps == ["step-00000010", "step-00000020"]

    # A copy of the killed run whose newest checkpoint is damaged (a disk filled, a copy
    # was cut short): resume takes step 10, says so in one line, and still ends the same.
    damaged = str(tmp_path / "damaged")
    shutil.copytree(run, damaged, symlinks=True)
    weights = os.path.join(damaged, "stage2", "checkpoints", "step-00000020", "trainable.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)

    from flows.cli import main
    capfd.readouterr()
    assert main(args + ["--resume"]) == 0
    with open(os.path.join(run, "stage2", "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["resumed_from"] == 20
    _same_as_reference(run, ref_dir, reference)
    assert "damaged" not in capfd.readouterr().err

    dargs = [a if a != run else damaged for a in args]
    assert main(dargs + ["--resume"]) == 0
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and "Traceback" not in err
    assert "step-00000020 is damaged" in warnings[0] and "resuming from step-00000010" in warnings[0]
    assert "trainable.safetensors does not read" in warnings[0]
    # the progress line names the checkpoint actually read, not the damaged one
    resumed = [line for line in err.splitlines() if "resuming stage 2 from" in line]
    assert len(resumed) == 1 and resumed[0].endswith("step-00000010 (step 10)"), resumed
    with open(os.path.join(damaged, "stage2", "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["resumed_from"] == 10
    _same_as_reference(damaged, ref_dir, reference)


def test_no_intact_checkpoint_is_one_line(tmp_path, tmp_path_factory, capfd):
    """Every checkpoint damaged: exit 2, one line naming why, no traceback."""
    manifest_path, stage1_out = cached_stage1(tmp_path_factory)
    run = stage2_dir(tmp_path, "run", stage1_out)
    train.train(presets.tiny({"stage2.max_steps": 4, "stage2.save_every": 2}), manifest_path,
                run, stage=2, progress=False)
    ck = os.path.join(run, "stage2", "checkpoints")
    for name in os.listdir(ck):
        with open(os.path.join(ck, name, "trainable.safetensors"), "r+b") as f:
            f.truncate(10)
    os.remove(os.path.join(run, "stage2", "summary.json"))     # not finished: resume it
    shutil.rmtree(os.path.join(run, "stage2", "final"))
    from flows.cli import main
    capfd.readouterr()
    rc = main(["train", "--manifest", manifest_path, "--config", TINY_YAML, "--output", run,
               "--stage", "2", "--no-progress", "--resume", "--set", "stage2.max_steps=4",
               "--set", "stage2.save_every=2"])
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and "Traceback" not in err
    assert lines[-1].startswith("warren train: error: ") and "no intact checkpoint to resume from" in lines[-1]
    assert lines[-1].count("trainable.safetensors does not read") == 2


def test_resume_refuses_changed_batch_settings(tmp_path, tmp_path_factory):
    manifest_path, stage1_out = cached_stage1(tmp_path_factory)
    run = stage2_dir(tmp_path, "run", stage1_out)
    train.train(presets.tiny({"stage2.max_steps": 2}), manifest_path, run, stage=2, progress=False)
    changed = presets.tiny({"stage2.max_steps": 4, "stage2.global_batch_size": 4})
    with pytest.raises(InputError, match="batch settings changed"):
        train.train(changed, manifest_path, run, stage=2, resume=True, progress=False)
