"""The resampler connector: N learned queries, so an image is exactly N tokens."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import mllm_fixtures as fx
from mllm import registry
from mllm import presets, projector, resampler
from mllm.config import from_dict
from mllm.model import ImageTokenMismatch, build_vlm
from mllm.templates import get as get_template
from pipelines.errors import ConfigError

TINY = presets.MODELS["tiny"]


@pytest.fixture(autouse=True)
def one_thread():
    with fx.single_thread():
        yield


def test_registered_beside_mlp2x_gelu_and_accepted_by_the_config():
    assert {"mlp2x_gelu", "resampler", "resampler8", "resampler64"} <= set(registry.projectors())
    assert projector.build("resampler", 32, 64).num_queries == 32  # TinyGPT-V's count
    cfg = from_dict(presets.TINY, {"model.projector": "resampler16"})
    assert cfg.model.projector == "resampler16"
    with pytest.raises(ConfigError, match="unknown 'resampler7'"):
        from_dict(presets.TINY, {"model.projector": "resampler7"})


@pytest.mark.parametrize("patches", [1, 16, 49, 729])
def test_any_patch_count_becomes_exactly_n_tokens(patches):
    torch.manual_seed(0)
    r = projector.build("resampler8", 32, 64)
    out = r(torch.randn(3, patches, 32))
    assert out.shape == (3, 8, 64)
    assert r.num_image_tokens(patches) == 8


def test_the_image_token_count_follows_the_connector_through_the_vlm():
    tok = fx.local_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    vlm = build_vlm(dataclasses.replace(TINY, projector="resampler8"), image_id, len(tok))
    assert vlm.num_image_tokens == 8 != vlm.vision.num_patches == 16
    conv = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red."}]
    ids, labels = get_template("bunny").encode(conv, tok, vlm.num_image_tokens)
    assert ids.count(image_id) == 8
    pixels = torch.randn(1, 3, 32, 32)
    feats = vlm.image_features(pixels)
    assert feats.shape == (1, 8, TINY.lm.hidden_size)
    out = vlm(torch.tensor([ids]), pixel_values=pixels, labels=torch.tensor([labels]))
    assert torch.isfinite(out.loss)
    # the 8 placeholders hold the resampler's 8 outputs, in order
    embeds = vlm.embed(torch.tensor([ids]), pixels)[0]
    assert torch.equal(embeds[torch.tensor(ids) == image_id], feats[0])
    # a sequence expanded for the MLP's 16 patch tokens does not fit
    ids16, _ = get_template("bunny").encode(conv, tok, 16)
    with pytest.raises(ImageTokenMismatch):
        vlm(torch.tensor([ids16]), pixel_values=pixels)


def test_queries_and_cross_attention_learn():
    torch.manual_seed(0)
    r = resampler.Resampler(32, 64, num_queries=4, depth=2)
    before = {n: p.detach().clone() for n, p in r.named_parameters()}
    opt = torch.optim.SGD(r.parameters(), lr=0.1)
    feats = torch.randn(2, 16, 32)
    r(feats).pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in r.named_parameters() if not torch.equal(p, before[n])}
    assert "queries" in changed and "kv_in.weight" in changed
    assert any(n.startswith("blocks.1.attn") for n in changed)
    # every output token depends on the image: different images, different tokens
    a, b = r(feats[:1]), r(feats[1:])
    assert (a - b).abs().amax(-1).min() > 0


def test_bad_dimensions_are_collected():
    with pytest.raises(ConfigError) as e:
        resampler.Resampler(32, 64, num_queries=0, depth=0, num_heads=5)
    assert len(e.value.problems) == 3
