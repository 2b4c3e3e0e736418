"""The VLM assembled from tiny random parts: image expansion, towers, projectors, loss."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from mllm import presets, projector
from mllm.config import LMConfig, VisionConfig
from mllm.model import IGNORE_INDEX, ImageTokenMismatch, build_vlm
from mllm.vision import build as build_tower
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = presets.MODELS["tiny"]


def tiny_vlm(**changes):
    torch.manual_seed(0)
    return build_vlm(dataclasses.replace(TINY, **changes), image_token_id=5, vocab_size=300)


def test_builder_takes_every_dimension():
    vlm = tiny_vlm()
    lm = vlm.language_model.config
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads) == (64, 2, 4)
    assert vlm.vision.model.config.num_hidden_layers == 2
    assert vlm.vision.num_patches == (32 // 8) ** 2 == vlm.num_image_tokens
    # vocab grows to the tokenizer when that is larger than the config's
    assert build_vlm(dataclasses.replace(TINY, lm=dataclasses.replace(TINY.lm, vocab_size=64)),
                     5, vocab_size=300).language_model.get_input_embeddings().num_embeddings == 300


def test_siglip_uses_penultimate_layer_and_clip_drops_cls():
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    sig = build_tower(TINY.vision)
    ref = sig.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert torch.equal(sig(pixels), ref[-2])
    assert sig(pixels).shape == (2, 16, 32)
    clip = build_tower(VisionConfig(arch="clip", hidden_size=32, intermediate_size=64, num_layers=2,
                                    num_heads=2, image_size=32, patch_size=8))
    ref = clip.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert ref.shape[1] == 17  # CLS + 16 patches
    assert torch.equal(clip(pixels), ref[:, 1:])
    # frozen, and stays in eval mode inside a training model
    vlm = tiny_vlm()
    vlm.train()
    assert not vlm.vision.model.training
    assert not any(p.requires_grad for p in vlm.vision.parameters())


def test_projector_registry_and_token_count():
    assert {"linear", "mlp2x_gelu"} <= set(projector.REGISTRY)
    mlp = projector.build("mlp2x_gelu", 32, 64)
    assert [type(m).__name__ for m in mlp.net] == ["Linear", "GELU", "Linear"]
    assert len(projector.build("linear", 32, 64).net) == 1

    class Resampler(projector.Projector):  # the extension point: N learned queries
        def __init__(self, vision_dim, lm_dim, queries=3):
            super().__init__()
            self.q = torch.nn.Parameter(torch.randn(queries, lm_dim))
            self.proj = torch.nn.Linear(vision_dim, lm_dim)

        def num_image_tokens(self, num_patches):
            return self.q.shape[0]

        def forward(self, x):
            att = torch.softmax(self.q @ self.proj(x).transpose(1, 2), -1)
            return att @ self.proj(x)

    projector.register("test-resampler", Resampler)
    try:
        vlm = tiny_vlm(projector="test-resampler")
        assert vlm.num_image_tokens == 3
        ids = torch.tensor([[1, 5, 5, 5, 2]])
        assert vlm.embed(ids, torch.randn(1, 3, 32, 32)).shape == (1, 5, 64)
    finally:
        del projector.REGISTRY["test-resampler"]


def test_image_placeholders_are_replaced_in_order():
    vlm = tiny_vlm()
    n = vlm.num_image_tokens
    ids = torch.tensor([[1] + [5] * n + [2, 3], [4] * (n + 3)])  # row 2 text-only
    pixels = torch.randn(1, 3, 32, 32)
    embeds = vlm.embed(ids, pixels)
    feats = vlm.image_features(pixels)[0]
    assert torch.allclose(embeds[0, 1:1 + n], feats)
    table = vlm.language_model.get_input_embeddings().weight
    assert torch.equal(embeds[0, 0], table[1]) and torch.equal(embeds[1, 0], table[4])
    with pytest.raises(ImageTokenMismatch):
        vlm.embed(ids, torch.randn(2, 3, 32, 32))
    with pytest.raises(ImageTokenMismatch):
        vlm.embed(ids, None)


def test_supervised_logits_only_gives_the_same_loss():
    vlm = tiny_vlm()
    n = vlm.num_image_tokens
    ids = torch.tensor([[1] + [5] * n + [7, 8, 9, 10, 0], [11, 12, 13, 14, 15, 16] + [0] * (n)])
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -4:] = ids[0, -4:]
    labels[1, 3:6] = ids[1, 3:6]
    pixels = torch.randn(1, 3, 32, 32)
    full = vlm(ids, mask, pixels, labels)
    fast = vlm(ids, mask, pixels, labels, supervised_logits_only=True)
    assert full.num_tokens == fast.num_tokens == 4 + 3
    torch.testing.assert_close(full.loss, fast.loss, rtol=1e-5, atol=1e-6)
    # and it is the plain next-token cross-entropy over the supervised positions
    logits = full.logits[:, :-1].reshape(-1, full.logits.shape[-1])
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(full.loss, ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_other_causal_lms(arch):
    lm = LMConfig(arch=arch, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, vocab_size=300, max_position_embeddings=256)
    vlm = tiny_vlm(lm=lm)
    n = vlm.num_image_tokens
    ids = torch.tensor([[1] + [5] * n + [7, 8]])
    out = vlm(ids, torch.ones_like(ids), torch.randn(1, 3, 32, 32), ids.clone())
    assert out.loss.isfinite()


def test_mllm_never_imports_prefect():
    code = ("import sys, mllm.train, mllm.demo, mllm.export, mllm.generate; "
            "assert 'prefect' not in sys.modules, 'prefect imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
