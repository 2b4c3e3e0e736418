"""TinyGPT-V's connector and tower: transformers' BLIP-2 Q-Former (frozen, loaded from
BLIP-2 weights) + two trainable linear layers, the EVA tower with TinyGPT-V's ln_vision,
and the image-size change of stage 4 (position embeddings interpolated)."""
from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

import mllm_fixtures as fx
from mllm import blip2, eva, export, presets, projector, qformer, vision
from mllm.config import QFormerConfig, VisionConfig
from mllm.model import build_vlm, trainable_set
from pipelines.errors import InputError

TINY = presets.MODELS["tiny"]
Q = QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, proj_hidden_size=48,
                  num_query_tokens=6)
EVA = VisionConfig(arch="eva", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=28,
                   patch_size=14, select_layer=-1)


@pytest.fixture(autouse=True)
def one_thread():
    with fx.single_thread():
        yield


def tgv_cfg(**kw):
    return dataclasses.replace(TINY, vision=EVA, projector="qformer", qformer=Q, transforms=["tinygptv_norms"], **kw)


def test_the_connector_with_tinygptvs_dimensions():
    """32 queries over the vision tokens -> 768 -> 4096 -> 2560 (Phi-2), no activation between."""
    torch.manual_seed(0)
    conn = projector.build("qformer", 64, 2560)  # BLIP-2's Q-Former dimensions by default
    feats = torch.randn(2, 257, 64)  # EVA at 224 px: 16 x 16 patches + CLS
    out = conn(feats)
    assert out.shape == (2, 32, 2560) and conn.num_image_tokens(257) == 32
    assert conn.num_image_tokens(1025) == 32  # 448 px: still 32 tokens
    assert (conn.llama_proj.in_features, conn.llama_proj.out_features) == (768, 4096)
    assert (conn.llama_proj2.in_features, conn.llama_proj2.out_features) == (4096, 2560)
    q = conn.qformer.config
    assert (q.num_hidden_layers, q.num_attention_heads, q.intermediate_size, q.cross_attention_frequency,
            q.encoder_hidden_size, q.use_qformer_text_input) == (12, 12, 3072, 2, 64, False)
    with torch.no_grad():  # two linear layers and nothing between them
        x = conn.qformer(query_embeds=conn.query_tokens.expand(2, -1, -1), encoder_hidden_states=feats,
                         encoder_attention_mask=torch.ones(2, 257, dtype=torch.long)).last_hidden_state
        want = (x @ conn.llama_proj.weight.T + conn.llama_proj.bias) @ conn.llama_proj2.weight.T + conn.llama_proj2.bias
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    frozen = {n for n, p in conn.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in conn.named_parameters() if p.requires_grad}
    assert trainable == {"llama_proj.weight", "llama_proj.bias", "llama_proj2.weight", "llama_proj2.bias"}
    assert frozen == {n for n, _ in conn.named_parameters() if n.startswith("qformer.")} | {"query_tokens"}


def test_the_trainer_keeps_the_qformer_frozen_and_in_eval_mode():
    torch.manual_seed(0)
    vlm = build_vlm(tgv_cfg(), image_token_id=5, vocab_size=300)
    vlm.requires_grad_(False)
    names = trainable_set(vlm, vlm, tgv_cfg())
    assert {n for n in names if n.startswith("projector.")} == {
        "projector.llama_proj.weight", "projector.llama_proj.bias",
        "projector.llama_proj2.weight", "projector.llama_proj2.bias"}
    assert not any(n.startswith("vision.") for n in names)
    vlm.train()
    assert not vlm.projector.qformer.training and vlm.projector.llama_proj.training  # no Q-Former dropout
    assert not vlm.vision.model.training
    before = {n: p.detach().clone() for n, p in vlm.projector.named_parameters()}
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.cat([torch.randint(10, 300, (2, 3)), torch.full((2, Q.num_query_tokens), 5),
                     torch.randint(10, 300, (2, 4))], dim=1)
    vlm(ids, pixel_values=torch.randn(2, 3, 28, 28), labels=ids).loss.backward()
    opt.step()
    for n, p in vlm.projector.named_parameters():
        assert torch.equal(p, before[n]) == (n.startswith("qformer.") or n == "query_tokens"), n
    unfrozen = dataclasses.replace(tgv_cfg(), qformer=dataclasses.replace(Q, freeze=False))
    vlm2 = build_vlm(unfrozen, image_token_id=5, vocab_size=300).requires_grad_(False)
    assert "projector.query_tokens" in trainable_set(vlm2, vlm2, unfrozen)


@pytest.fixture(scope="module")
def blip2_folders(tmp_path_factory):
    """A tiny Blip2Model and a tiny Blip2ForConditionalGeneration, saved as transformers does."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Model, OPTConfig
    root = tmp_path_factory.mktemp("blip2")
    conf = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        text_config=OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                              word_embed_proj_dim=16).to_dict(), num_query_tokens=6)
    out = {}
    for i, cls in enumerate((Blip2Model, Blip2ForConditionalGeneration)):
        torch.manual_seed(i)
        m = cls(conf)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        folder = str(root / cls.__name__)
        m.save_pretrained(folder, max_shard_size="100KB" if i else "50MB")
        out[cls.__name__] = (folder, m)
    return out


@pytest.mark.parametrize("kind", ["Blip2Model", "Blip2ForConditionalGeneration"])
def test_qformer_and_eva_load_from_a_saved_blip2(blip2_folders, kind):
    folder, saved = blip2_folders[kind]
    conn = qformer.QFormerConnector(32, 64, dataclasses.replace(Q, name_or_path=folder))
    assert conn.load_pretrained() is True
    want = saved.qformer.state_dict()
    got = conn.qformer.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(conn.query_tokens, saved.query_tokens)
    tower = eva.build(dataclasses.replace(EVA, name_or_path=folder))
    for k, v in saved.vision_model.state_dict().items():
        assert torch.equal(tower.model.state_dict()[k], v), k
    # TinyGPT-V's ln_vision: post_layernorm's weights with torch's LayerNorm eps (1e-5), over
    # every token of the last block, CLS included
    px = torch.randn(2, 3, 28, 28)
    hidden = saved.vision_model(pixel_values=px, output_hidden_states=True).hidden_states[-1]
    ln = saved.vision_model.post_layernorm
    want = torch.nn.functional.layer_norm(hidden, ln.normalized_shape, ln.weight, ln.bias, 1e-5)
    got = tower(px)
    assert got.shape == (2, 5, 32) and tower.num_patches == 5
    torch.testing.assert_close(got, want)
    assert ln.eps == 1e-6 and not torch.allclose(got, saved.vision_model(pixel_values=px).last_hidden_state,
                                                 atol=1e-7, rtol=0)


def test_the_config_path_loads_blip2_at_the_start_and_the_export_needs_it_no_more(blip2_folders, tmp_path):
    src, saved = blip2_folders["Blip2Model"]
    folder = str(tmp_path / "blip2-copy")
    shutil.copytree(src, folder)
    cfg = presets.tiny({"model.vision": dataclasses.asdict(dataclasses.replace(EVA, name_or_path=folder)),
                        "model.projector": "qformer", "model.transforms": ["tinygptv_norms"],
                        "model.qformer": dataclasses.asdict(dataclasses.replace(Q, name_or_path=folder))})
    from mllm.model import from_config
    tok = fx.local_tokenizer()
    vlm = from_config(cfg, tok)
    assert torch.equal(vlm.projector.query_tokens, saved.query_tokens)
    assert build_vlm(cfg.model, 5, 300).projector.query_tokens.abs().sum() > 0  # fresh, not BLIP-2's
    assert not torch.equal(build_vlm(cfg.model, 5, 300).projector.query_tokens, saved.query_tokens)
    out = export.save(vlm, tok, cfg, "tinygptv", str(tmp_path / "final"), model_cfg=cfg.model)
    shutil.rmtree(folder)  # the export carries the Q-Former and the tower itself
    loaded = export.load(out)
    assert torch.equal(loaded.model.projector.query_tokens, saved.query_tokens)
    for k, v in saved.qformer.state_dict().items():
        assert torch.equal(loaded.model.projector.qformer.state_dict()[k], v), k


def test_blip2_errors_are_one_clear_line(blip2_folders, tmp_path, monkeypatch):
    folder, _ = blip2_folders["Blip2Model"]
    wrong = qformer.QFormerConnector(32, 64, dataclasses.replace(Q, name_or_path=folder, num_layers=3,
                                                                 num_query_tokens=32))
    with pytest.raises(InputError, match="num_hidden_layers 2 there, 3 here.*num_query_tokens 6 there, 32 here"):
        wrong.load_pretrained()
    with pytest.raises(InputError, match="vision width"):
        qformer.QFormerConnector(48, 64, dataclasses.replace(Q, name_or_path=folder)).load_pretrained()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    with pytest.raises(InputError, match="no model.safetensors"):
        qformer.QFormerConnector(32, 64, dataclasses.replace(Q, name_or_path=str(empty))).load_pretrained()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="cannot read a BLIP-2 config"):
        blip2.config("Salesforce/blip2-flan-t5-xxl-not-cached")


# ------------------------------------------------------------------ image size

def _interpolated_reference(model, px):
    """transformers' own runtime interpolation of the position embeddings."""
    return model(pixel_values=px, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-1]


def test_eva_at_twice_the_size_matches_transformers_interpolation():
    torch.manual_seed(0)
    tower = eva.build(EVA)
    ref = eva.build(EVA)
    ref.model.load_state_dict(tower.model.state_dict())
    eva.resize(tower, 56)
    assert tower.image_size == 56 and tower.num_patches == 17 and tower.model.config.image_size == 56
    assert tower.model.embeddings.position_embedding.shape == (1, 17, 32)
    px = torch.randn(2, 3, 56, 56)
    hidden = tower.model(pixel_values=px, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, _interpolated_reference(ref.model, px), atol=1e-5, rtol=1e-5)
    # the CLS position is kept as it was
    assert torch.equal(tower.model.embeddings.position_embedding[:, 0], ref.model.embeddings.position_embedding[:, 0])


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_clip_and_siglip_towers_resize_the_same_way(arch):
    cfg = VisionConfig(arch=arch, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=32,
                       patch_size=8, select_layer=-1)
    torch.manual_seed(0)
    tower, ref = vision.build(cfg), vision.build(cfg)
    ref.model.load_state_dict(tower.model.state_dict())
    eva.resize(tower, 64)
    assert tower.image_size == 64 and tower.num_patches == 64
    px = torch.randn(1, 3, 64, 64)
    got = tower.model(pixel_values=px, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got, _interpolated_reference(ref.model, px), atol=1e-5, rtol=1e-5)
