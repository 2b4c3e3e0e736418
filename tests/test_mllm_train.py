"""The trainer on CPU with the tiny model: it learns, its outputs are complete, and
accumulation, checkpointing and precision options do what they claim."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import torch

import mllm_fixtures as fx
from mllm import demo, export, generate, presets, train
from pipelines.errors import InputError
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixed_batch_data(tmp_path_factory):
    """8 caption rows and 8 mix rows: with global batch 8 and no grouping, every step
    sees the same 8 samples."""
    return fx.make_dataset(str(tmp_path_factory.mktemp("fixed")), n_stage1=8, n_image=6, n_text=2)


FIXED = {"data.group_by_modality_length": False, "stage1.global_batch_size": 8,
         "stage2.global_batch_size": 8, "stage1.save_every": 1000, "stage2.save_every": 1000,
         "stage1.warmup_ratio": 0.0, "stage2.warmup_ratio": 0.0}


def losses(run_dir, stage):
    with open(os.path.join(run_dir, f"stage{stage}", "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f]


def test_loss_on_a_fixed_batch_falls_far_below_its_start(fixed_batch_data, tmp_path):
    cfg = presets.tiny({**FIXED, "stage1.max_steps": 25, "stage1.lr": 1e-2,
                        "stage2.max_steps": 25, "stage2.lr": 1e-2, "lora.dropout": 0.0})
    s1 = train.train(cfg, fixed_batch_data, str(tmp_path), stage=1, progress=False)
    assert s1["final_loss"] < 0.6 * s1["first_loss"]  # the projector alone
    s2 = train.train(cfg, fixed_batch_data, str(tmp_path), stage=2, progress=False)
    assert s2["final_loss"] < 0.1 * s2["first_loss"]  # LoRA memorises the batch
    assert s2["final_loss"] < 0.5


def test_gradient_accumulation_matches_one_big_batch(fixed_batch_data, tmp_path):
    runs = {}
    for micro in (8, 2):  # accumulation 1 and 4
        cfg = presets.tiny({**FIXED, "stage1.max_steps": 3, "stage1.micro_batch_size": micro})
        out = str(tmp_path / f"micro{micro}")
        assert train.train(cfg, fixed_batch_data, out, stage=1, progress=False)["accum"] == 8 // micro
        runs[micro] = losses(out, 1)
    assert len(runs[8]) == 3
    for a, b in zip(runs[8], runs[2]):
        assert abs(a - b) < 1e-5


def test_gradient_checkpointing_gives_the_same_losses_and_bf16_trains(fixed_batch_data, tmp_path):
    base = {**FIXED, "stage1.max_steps": 3}
    out = {}
    for name, extra in {"plain": {}, "ckpt": {"stage1.gradient_checkpointing": True},
                        "bf16": {"stage1.precision": "bf16"}}.items():
        train.train(presets.tiny({**base, **extra}), fixed_batch_data, str(tmp_path / name), stage=1,
                    progress=False)
        out[name] = losses(str(tmp_path / name), 1)
    assert max(abs(a - b) for a, b in zip(out["plain"], out["ckpt"])) < 1e-6
    assert all(abs(a - b) < 0.1 * a for a, b in zip(out["plain"], out["bf16"]))


def test_an_existing_run_is_not_overwritten_without_resume(fixed_batch_data, tmp_path):
    cfg = presets.tiny({**FIXED, "stage1.max_steps": 1})
    train.train(cfg, fixed_batch_data, str(tmp_path), stage=1, progress=False)
    with pytest.raises(InputError, match="pass --resume"):
        train.train(cfg, fixed_batch_data, str(tmp_path), stage=1, progress=False)


def test_stage2_needs_a_stage1_model(fixed_batch_data, tmp_path):
    from pipelines.errors import ConfigError
    with pytest.raises(ConfigError, match="run stage 1 first or set stage2.init_from"):
        train.train(presets.tiny(), fixed_batch_data, str(tmp_path), stage=2, progress=False)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    manifest_path = fx.cached_dataset(tmp_path_factory)
    out = str(tmp_path_factory.mktemp("demo"))
    with fx.single_thread():
        return demo.train_tiny(manifest_path, out, steps=20), out


def test_demo_trains_both_stages_and_answers(demo_run):
    result, out = demo_run
    assert result["seconds"] < 90
    assert isinstance(result["answer"], str) and result["answer"]
    assert result["image_id"] == "mix-img0000"
    for stage in (1, 2):
        s = result[f"stage{stage}"]
        folder = os.path.join(out, f"stage{stage}")
        assert s["final_loss"] < s["first_loss"]
        assert sorted(os.listdir(folder)) == sorted(
            ["checkpoints", "config.yaml", "final", "loss.png", "metrics.jsonl", "rejects.parquet",
             "summary.json", "tokenizer"] + (["hf"] if stage == 2 else []))  # hf/: the llava-hf export
        # clean fixture data: every row trains (16 captions in stage 1, 12 + 4 mix rows in 2)
        assert (s["input_rows"], s["trained_rows"], s["rejected_rows"]) == (16, 16, 0)
        assert pq.read_table(os.path.join(folder, "rejects.parquet")).num_rows == 0
        with open(os.path.join(folder, "loss.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        assert [r["step"] for r in rows] == list(range(1, 21))
        assert all(r["tokens_per_s"] > 0 and r["tokens"] > 0 for r in rows)
        # cosine with warmup: starts at 0, peaks at lr, decays towards 0
        lrs = [r["lr"] for r in rows]
        assert lrs[0] == 0.0 and max(lrs) == pytest.approx(presets.tiny().stage(stage).lr)
        assert lrs[-1] < 0.05 * max(lrs)
        assert os.listdir(os.path.join(folder, "checkpoints")) == ["step-00000020"]
        with open(os.path.join(folder, "config.yaml")) as f:
            assert f.readline().startswith("# warren train --manifest")


def test_the_export_loads_with_one_call_and_generates(demo_run):
    result, out = demo_run
    loaded = export.load(result["model"])
    assert loaded.template.name == "bunny" and not loaded.model.training
    a = generate.answer(loaded, fx.jpeg("red", "square"), "What color is the shape?", max_new_tokens=8)
    b = generate.answer(loaded, fx.jpeg("red", "square"), "What color is the shape?", max_new_tokens=8)
    assert a == b  # greedy


def test_warren_generate_command(demo_run, tmp_path, capsys):
    from flows.cli import main
    result, out = demo_run
    image = tmp_path / "blue.jpg"
    image.write_bytes(fx.jpeg("blue", "circle"))
    assert main(["generate", "--checkpoint", out, "--image", str(image),
                 "--prompt", "What color is the shape?", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.strip()
    loaded = export.load(result["model"])
    assert printed == generate.answer(loaded, str(image), "What color is the shape?", max_new_tokens=8)
    assert main(["generate", "--checkpoint", out, "--image", str(tmp_path / "missing.jpg"),
                 "--prompt", "x"]) == 2
    assert "image file not found" in capsys.readouterr().err


def test_projector_only_changes_in_stage1(demo_run):
    result, out = demo_run
    s1 = export.load(os.path.join(out, "stage1", "final")).model.state_dict()
    torch.manual_seed(0)
    cfg = presets.tiny()
    from mllm.model import from_config
    tok = export.load(os.path.join(out, "stage1", "final")).tokenizer
    torch.manual_seed(cfg.run.seed)
    fresh = from_config(cfg, tok).state_dict()
    for key, value in fresh.items():
        if key.startswith("projector."):
            assert not torch.equal(value, s1[key]), key
        else:
            assert torch.equal(value, s1[key]), key
