"""TinyGPT-V's norms: the QK LayerNorm is transformers' PhiConfig(qk_layernorm=True), the
post-attention RMSNorm and the LM's own norms train as in TinyGPT-V, the same norms are
options on Llama/Qwen2, Warren's RMSNorm variant stays available under its own name, and
a saved LM never loses its norms silently."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import mllm_fixtures as fx
from mllm import export, lora, presets, stabilizers
from mllm.config import LoraConfig
from mllm.model import build_lm, build_vlm, trainable_set
from pipelines.errors import ConfigError

TINY = presets.MODELS["tiny"]
N_LAYERS = TINY.lm.num_layers
HEAD_DIM = TINY.lm.hidden_size // TINY.lm.num_heads
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    with fx.single_thread():
        yield


def build(transforms=("tinygptv_norms",), arch="phi", dtype="float32", seed=0):
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


def randomize_norms(module, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))


# ------------------------------------------------------------- the QK-norm

def test_qk_norm_equals_transformers_phi_qk_layernorm_logit_for_logit():
    from transformers import PhiConfig, PhiForCausalLM
    torch.manual_seed(0)
    lm = build_lm(TINY.lm, 300, transforms=["qk_layernorm"])
    assert type(lm) is PhiForCausalLM and lm.config.qk_layernorm is True  # transformers' own class
    randomize_norms(lm)
    c = TINY.lm
    reference = PhiForCausalLM(PhiConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                         intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                         num_attention_heads=c.num_heads, max_position_embeddings=512,
                                         qk_layernorm=True))
    reference.load_state_dict(lm.state_dict(), strict=True)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(2))
    assert torch.equal(lm(ids).logits, reference(ids).logits)
    # TinyGPT-V's: LayerNorm(head_dim, eps=config.layer_norm_eps), mean subtracted, with a bias
    ln = lm.model.layers[0].self_attn.q_layernorm
    assert type(ln) is torch.nn.LayerNorm and ln.normalized_shape == (HEAD_DIM,)
    assert ln.eps == lm.config.layer_norm_eps == 1e-5 and ln.bias is not None
    x = torch.randn(3, HEAD_DIM)
    want = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(ln(x), want * ln.weight + ln.bias)


def test_tinygptv_norms_use_the_same_qk_layernorm_and_differ_from_warrens_rmsnorm_variant():
    tgv, _ = build(("tinygptv_norms",))
    lm = tgv.language_model
    assert lm.config.qk_layernorm is True and lm.config.warren_norms == {"qk": None, "post_attn": True}
    attn = attention(tgv)
    assert attn.qk_layernorm and type(attn.q_layernorm) is torch.nn.LayerNorm  # transformers' code path
    assert not any(isinstance(m, stabilizers.HeadLayerNorm) for m in lm.modules())
    # the RMSNorm QK-norm Warren had is another function: same weights, other logits
    a, _ = build(("qk_layernorm",))
    b, _ = build(("qk_norm",))
    ids, px = batch()
    assert not torch.allclose(a(ids, pixel_values=px).logits, b(ids, pixel_values=px).logits, atol=1e-3)


def test_the_post_attention_norm_is_an_rmsnorm_on_the_attention_output_before_the_residual():
    plain, _ = build(("qk_layernorm",))
    tgv, _ = build(("tinygptv_norms",))
    norm = attention(tgv).stabilizer_out_norm
    assert isinstance(norm, stabilizers.RMSNorm) and norm.eps == 1e-6 and norm.dim == TINY.lm.hidden_size
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, TINY.lm.hidden_size))
    outs = {}
    for tag, m in (("plain", plain), ("tgv", tgv)):
        attention(m).register_forward_hook(lambda mod, i, o, tag=tag: outs.__setitem__(tag, o[0]))
        m(*batch()[:1], pixel_values=batch()[1])
    h = outs["plain"].float()
    want = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(outs["tgv"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_other_families_get_the_same_norms_as_options(arch):
    vlm, cfg = build(("tinygptv_norms",), arch=arch, dtype="bfloat16")
    lm = vlm.language_model
    assert type(lm).__name__ == f"{type(lm).__mro__[1].__name__.replace('ForCausalLM', '')}WarrenForCausalLM"
    assert lm.config.warren_norms == {"qk": "layernorm", "post_attn": True}
    attn = attention(vlm)
    assert isinstance(attn.q_layernorm, stabilizers.HeadLayerNorm) and attn.q_layernorm.eps == 1e-5
    assert attn.q_layernorm.weight.dtype == torch.float32  # hooked norms stay float32
    x = torch.randn(2, 7, TINY.lm.hidden_size)
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):  # per head: mean 0, variance 1 (weight 1, bias 0)
            h = proj.float()(x).view(2, 7, -1, HEAD_DIM)
            torch.testing.assert_close(h.mean(-1), torch.zeros_like(h.mean(-1)), atol=1e-4, rtol=0)
            torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones_like(h.mean(-1)), atol=1e-3, rtol=0)
    names = trainable_set(vlm.requires_grad_(False), vlm, cfg)
    lm_names = {n.removeprefix("language_model.") for n in names if n.startswith("language_model.")}
    want = {f"model.layers.{i}.{s}" for i in range(N_LAYERS) for s in (
        "self_attn.q_layernorm.weight", "self_attn.k_layernorm.weight", "self_attn.stabilizer_out_norm.weight",
        "input_layernorm.weight")} | {"model.norm.weight"}
    assert lm_names == want  # the pre-MLP post_attention_layernorm has no Phi counterpart: frozen


# ----------------------------------------------------------- what trains

def test_tinygptv_trains_the_norm_weights_not_their_biases_in_float32():
    vlm, cfg = build(("tinygptv_norms",), dtype="bfloat16")
    vlm.requires_grad_(False)
    names = set(trainable_set(vlm, vlm, cfg))
    norms = {n for n in names if not n.startswith("projector.")}
    assert norms == {f"language_model.model.layers.{i}.{s}" for i in range(N_LAYERS) for s in (
        "self_attn.q_layernorm.weight", "self_attn.k_layernorm.weight", "self_attn.stabilizer_out_norm.weight",
        "input_layernorm.weight")} | {"language_model.model.final_layernorm.weight"}
    assert names - norms == {n for n, _ in vlm.named_parameters() if n.startswith("projector.")}
    params = dict(vlm.named_parameters())
    for n in norms:
        assert params[n].dtype == torch.float32, n
        bias = n.replace(".weight", ".bias")
        assert bias not in params or not params[bias].requires_grad  # frozen, as TinyGPT-V
    assert attention(vlm).q_proj.weight.dtype == torch.bfloat16  # the rest stays in the model dtype
    before = {n: params[n].detach().clone() for n in norms}
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2)
    ids, px = batch()
    vlm(ids, pixel_values=px, labels=ids).loss.backward()  # bf16 weights, float32 norms, no autocast
    opt.step()
    for n in norms:
        assert params[n].grad is not None and params[n].grad.abs().sum() > 0, n
        assert not torch.equal(params[n], before[n]), n


def test_lora_leaves_the_hooked_norms_alone_and_the_norm_sees_the_lora_update():
    vlm, cfg = build(("stabilizers",))  # Warren's RMSNorm variant: hooks on q_proj / k_proj
    vlm.requires_grad_(False)
    model = lora.apply(vlm, LoraConfig(r=4, alpha=8, dropout=0.0))
    trainable = trainable_set(model, vlm, cfg)
    targets = lora.target_modules(vlm)
    assert targets and not any("stabilizer" in t for t in targets)
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
    raw = attn.q_proj.base_layer(x) + attn.q_proj.lora_B["default"](attn.q_proj.lora_A["default"](x)) * 2.0
    raw = raw.view(2, 7, -1, HEAD_DIM)
    want = raw / raw.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(attn.q_proj(x).view(2, 7, -1, HEAD_DIM), want, atol=1e-5, rtol=1e-5)
    before = model(input_ids=ids, pixel_values=px).logits
    merged = lora.merge(model)
    torch.testing.assert_close(merged(ids, pixel_values=px).logits, before, atol=1e-4, rtol=1e-4)
    assert len(attention(merged).q_proj._forward_hooks) == 1


def test_lora_targets_narrow_to_the_attention_projections():
    vlm, _ = build(("tinygptv_norms",))
    names = lora.target_modules(vlm, suffixes=["q_proj", "k_proj", "v_proj", "dense"])
    assert names == [f"language_model.model.layers.{i}.self_attn.{p}" for i in range(N_LAYERS)
                     for p in ("q_proj", "k_proj", "v_proj", "dense")]
    with pytest.raises(ConfigError, match="lora.targets"):
        lora.target_modules(vlm, suffixes=["query_key_value"])


# ------------------------------------------------------------- save / reload

def _run(code: str) -> subprocess.CompletedProcess:
    """Python in a fresh process: transformers only, nothing of Warren registered."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_a_tinygptv_model_reloads_with_its_norms_and_plain_transformers_refuses_it(tmp_path):
    vlm, cfg = build(("tinygptv_norms",))
    randomize_norms(vlm.language_model)
    ids, px = batch()
    want = vlm(ids, pixel_values=px).logits
    folder = export.save(vlm, fx.local_tokenizer(), presets.tiny({"model.transforms": ["tinygptv_norms"]}),
                         "tinygptv", str(tmp_path / "final"), model_cfg=cfg)
    loaded = export.load(folder)
    mine = dict(loaded.model.language_model.named_parameters())
    for name, p in vlm.language_model.named_parameters():
        assert torch.equal(mine[name], p), name
    assert torch.equal(loaded.model(ids, pixel_values=px).logits, want)
    bf = export.load(folder, dtype="bfloat16")
    assert attention(bf.model).stabilizer_out_norm.weight.dtype == torch.float32
    assert attention(bf.model).q_proj.weight.dtype == torch.bfloat16

    lm_dir = os.path.join(folder, "language_model")
    auto = _run(f"from transformers import AutoModelForCausalLM as A; A.from_pretrained({lm_dir!r})")
    assert auto.returncode != 0 and "phi_warren" in auto.stderr  # refused, not loaded without its norms
    direct = _run("import logging; logging.basicConfig(); from transformers import PhiForCausalLM as P; "
                  f"P.from_pretrained({lm_dir!r})")
    # the class named explicitly: transformers says loudly what it drops (never silently)
    assert "phi_warren" in direct.stderr and "stabilizer_out_norm" in direct.stderr
    # with Warren's classes registered, transformers' Auto class keeps them
    from transformers import AutoModelForCausalLM
    again = AutoModelForCausalLM.from_pretrained(lm_dir)
    assert type(again).__name__ == "PhiWarrenForCausalLM"
    for name, p in again.named_parameters():
        assert torch.equal(p, mine[name]), name


def test_a_qk_layernorm_only_phi_survives_a_plain_transformers_reload(tmp_path):
    vlm, cfg = build(("qk_layernorm",))
    randomize_norms(vlm.language_model)
    folder = export.save(vlm, fx.local_tokenizer(), presets.tiny(), "bunny", str(tmp_path / "f"), model_cfg=cfg)
    lm_dir = os.path.join(folder, "language_model")
    code = ("import torch; from transformers import AutoModelForCausalLM as A; "
            f"m = A.from_pretrained({lm_dir!r}); a = m.model.layers[1].self_attn; "
            "print(type(m).__name__, m.config.qk_layernorm, a.q_layernorm.weight.tolist(), a.k_layernorm.bias.tolist())")
    r = _run(code)
    assert r.returncode == 0, r.stderr
    out, a = r.stdout.strip(), attention(vlm, 1)
    assert out.startswith("PhiForCausalLM True ")  # transformers' own class, its own config flag
    assert out.endswith(f"{a.q_layernorm.weight.tolist()} {a.k_layernorm.bias.tolist()}")  # the trained values


def test_conflicting_or_repeated_norms_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="listed twice"):
        build(("tinygptv_norms", "tinygptv_norms"))
    with pytest.raises(ConfigError, match="qk norm"):
        build(("qk_layernorm", "qk_norm"))
    # a saved LM with Warren's RMSNorm QK-norm asked to load with TinyGPT-V's LayerNorm one
    vlm, cfg = build(("qk_norm",))
    folder = export.save(vlm, fx.local_tokenizer(), presets.tiny(), "bunny", str(tmp_path / "f"), model_cfg=cfg)
    lm_cfg = dataclasses.replace(TINY.lm, name_or_path=os.path.join(folder, "language_model"))
    with pytest.raises(ConfigError, match="already has a rmsnorm QK-norm"):
        build_lm(lm_cfg, transforms=["qk_layernorm"])
    # and loading it with no transforms keeps its norms (they are in its config)
    kept = build_lm(lm_cfg)
    assert hasattr(kept.model.layers[0].self_attn, stabilizers.Q_NORM)


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
