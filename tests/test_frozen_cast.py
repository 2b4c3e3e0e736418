"""mllm.frozen_cast: frozen linear weights cast to bfloat16 once per run give the same
losses, bit for bit, as autocast casting them in every forward, and the export gets
the float32 originals back."""
from __future__ import annotations

import json
import os

import pytest
import torch

from mllm import export, frozen_cast, lora, presets, train
from mllm.config import LMConfig
from mllm.model import build_lm
from mllm_fixtures import cached_stage1, single_thread
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cast_once_trains_bit_identically_and_exports_float32(tmp_path_factory, tmp_path):
    manifest_path, out = cached_stage1(tmp_path_factory)
    cfg = presets.tiny({"stage2.max_steps": 3, "stage2.precision": "bf16", "stage2.save_every": 100})
    runs = {}
    for cast in (True, False):
        run = str(tmp_path / f"cast-{cast}")
        os.makedirs(run)
        os.symlink(os.path.join(out, "stage1"), os.path.join(run, "stage1"))
        with single_thread():
            train.train(cfg, manifest_path, run, stage=2, progress=False, cast_frozen=cast)
        with open(os.path.join(run, "stage2", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        runs[cast] = ([r["loss"] for r in rows], [r["grad_norm"] for r in rows],
                      export.load(os.path.join(run, "stage2", "final")).model.state_dict())
    (l1, g1, w1), (l0, g0, w0) = runs[True], runs[False]
    assert len(l1) == 3 and l1 == l0 and g1 == g0  # exactly equal, not close
    assert set(w1) == set(w0)
    for name, tensor in w1.items():
        assert tensor.dtype == w0[name].dtype and torch.equal(tensor, w0[name]), name
    assert w1["language_model.model.layers.0.mlp.fc1.weight"].dtype == torch.float32


def test_only_frozen_untied_linears_are_cast_and_restore_gives_the_originals(tmp_path_factory):
    manifest_path, out = cached_stage1(tmp_path_factory)
    vlm = export.load(os.path.join(out, "stage1", "final")).model
    vlm.requires_grad_(False)
    model = lora.apply(vlm, presets.tiny().lora)
    vlm.projector.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = frozen_cast.frozen_linears(model)
    names = {n for n, m in model.named_modules() if any(m is x for x in layers)}
    assert any(n.endswith("self_attn.q_proj.base_layer") for n in names)
    assert any("vision" in n and n.endswith("mlp.fc1") for n in names)
    assert not any("lora_" in n or "projector" in n for n in names)
    restore = frozen_cast.cast(model)
    params = dict(model.named_parameters())
    for n, p in params.items():
        cast = any(n.startswith(m + ".") for m in names)
        assert p.dtype == (torch.bfloat16 if cast else torch.float32), n
        if cast:
            assert torch.equal(p, before[n].to(torch.bfloat16))
    restore()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_a_head_tied_to_the_embeddings_stays_float32():
    lm = build_lm(LMConfig(arch="qwen2", hidden_size=32, intermediate_size=64, num_layers=1,
                           num_heads=2, vocab_size=100, max_position_embeddings=64))
    # Tied by hand: what frozen_cast must handle is one Parameter under two names, however
    # the tie came about (transformers' config-driven tie_weights() once left them apart
    # in a full CI run, after other tests, and never alone).
    lm.config.tie_word_embeddings = True
    lm.lm_head.weight = lm.get_input_embeddings().weight
    assert lm.lm_head.weight is lm.get_input_embeddings().weight
    lm.requires_grad_(False)
    restore = frozen_cast.cast(lm)
    assert lm.lm_head.weight.dtype == torch.float32
    assert lm.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    restore()
