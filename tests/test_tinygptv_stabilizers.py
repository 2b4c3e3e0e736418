"""TinyGPT-V's stabilisers (QK-norm, post-attention RMSNorm) added to Phi and Llama LMs
at build time: where they sit, their dtype, that they train, survive export/reload and
LoRA, and that they change only the attention path."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import mllm_fixtures as fx
import mllm.tinygptv  # noqa: F401  (registers the options)
from mllm import export, lora, presets, stabilizers
from mllm.config import LoraConfig
from mllm.model import build_vlm
from pipelines.errors import ConfigError

TINY = presets.MODELS["tiny"]
N_LAYERS = TINY.lm.num_layers


@pytest.fixture(autouse=True)
def one_thread():
    with fx.single_thread():
        yield


def build(transforms=("stabilizers",), arch="phi", dtype="float32", seed=0):
    cfg = dataclasses.replace(TINY, transforms=list(transforms), dtype=dtype,
                              lm=dataclasses.replace(TINY.lm, arch=arch, num_kv_heads=2 if arch != "phi" else None))
    torch.manual_seed(seed)
    return build_vlm(cfg, image_token_id=5, vocab_size=300), cfg


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    n_img = (TINY.vision.image_size // TINY.vision.patch_size) ** 2
    ids = torch.cat([torch.randint(10, 300, (2, 3), generator=g), torch.full((2, n_img), 5),
                     torch.randint(10, 300, (2, 6), generator=g)], dim=1)
    return ids, torch.randn(2, 3, 32, 32, generator=g)


def attention(vlm, layer=0):
    return vlm.language_model.model.layers[layer].self_attn


@pytest.mark.parametrize("arch,out_slot", [("phi", "dense"), ("llama", "o_proj"), ("qwen2", "o_proj")])
def test_norms_are_in_every_attention_block_in_float32(arch, out_slot):
    vlm, _ = build(arch=arch, dtype="bfloat16")
    found = stabilizers.attention_modules(vlm.language_model)
    assert [slot for _, _, slot in found] == [out_slot] * N_LAYERS
    params = stabilizers.stabilizer_parameters(vlm)
    assert len(params) == 3 * N_LAYERS
    head_dim = TINY.lm.hidden_size // TINY.lm.num_heads
    for name, p in params.items():
        assert p.dtype == torch.float32, name
        want = TINY.lm.hidden_size if "out_norm" in name else head_dim
        assert p.shape == (want,) and torch.equal(p, torch.ones(want)), name
    # the LM itself stays in the model dtype
    assert attention(vlm).q_proj.weight.dtype == torch.bfloat16
    ids, px = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = vlm(ids, pixel_values=px).logits
    assert torch.isfinite(logits.float()).all()


def test_rmsnorm_computes_in_float32_and_returns_the_input_dtype():
    norm = stabilizers.RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = (torch.randn(3, 5, 4 * 8) * 30).bfloat16()  # 4 heads of 8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    h = x.float().view(3, 5, 4, 8)
    want = (h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight).view(3, 5, 32)
    assert torch.equal(y, want.bfloat16())


def test_queries_keys_and_attention_output_are_normalised_where_expected():
    vlm, _ = build()
    attn = attention(vlm)
    seen = {}
    attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn_out", o[0]))
    ids, px = batch()
    vlm(ids, pixel_values=px)
    x = torch.randn(2, 7, TINY.lm.hidden_size)
    head_dim = TINY.lm.hidden_size // TINY.lm.num_heads
    for proj in (attn.q_proj, attn.k_proj):  # per-head RMS 1 with weight 1
        rms = proj(x).view(2, 7, -1, head_dim).pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
    rms = attn.v_proj(x).view(2, 7, -1, head_dim).pow(2).mean(-1).sqrt()
    assert not torch.allclose(rms, torch.ones_like(rms), atol=1e-2)  # v is left alone
    out_rms = seen["attn_out"].pow(2).mean(-1).sqrt()
    assert torch.allclose(out_rms, torch.ones_like(out_rms), atol=1e-4)


def test_only_the_attention_path_differs_from_the_plain_model():
    plain, _ = build(())
    stab, _ = build()
    ids, px = batch()
    acts = {}

    def capture(model, tag):
        lm = model.language_model.model
        hooks = [model.vision.register_forward_hook(lambda m, i, o: acts.__setitem__((tag, "vision"), o)),
                 model.projector.register_forward_hook(lambda m, i, o: acts.__setitem__((tag, "proj"), o)),
                 lm.embed_tokens.register_forward_hook(lambda m, i, o: acts.__setitem__((tag, "embed"), o)),
                 lm.layers[0].input_layernorm.register_forward_hook(
                     lambda m, i, o: acts.__setitem__((tag, "ln0"), o)),
                 lm.layers[0].self_attn.v_proj.register_forward_hook(
                     lambda m, i, o: acts.__setitem__((tag, "v0"), o)),
                 lm.layers[0].self_attn.register_forward_hook(
                     lambda m, i, o: acts.__setitem__((tag, "attn0"), o[0])),
                 lm.layers[0].mlp.register_forward_hook(lambda m, i, o: acts.__setitem__((tag, "mlp0"), o))]
        logits = model(ids, pixel_values=px).logits
        for h in hooks:
            h.remove()
        return logits

    a, b = capture(plain, "plain"), capture(stab, "stab")
    for site in ("vision", "proj", "embed", "ln0", "v0", "mlp0"):
        # Phi's parallel block: the MLP reads the same normed input as attention.
        assert torch.equal(acts[("plain", site)], acts[("stab", site)]), site
    assert not torch.allclose(acts[("plain", "attn0")], acts[("stab", "attn0")], atol=1e-3)
    assert not torch.allclose(a, b, atol=1e-3)


def test_the_norms_train_with_one_optimizer_step():
    vlm, _ = build()
    vlm.requires_grad_(False)
    names = stabilizers.enable_training(vlm)
    assert len(names) == 3 * N_LAYERS
    params = stabilizers.stabilizer_parameters(vlm)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2)
    ids, px = batch()
    out = vlm(ids, pixel_values=px, labels=ids)
    out.loss.backward()
    opt.step()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(p, before[name]), name
    frozen = attention(vlm).q_proj.weight
    assert not frozen.requires_grad


def test_lora_leaves_the_norms_alone_and_the_norm_sees_the_lora_update():
    vlm, _ = build()
    vlm.requires_grad_(False)
    model = lora.apply(vlm, LoraConfig(r=4, alpha=8, dropout=0.0))
    stabilizers.enable_training(model)
    targets = lora.target_modules(vlm)
    assert targets and not any("stabilizer" in t for t in targets)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum("stabilizer_" in n for n in trainable) == 3 * N_LAYERS
    assert not any("stabilizer_" in n and "lora_" in n for n in trainable)
    attn = attention(vlm)
    with torch.no_grad():  # a non-zero LoRA update
        for m in (attn.q_proj, attn.k_proj):
            m.lora_B["default"].weight.normal_()
    ids, px = batch()
    model(input_ids=ids, pixel_values=px)
    # the hook moved from the wrapped base layer to the LoRA layer: applied once, after LoRA
    assert not attn.q_proj.base_layer._forward_hooks
    x = torch.randn(2, 7, TINY.lm.hidden_size)
    head_dim = TINY.lm.hidden_size // TINY.lm.num_heads
    rms = attn.q_proj(x).view(2, 7, -1, head_dim).pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
    raw = attn.q_proj.base_layer(x) + attn.q_proj.lora_B["default"](attn.q_proj.lora_A["default"](x)) * 2.0
    raw = raw.view(2, 7, -1, head_dim)
    want = raw / raw.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    assert torch.allclose(attn.q_proj(x).view(2, 7, -1, head_dim), want, atol=1e-5)
    # merging gives the same function, with the hook back on the merged base layer
    before = model(input_ids=ids, pixel_values=px).logits
    merged = lora.merge(model)
    after = merged(ids, pixel_values=px).logits
    assert torch.allclose(before, after, atol=1e-4)
    assert len(attention(merged).q_proj._forward_hooks) == 1


def test_trained_norms_survive_export_and_reload(tmp_path):
    vlm, cfg = build()
    with torch.no_grad():
        for p in stabilizers.stabilizer_parameters(vlm).values():
            p.normal_(1.0, 0.2)
    ids, px = batch()
    want = vlm(ids, pixel_values=px).logits
    tok = fx.local_tokenizer()
    full = presets.tiny({"model.transforms": ["stabilizers"]})
    folder = export.save(vlm, tok, full, "tinygptv", str(tmp_path / "final"), model_cfg=cfg)
    saved = stabilizers.saved_stabilizers(str(tmp_path / "final" / "language_model"))
    assert len(saved) == 3 * N_LAYERS and all(t.dtype == torch.float32 for t in saved.values())
    loaded = export.load(folder)
    for name, p in stabilizers.stabilizer_parameters(loaded.model).items():
        assert torch.equal(p, stabilizers.stabilizer_parameters(vlm)[name]), name
    assert torch.equal(loaded.model(ids, pixel_values=px).logits, want)
    # bfloat16 reload: the LM in bf16, the norms still float32 and exact
    bf = export.load(folder, dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in stabilizers.stabilizer_parameters(bf.model).values())
    assert attention(bf.model).q_proj.weight.dtype == torch.bfloat16


def test_a_folder_with_other_stabilisers_is_refused(tmp_path):
    vlm, cfg = build(("qk_norm",))
    tok = fx.local_tokenizer()
    folder = export.save(vlm, tok, presets.tiny(), "bunny", str(tmp_path / "f"), model_cfg=cfg)
    # qk_norm only: reloading with the post-attention norm as well starts that one fresh
    lm_folder = str(tmp_path / "f" / "language_model")
    again, _ = build(("stabilizers",))
    assert stabilizers.load_saved(again.language_model, lm_folder,
                                  (stabilizers.Q_NORM, stabilizers.K_NORM)) == 2 * N_LAYERS
    deeper = dataclasses.replace(TINY.lm, num_layers=N_LAYERS + 1)
    torch.manual_seed(0)
    big = build_vlm(dataclasses.replace(TINY, lm=deeper, transforms=["qk_norm"]), 5, 300)
    from pipelines.errors import InputError
    with pytest.raises(InputError, match="do not fit"):
        stabilizers.load_saved(big.language_model, lm_folder)
    assert folder


def test_listing_a_stabiliser_twice_is_a_config_error():
    with pytest.raises(ConfigError, match="listed twice"):
        build(("stabilizers", "qk_norm"))

    class NoAttention(torch.nn.Module):
        config = None

        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(2, 2)  # no k_proj / output projection

    with pytest.raises(ConfigError, match="Phi- and Llama-family"):
        stabilizers.add_stabilizers(NoAttention())
