"""TinyGPT-V's four-stage schedule (configs/train/tinygpt-v/) end to end on the tiny
model: one manifest, the same trainer, each stage starting from the previous export;
the stabilisers and the resampler train through all four and survive every reload."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest
import torch
import yaml

import mllm_fixtures as fx
import mllm.tinygptv as tinygptv
from mllm import config, export, generate, stabilizers, train
from mllm import data as data_mod
from mllm.templates import IGNORE_INDEX
from pipelines import manifest, schemas, storage, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE = os.path.join(ROOT, "configs", "train", "tinygpt-v")
PATHS = [os.path.join(SCHEDULE, f"{name}.yaml") for name in tinygptv.STAGES]
# The shapes fx.jpeg draws: a 48x40 image, the shape in box (8, 6, 38, 34).
W, H, BOX = 48, 40, (8, 6, 38, 34)


@pytest.fixture(autouse=True)
def one_thread():
    with fx.single_thread():
        yield


def test_the_four_configs_load_chain_and_name_their_command():
    cfgs = [config.load(p) for p in PATHS]
    assert [c.run.stage for c in cfgs] == [1, 2, 2, 2]
    steps = [c.stage(c.run.stage) for c in cfgs]
    assert [s.table for s in steps] == ["stage1", "stage1", "mix", "multitask"]
    assert [s.template for s in steps] == ["plain", "plain", "tinygptv", "tinygptv"]
    assert cfgs[0].model.projector == "resampler" and cfgs[0].model.transforms == ["stabilizers"]
    for prev, cur in zip(cfgs, cfgs[1:]):  # each stage starts from the previous export
        assert cur.stage2.init_from == os.path.join(prev.run.output_dir, f"stage{prev.run.stage}", "final")
    for path in PATHS:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        assert first.startswith("# warren train --manifest ") and os.path.relpath(path, ROOT) in first


def multitask_rows(n: int) -> list[dict]:
    rows = []
    for k, (uid, color, shape) in enumerate(fx.samples(n)):
        box = tasks.format_box(BOX, W, H)
        per_task = {
            "vqa": ("<image>\nWhat color is the shape?", f"{color}."),
            "caption": ("<image>\nBriefly describe this image.", f"a {color} {shape}"),
            "refer": (f"<image>\ngive me the location of the {color} {shape}", box),
            "identify": (f"<image>\nwhat object is in this location {box}", f"a {color} {shape}"),
            "grounding": ("<image>\ndescribe this image in detail",
                          f"a {tasks.format_grounded(f'{color} {shape}', [BOX], W, H)} on white"),
            "detection": (f"<image>\ndetect {shape}", tasks.format_grounded(shape, [BOX], W, H)),
        }
        task = tasks.TASKS[k % len(tasks.TASKS)]
        q, a = per_task[task]
        rows.append({"id": f"mt-{uid}", "source": "multitask", "image": uid,
                     "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
                     "n_turns": 2, "has_image": True})
    return rows


@pytest.fixture(scope="module")
def schedule_data(tmp_path_factory):
    """One manifest: stage1 captions, the instruction mix, and a tagged multitask table."""
    root = str(tmp_path_factory.mktemp("tinygptv-data"))
    images = fx.write_images(root, 12, "parquet")
    fx.write_table(fx.stage1_rows(12), os.path.join(root, "stage1.parquet"))
    fx.write_table(fx.mix_rows(8, 4), os.path.join(root, "mix.parquet"))
    table = pa.Table.from_pylist(multitask_rows(12), schema=schemas.MIX)
    tagged, stats = tasks.tag_table(table)
    assert stats["by_task"] == {t: 2 for t in tasks.TASKS}
    storage.write_table(tagged, os.path.join(root, "multitask.parquet"), schemas.MIX)
    path = os.path.join(root, "manifest.json")
    manifest.write(path, tables={n: os.path.join(root, f"{n}.parquet") for n in ("stage1", "mix", "multitask")},
                   images={n: images for n in ("stage1", "mix", "multitask")})
    return path


def tiny_overrides(n: int, out: str, prev: str | None) -> dict:
    """The real schedule file, shrunk: tiny random towers, a local tokenizer, 3 steps."""
    from mllm import presets
    stage = "stage1" if n == 1 else "stage2"
    o = {"data.tokenizer": "local", "data.tokenizer_vocab_size": 400, "data.max_length": 256,
         "data.num_workers": 0, "data.megabatch": 2, "model.dtype": "float32",
         "run.output_dir": out, "run.seed": 0,
         f"{stage}.max_steps": 3, f"{stage}.micro_batch_size": 2, f"{stage}.global_batch_size": 4,
         f"{stage}.precision": "fp32", f"{stage}.save_every": 2, f"{stage}.lr": 5e-3}
    if n == 1:
        o["model.vision"] = presets.TINY["model"]["vision"]
        o["model.lm"] = presets.TINY["model"]["lm"]
    else:
        o.update({"lora.r": 4, "lora.alpha": 8, "stage2.init_from": prev, "stage2.projector_lr": 1e-3})
    return o


def test_four_stages_run_end_to_end_on_tiny_models(schedule_data, tmp_path):
    # The trainer keeps modules marked `always_trainable` (the stabilisers) trainable
    # after its freeze and the LoRA wrap, in both trainer stages.
    prev, norms, projs = None, [], []
    for n, path in enumerate(PATHS, start=1):
        out = str(tmp_path / tinygptv.STAGES[n - 1])
        cfg = config.load(path, tiny_overrides(n, out, prev))
        summary = train.train(cfg, schedule_data, out, progress=False)
        stage_out = os.path.join(out, f"stage{cfg.run.stage}")
        assert summary["steps"] == 3 and all(map(torch.isfinite, torch.tensor(
            [summary["first_loss"], summary["final_loss"]])))
        # the stabilisers were trained and saved with the checkpoint
        ck = train.checkpoint.latest(stage_out)
        from safetensors.torch import load_file
        saved = [k for k in load_file(os.path.join(ck, "trainable.safetensors")) if "stabilizer_" in k]
        assert len(saved) == 3 * 2, saved
        loaded = export.load(summary["final"])
        assert loaded.model.num_image_tokens == 32 and loaded.meta["num_image_tokens"] == 32
        params = stabilizers.stabilizer_parameters(loaded.model)
        assert len(params) == 6 and all(p.dtype == torch.float32 for p in params.values())
        norms.append({k: v.detach().clone() for k, v in params.items()})
        projs.append(loaded.model.projector.queries.detach().clone())
        prev = summary["final"]
    # every stage moved the norms and the resampler's queries
    ones = {k: torch.ones_like(v) for k, v in norms[0].items()}
    for before, after in zip([ones] + norms, norms):
        assert all(not torch.equal(before[k], after[k]) for k in after)
    assert all(not torch.equal(a, b) for a, b in zip(projs, projs[1:]))
    with open(os.path.join(prev, "warren_vlm.json"), encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["model"]["transforms"] == ["stabilizers"] and meta["model"]["projector"] == "resampler"
    assert meta["template"] == "tinygptv"

    # the multitask stage's samples: trained tokens are exactly each answer + eos
    final = export.load(prev)
    man = manifest.load(schedule_data)
    ds = data_mod.ConversationDataset(man.table_path("multitask"), data_mod.image_store(man.images("multitask")),
                                      final.tokenizer,
                                      final.template, final.model.num_image_tokens, None, 256)
    for row in range(len(ds)):
        ids, labels, cut = ds.encode(row)
        assert not cut
        conv = ds.conversations[row]
        trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert final.tokenizer.decode(trained) == f" {conv[1]['value']}<|endoftext|>"
        task = tasks.task_in(conv[0]["value"])
        assert task in tasks.TASKS and f"[{task}]" in final.tokenizer.decode(ids)
    answer = generate.answer(final, fx.jpeg("red", "square"), "[refer] the red square", max_new_tokens=6)
    assert isinstance(answer, str)
    with open(os.path.join(out, "stage2", "config.yaml"), encoding="utf-8") as f:
        resolved = yaml.safe_load(f)
    assert resolved["stage2"]["table"] == "multitask"


def test_resuming_from_a_checkpoint_restores_the_stabilisers(tmp_path_factory, tmp_path):
    """Steps 1-4 uninterrupted == steps 1-2, then resume from the step-2 checkpoint."""
    import shutil

    from mllm import presets
    manifest_path = fx.cached_dataset(tmp_path_factory)
    cfg = presets.tiny({"model.transforms": ["stabilizers"], "model.projector": "resampler8",
                        "stage1.max_steps": 4, "stage1.save_every": 2, "stage1.keep_last": 2,
                        "stage1.global_batch_size": 4, "stage1.micro_batch_size": 4})
    out = str(tmp_path)
    first = train.train(cfg, manifest_path, out, stage=1, progress=False)
    want = stabilizers.stabilizer_parameters(export.load(first["final"]).model)
    assert all(not torch.equal(p, torch.ones_like(p)) for p in want.values())
    ckdir = os.path.join(out, "stage1", "checkpoints")
    assert sorted(os.listdir(ckdir)) == ["step-00000002", "step-00000004"]
    shutil.rmtree(os.path.join(ckdir, "step-00000004"))
    again = train.train(cfg, manifest_path, out, stage=1, resume=True, progress=False)
    assert again["resumed_from"] == 2
    got = stabilizers.stabilizer_parameters(export.load(again["final"]).model)
    for name, p in want.items():
        assert torch.allclose(got[name], p, atol=1e-6), name
