"""TinyGPT-V's four stages (configs/train/tinygpt-v/) as released: their numbers, their
learning-rate schedule, what trains in each (by name, against TinyGPT-V's), and all four
run end to end on tiny models, each starting from the previous export."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import pyarrow as pa
import pytest
import torch
import yaml

import mllm_fixtures as fx
import mllm.tinygptv as tinygptv
from mllm import config, export, generate, lora, train
from mllm import data as data_mod
from mllm.config import QFormerConfig, VisionConfig
from mllm.templates import IGNORE_INDEX
from pipelines import manifest, schemas, storage
from pipelines.mix import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE = os.path.join(ROOT, "configs", "train", "tinygpt-v")
PATHS = [os.path.join(SCHEDULE, f"{name}.yaml") for name in tinygptv.STAGES]
# The shapes fx.jpeg draws: a 48x40 image, the shape in box (8, 6, 38, 34).
W, H, BOX = 48, 40, (8, 6, 38, 34)
EVA = VisionConfig(arch="eva", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=28,
                   patch_size=14, select_layer=-1)
Q = QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, proj_hidden_size=48,
                  num_query_tokens=4)

# train_configs/tinygptv_stage{1..4}.yaml (run: init_lr, min_lr, warmup_lr, warmup_steps,
# max_epoch x iters_per_epoch, weight_decay; datasets: batch_size; model: image_size), and
# the prompt each stage's model class builds.
RELEASED = {
    1: dict(lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=1000, steps=1 * 5000, wd=0.05, batch=64,
            template="tinygptv-pretrain", image=None, table="stage1"),
    2: dict(lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=5000, steps=4 * 5000, wd=0.05, batch=64,
            template="tinygptv-pretrain", image=None, table="stage1"),
    3: dict(lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200, steps=5 * 200, wd=0.05, batch=6,
            template="tinygptv-instruct", image=None, table="mix"),
    4: dict(lr=1e-5, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=1000, steps=50 * 1000, wd=0.05, batch=3,
            template="tinygptv", image=448, table="multitask"),
}


@pytest.fixture(autouse=True)
def one_thread():
    with fx.single_thread():
        yield


def test_the_four_configs_carry_tinygptvs_numbers_and_name_their_command():
    cfgs = [config.load(p) for p in PATHS]
    assert [c.run.stage for c in cfgs] == [1, 2, 2, 2]
    for n, (cfg, path) in enumerate(zip(cfgs, PATHS), start=1):
        s, want = cfg.stage(cfg.run.stage), RELEASED[n]
        assert (s.lr, s.min_lr, s.warmup_lr, s.warmup_steps, s.max_steps, s.weight_decay) == (
            want["lr"], want["min_lr"], want["warmup_lr"], want["warmup_steps"], want["steps"], want["wd"]), path
        assert s.schedule == "linear_warmup_cosine" and s.betas == [0.9, 0.999] and s.max_grad_norm is None
        assert s.global_batch_size == want["batch"] and s.projector_lr is None  # one lr for all, as LAVIS
        assert (s.template, s.table, s.image_size) == (want["template"], want["table"], want["image"])
        assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16, 0.05)
        assert cfg.lora.targets == ["q_proj", "k_proj", "v_proj", "dense"]  # query_key_value + dense
        assert s.lora in (True, None)  # LoRA in every stage, as released
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        assert first.startswith("# warren train --manifest ") and os.path.relpath(path, ROOT) in first
    m = cfgs[0].model
    assert (m.vision.arch, m.vision.select_layer, m.vision.image_size, m.projector, m.transforms) == (
        "eva", -1, 224, "qformer", ["tinygptv_norms"])
    assert (m.qformer.num_query_tokens, m.qformer.proj_hidden_size, m.qformer.freeze) == (32, 4096, True)
    assert cfgs[0].stage1.lora is True
    for prev, cur in zip(cfgs, cfgs[1:]):  # each stage starts from the previous export
        assert cur.stage2.init_from == os.path.join(prev.run.output_dir, f"stage{prev.run.stage}", "final")


# ------------------------------------------------------------------ schedule

def lavis_lr(step, total, warmup, init_lr, min_lr, warmup_lr):
    """minigpt4/common/optims.py LinearWarmupCosineLRScheduler.step for one epoch-free
    step count (its cur_step == total step while warmup < iters_per_epoch)."""
    if step < warmup:
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * step / max(warmup, 1))
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / total)) + min_lr


def lrs(stage_cfg, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=stage_cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.schedule_for(stage_cfg, stage_cfg.max_steps))
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_the_lr_follows_lavis_linear_warmup_cosine_step_by_step():
    s3 = config.load(PATHS[2]).stage2
    got = lrs(s3, s3.max_steps)
    # by hand: warmup 1e-6 -> 3e-5 over 200 steps, then 1e-5 + 2e-5 (1 + cos(pi s / 1000)) / 2
    assert got[0] == pytest.approx(1e-6)
    assert got[100] == pytest.approx(1e-6 + 2.9e-5 * 100 / 200)
    assert got[200] == pytest.approx(1e-5 + 1e-5 * (1 + math.cos(math.pi * 0.2)))  # no restart at 3e-5
    assert got[999] == pytest.approx(1e-5, rel=1e-4)
    for n, path in enumerate(PATHS, start=1):
        cfg = config.load(path)
        s = cfg.stage(cfg.run.stage)
        want = [lavis_lr(k, s.max_steps, s.warmup_steps, s.lr, s.min_lr, s.warmup_lr) for k in range(s.max_steps)]
        assert lrs(s, s.max_steps) == pytest.approx(want, rel=1e-9), path  # every step
    s4 = config.load(PATHS[3]).stage2
    assert lrs(s4, s4.max_steps)[-1] > 7.9e-5  # min_lr above lr, as released: the lr rises


def test_the_default_schedule_is_unchanged():
    from transformers import get_cosine_schedule_with_warmup
    s = config.StageConfig(lr=2e-4, warmup_ratio=0.03, max_steps=300)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2e-4)
    hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=train.warmup_steps(300, 0.03), num_training_steps=300)
    want = []
    for _ in range(300):
        want.append(hf.get_last_lr()[0])
        opt.step()
        hf.step()
    assert lrs(s, 300) == pytest.approx(want, rel=1e-12, abs=1e-15)
    floor = dataclasses.replace(s, min_lr=2e-5)  # the cosine's floor, as an option
    assert min(lrs(floor, 300)[20:]) == pytest.approx(2e-5, rel=1e-3)


# --------------------------------------------------------------- data, tiny runs

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
    fx.write_table(fx.mix_rows(8, 0), os.path.join(root, "mix.parquet"))
    table = pa.Table.from_pylist(multitask_rows(12), schema=schemas.MIX)
    tagged, stats = tasks.tag_table(table)
    assert stats["by_task"] == {t: 2 for t in tasks.TASKS}
    storage.write_table(tagged, os.path.join(root, "multitask.parquet"), schemas.MIX)
    path = os.path.join(root, "manifest.json")
    manifest.write(path, tables={n: os.path.join(root, f"{n}.parquet") for n in ("stage1", "mix", "multitask")},
                   images={n: images for n in ("stage1", "mix", "multitask")})
    return path


def tiny_overrides(n: int, out: str, prev: str | None) -> dict:
    """The real schedule file, shrunk: tiny random towers and Q-Former, a local tokenizer,
    3 steps (warmup 1), 2x the tiny image size in stage 4 (TinyGPT-V: 224 -> 448)."""
    from mllm import presets
    stage = "stage1" if n == 1 else "stage2"
    o = {"data.tokenizer": "local", "data.tokenizer_vocab_size": 400, "data.max_length": 256,
         "data.num_workers": 0, "data.megabatch": 2, "model.dtype": "float32",
         "run.output_dir": out, "run.seed": 0, "lora.r": 4, "lora.alpha": 8,
         f"{stage}.max_steps": 3, f"{stage}.warmup_steps": 1, f"{stage}.micro_batch_size": 2,
         f"{stage}.global_batch_size": 4, f"{stage}.precision": "fp32", f"{stage}.save_every": 2,
         f"{stage}.lr": 5e-3, f"{stage}.min_lr": 1e-3}
    if n == 1:
        o["model.vision"] = dataclasses.asdict(EVA)
        o["model.lm"] = presets.TINY["model"]["lm"]
        o["model.qformer"] = dataclasses.asdict(Q)
    else:
        o["stage2.init_from"] = prev
    if n == 4:
        o["stage2.image_size"] = 2 * EVA.image_size
    return o


# What TinyGPT-V trains, by its own names (minigpt4/models/base_model.py init_llm with
# lora_r 64: peft's LoRA on 'query_key_value' and 'dense', then requires_grad on the
# weight of q_layernorm, k_layernorm, post_layernorm, input_layernorm of every layer and
# of final_layernorm; minigpt4.py: llama_proj, llama_proj2; the Q-Former, its query
# tokens, EVA and ln_vision frozen).
def tinygptv_trainable(n_layers: int, with_lora: bool = True) -> set[str]:
    lm = "llama_model.base_model.model.model"
    names = {"llama_proj.weight", "llama_proj.bias", "llama_proj2.weight", "llama_proj2.bias",
             f"{lm}.final_layernorm.weight"}
    for i in range(n_layers):
        names |= {f"{lm}.layers.{i}.self_attn.q_layernorm.weight", f"{lm}.layers.{i}.self_attn.k_layernorm.weight",
                  f"{lm}.layers.{i}.post_layernorm.weight", f"{lm}.layers.{i}.input_layernorm.weight"}
        if with_lora:
            names |= {f"{lm}.layers.{i}.self_attn.{m}.lora_{ab}.default.weight"
                      for m in ("query_key_value", "dense") for ab in "AB"}
    return names


# Warren's names -> TinyGPT-V's: q/k/v_proj are its fused query_key_value, the post-attention
# norm its post_layernorm.
RENAME = [
    (r"^(?:base_model\.model\.)?projector\.(llama_proj2?)\.(weight|bias)$", r"\1.\2"),
    (r"^(?:base_model\.model\.)?language_model\.model\.layers\.(\d+)\.self_attn\.[qkv]_proj\.lora_([AB])\.default\.weight$",
     r"llama_model.base_model.model.model.layers.\1.self_attn.query_key_value.lora_\2.default.weight"),
    (r"^(?:base_model\.model\.)?language_model\.model\.layers\.(\d+)\.self_attn\.dense\.lora_([AB])\.default\.weight$",
     r"llama_model.base_model.model.model.layers.\1.self_attn.dense.lora_\2.default.weight"),
    (r"^(?:base_model\.model\.)?language_model\.model\.layers\.(\d+)\.self_attn\.stabilizer_out_norm\.weight$",
     r"llama_model.base_model.model.model.layers.\1.post_layernorm.weight"),
    (r"^(?:base_model\.model\.)?language_model\.model\.(.*norm\.weight)$", r"llama_model.base_model.model.model.\1"),
]


def as_tinygptv(names: list[str]) -> set[str]:
    out = set()
    for n in names:
        for pattern, repl in RENAME:
            if re.match(pattern, n):
                out.add(re.sub(pattern, repl, n))
                break
        else:
            raise AssertionError(f"trainable parameter {n} has no TinyGPT-V counterpart")
    return out


def test_the_trainable_set_of_every_stage_is_tinygptvs(schedule_data, tmp_path):
    from mllm import presets
    n_layers = presets.TINY["model"]["lm"]["num_layers"]
    prev = None
    for n, path in enumerate(PATHS, start=1):
        out = str(tmp_path / tinygptv.STAGES[n - 1])
        cfg = config.load(path, tiny_overrides(n, out, prev))
        setup = train.prepare(cfg, schedule_data, out, cfg.run.stage)
        trainable = [k for k, p in setup.model.named_parameters() if p.requires_grad]
        assert as_tinygptv(trainable) == tinygptv_trainable(n_layers), path
        assert setup.lora and all(p.dtype == torch.float32 for p in setup.model.parameters() if p.requires_grad)
        prev = export.save(lora.merge(setup.model), setup.tokenizer, cfg, setup.scfg.template,
                           os.path.join(out, "final"), model_cfg=setup.model_cfg)
    # the paper's warm-up (no LoRA before stage 2) is one setting away
    out = str(tmp_path / "paper")
    cfg = config.load(PATHS[0], {**tiny_overrides(1, out, None), "stage1.lora": False})
    setup = train.prepare(cfg, schedule_data, out, 1)
    assert as_tinygptv([k for k, p in setup.model.named_parameters() if p.requires_grad]) == \
        tinygptv_trainable(n_layers, with_lora=False)


def test_four_stages_run_end_to_end_on_tiny_models(schedule_data, tmp_path):
    prev, norms, projs = None, [], []
    for n, path in enumerate(PATHS, start=1):
        out = str(tmp_path / tinygptv.STAGES[n - 1])
        cfg = config.load(path, tiny_overrides(n, out, prev))
        summary = train.train(cfg, schedule_data, out, progress=False)
        assert summary["steps"] == 3 and all(map(math.isfinite, [summary["first_loss"], summary["final_loss"]]))
        loaded = export.load(summary["final"])
        assert loaded.model.num_image_tokens == Q.num_query_tokens
        assert loaded.model.vision.image_size == (2 * EVA.image_size if n == 4 else EVA.image_size)
        lm = loaded.model.language_model
        norms.append({k: v.detach().clone() for k, v in lm.named_parameters() if "norm.weight" in k})
        projs.append(loaded.model.projector.llama_proj2.weight.detach().clone())
        prev = summary["final"]
    assert len(norms[0]) == 4 * 2 + 1
    for before, after in zip(norms, norms[1:]):  # every stage moved every trained norm weight
        assert all(not torch.equal(before[k], after[k]) for k in after)
    assert all(not torch.equal(a, b) for a, b in zip(projs, projs[1:]))
    with open(os.path.join(prev, "warren_vlm.json"), encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["model"]["transforms"] == ["tinygptv_norms"] and meta["model"]["projector"] == "qformer"
    assert meta["template"] == "tinygptv" and meta["model"]["vision"]["image_size"] == 2 * EVA.image_size

    # the multitask stage's samples: trained tokens are exactly each answer + '###'
    final = export.load(prev)
    man = manifest.load(schedule_data)
    ds = data_mod.ConversationDataset(man.table_path("multitask"), data_mod.image_store(man.images("multitask")),
                                      final.tokenizer, final.template, final.model.num_image_tokens, None, 256)
    for row in range(len(ds)):
        ids, labels, cut = ds.encode(row)
        assert not cut
        conv = ds.conversations[row]
        trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert final.tokenizer.decode(trained) == f"{conv[1]['value']}###"
        task = tasks.task_in(conv[0]["value"])
        image = "<image>" * Q.num_query_tokens
        assert final.tokenizer.decode(ids) == (f"<|endoftext|>[INST] <Img>{image}</Img> "
                                               f"{conv[0]['value'].removeprefix('<image>').strip()}  [/INST]"
                                               f"{conv[1]['value']}###")
    answer = generate.answer(final, fx.jpeg("red", "square"), "[refer] the red square", max_new_tokens=6)
    assert isinstance(answer, str)
    with open(os.path.join(out, "stage2", "config.yaml"), encoding="utf-8") as f:
        assert yaml.safe_load(f)["stage2"]["table"] == "multitask"


def test_resuming_from_a_checkpoint_restores_the_trained_norms(tmp_path_factory, tmp_path):
    """Steps 1-4 uninterrupted == steps 1-2, then resume from the step-2 checkpoint."""
    import shutil

    from mllm import presets
    manifest_path = fx.cached_dataset(tmp_path_factory)
    cfg = presets.tiny({"model.transforms": ["tinygptv_norms"], "model.projector": "resampler8",
                        "stage1.max_steps": 4, "stage1.save_every": 2, "stage1.keep_last": 2,
                        "stage1.global_batch_size": 4, "stage1.micro_batch_size": 4})
    out = str(tmp_path)
    first = train.train(cfg, manifest_path, out, stage=1, progress=False)

    def norms(folder):
        return {k: v for k, v in export.load(folder).model.language_model.named_parameters() if "norm.weight" in k}
    want = norms(first["final"])
    assert all(not torch.equal(p, torch.ones_like(p)) for k, p in want.items() if "stabilizer" in k)
    ckdir = os.path.join(out, "stage1", "checkpoints")
    assert sorted(os.listdir(ckdir)) == ["step-00000002", "step-00000004"]
    shutil.rmtree(os.path.join(ckdir, "step-00000004"))
    again = train.train(cfg, manifest_path, out, stage=1, resume=True, progress=False)
    assert again["resumed_from"] == 2
    got = norms(again["final"])
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, atol=1e-6, rtol=0)
