"""LoRA invariants, through the real trainer: targets, frozen base, merge maths, logits."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from mllm import checkpoint, export, lora, presets, train
from mllm_fixtures import cached_stage1, single_thread
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory):
    manifest_path, out = cached_stage1(tmp_path_factory)
    run = str(tmp_path_factory.mktemp("lora-run"))
    os.symlink(os.path.join(out, "stage1"), os.path.join(run, "stage1"))
    cfg = presets.tiny({"stage2.max_steps": 3, "stage2.weight_decay": 0.1})
    with single_thread():
        summary = train.train(cfg, manifest_path, run, stage=2, progress=False)
    return cfg, manifest_path, run, summary


def test_targets_are_the_lm_linear_layers_named_in_full(tmp_path_factory):
    manifest_path, out = cached_stage1(tmp_path_factory)
    vlm = export.load(os.path.join(out, "stage1", "final")).model
    names = lora.target_modules(vlm)
    n_layers = vlm.language_model.config.num_hidden_layers
    # Phi: q, k, v, dense, fc1, fc2 per layer; the output head is left out (LLaVA/Bunny)
    assert len(names) == 6 * n_layers
    assert "language_model.model.layers.0.self_attn.q_proj" in names
    assert all(n.startswith("language_model.model.layers.") for n in names)
    # the vision tower has modules with the same suffixes (fc1, fc2, q_proj): none adapted
    assert any(n.endswith("fc1") for n, _ in vlm.vision.named_modules())
    model = lora.apply(vlm, presets.tiny().lora)
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted and all(".language_model." in n for n in adapted)
    assert not any(".vision." in n for n, _ in model.named_parameters() if "lora_" in n)
    assert not any("lm_head" in n for n in adapted)


def test_only_adapters_and_projector_train_and_base_is_unchanged(stage2_run):
    cfg, manifest_path, run, summary = stage2_run
    ck = checkpoint.latest(os.path.join(run, "stage2"))
    trained = load_file(os.path.join(ck, "trainable.safetensors"))
    assert trained and all("lora_A" in n or "lora_B" in n or ".projector." in n for n in trained)
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in trained.items())  # B has moved
    # The frozen base after training (weight decay on!) equals the stage-1 model.
    setup = train.prepare(cfg, manifest_path, run, stage=2)
    base = export.load(os.path.join(run, "stage1", "final")).model.state_dict()
    for name, p in setup.model.named_parameters():
        if not p.requires_grad and "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(p, base[key], rtol=0, atol=0)


def test_merged_weight_is_w_plus_ba_times_scale(stage2_run):
    cfg, manifest_path, run, _ = stage2_run
    trained = load_file(os.path.join(checkpoint.latest(os.path.join(run, "stage2")),
                                     "trainable.safetensors"))
    before = export.load(os.path.join(run, "stage1", "final")).model.state_dict()
    after = export.load(os.path.join(run, "stage2", "final")).model.state_dict()
    scale = cfg.lora.alpha / cfg.lora.r
    prefix = "base_model.model."
    targets = {n[len(prefix):-len(".lora_A.default.weight")] for n in trained if "lora_A" in n}
    assert len(targets) == 12
    for t in targets:
        a = trained[f"{prefix}{t}.lora_A.default.weight"]
        b = trained[f"{prefix}{t}.lora_B.default.weight"]
        torch.testing.assert_close(after[f"{t}.weight"], before[f"{t}.weight"] + (b @ a) * scale,
                                   rtol=1e-5, atol=1e-6)
    # everything that is not a LoRA target nor the projector is bit-identical
    for key, value in before.items():
        if not key.startswith("projector.") and key.rsplit(".", 1)[0] not in targets:
            assert torch.equal(after[key], value), key


def test_merged_model_logits_equal_the_adapter_model(stage2_run):
    cfg, manifest_path, run, _ = stage2_run
    setup = train.prepare(cfg, manifest_path, run, stage=2)
    ck = checkpoint.latest(os.path.join(run, "stage2"))
    weights = load_file(os.path.join(ck, "trainable.safetensors"))
    params = dict(setup.model.named_parameters())
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t)
    setup.model.eval()
    merged = export.load(os.path.join(run, "stage2", "final")).model
    batch = setup.collator([setup.dataset[i] for i in range(6)])
    assert "pixel_values" in batch
    with torch.no_grad():
        a = setup.model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values")).logits
        b = merged(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values")).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - b).abs().max() < 1e-4 < a.abs().max()
