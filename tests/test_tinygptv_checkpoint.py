"""TinyGPT-V checkpoints load onto Warren's model and reproduce TinyGPT-V's logits.

The reference (tests/tinygptv_reference.py) is TinyGPT-V's model re-derived from its
code, with its module names: its state dict has TinyGPT-V's keys. Its frozen parts are
set from a tiny transformers Phi (the `--lm` base, q/k/v fused per head as TinyGPT-V's
query_key_value) and a tiny BLIP-2 (the `--blip2` base, renamed to LAVIS' keys by hand
below); its trained parts (LoRA, norms, llama_proj/llama_proj2) are random. The
checkpoint is what TinyGPT-V's runner writes: the trained parameters and the buffers."""
from __future__ import annotations

import json
import os

import pytest
import torch

import mllm_fixtures as fx
import tinygptv_reference as ref
from mllm import export, tinygptv_checkpoint
from pipelines.errors import InputError

DIMS = dict(hidden=64, heads=4, inner=128, depth=2, rotary_dim=8, patch=14, vdim=32, vdepth=2, vheads=2,
            vhidden=64, qhidden=32, qheads=2, qinner=64, qdepth=2, nquery=4, proj_hidden=48, r=4, alpha=16)
IMAGE = 28


@pytest.fixture(autouse=True)
def one_thread():
    with fx.single_thread():
        yield


def _noise(module, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def base_models(root, tok, seed):
    """A tiny transformers Phi and a tiny BLIP-2 saved with save_pretrained (the --lm and
    --blip2 bases), with random weights."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, OPTConfig, PhiConfig,
                              PhiForCausalLM)
    torch.manual_seed(seed)
    hd = DIMS["hidden"] // DIMS["heads"]
    phi = PhiForCausalLM(PhiConfig(vocab_size=max(512, len(tok)), hidden_size=DIMS["hidden"],
                                   intermediate_size=DIMS["inner"], num_hidden_layers=DIMS["depth"],
                                   num_attention_heads=DIMS["heads"], max_position_embeddings=256,
                                   partial_rotary_factor=DIMS["rotary_dim"] / hd, initializer_range=0.2))
    _noise(phi, seed)
    conf = Blip2Config(
        vision_config=dict(hidden_size=DIMS["vdim"], intermediate_size=DIMS["vhidden"],
                           num_hidden_layers=DIMS["vdepth"], num_attention_heads=DIMS["vheads"],
                           image_size=IMAGE, patch_size=DIMS["patch"]),
        qformer_config=dict(hidden_size=DIMS["qhidden"], num_hidden_layers=DIMS["qdepth"],
                            num_attention_heads=DIMS["qheads"], intermediate_size=DIMS["qinner"]),
        text_config=OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                              num_attention_heads=2, word_embed_proj_dim=16).to_dict(),
        num_query_tokens=DIMS["nquery"])
    blip = Blip2ForConditionalGeneration(conf)
    _noise(blip, seed + 1)
    with torch.no_grad():  # BLIP-2's EVA has no key bias: the middle third of qkv.bias is 0
        for layer in blip.vision_model.encoder.layers:
            d = DIMS["vdim"]
            layer.self_attn.qkv.bias[d:2 * d] = 0
    lm_dir, blip_dir = os.path.join(root, "phi"), os.path.join(root, "blip2")
    phi.save_pretrained(lm_dir)
    blip.save_pretrained(blip_dir, max_shard_size="200KB")  # sharded: only the needed shards are read
    return phi, blip, lm_dir, blip_dir


def lavis_from_hf(model: ref.MiniGPT4Ref, phi, blip):
    """Set the reference's frozen parts from the transformers models, renaming by hand:
    transformers' BLIP-2 -> LAVIS' EVA / BERT Q-Former, transformers' Phi -> TinyGPT-V's
    fused query_key_value."""
    v, q, lm = blip.vision_model, blip.qformer, model.phi
    with torch.no_grad():
        e = model.visual_encoder
        e.cls_token.copy_(v.embeddings.class_embedding)
        e.pos_embed.copy_(v.embeddings.position_embedding)
        e.patch_embed.proj.weight.copy_(v.embeddings.patch_embedding.weight)
        e.patch_embed.proj.bias.copy_(v.embeddings.patch_embedding.bias)
        d = DIMS["vdim"]
        for blk, layer in zip(e.blocks, v.encoder.layers):
            for a, b in ((blk.norm1, layer.layer_norm1), (blk.norm2, layer.layer_norm2),
                         (blk.attn.proj, layer.self_attn.projection), (blk.mlp.fc1, layer.mlp.fc1),
                         (blk.mlp.fc2, layer.mlp.fc2)):
                a.load_state_dict(b.state_dict())
            blk.attn.qkv.weight.copy_(layer.self_attn.qkv.weight)
            blk.attn.q_bias.copy_(layer.self_attn.qkv.bias[:d])
            blk.attn.v_bias.copy_(layer.self_attn.qkv.bias[2 * d:])
        model.ln_vision.load_state_dict(v.post_layernorm.state_dict())
        bert = model.Qformer.bert
        bert.embeddings.LayerNorm.load_state_dict(q.layernorm.state_dict())
        for mine, theirs in zip(bert.encoder.layer, q.encoder.layer):
            for kind in ("attention", "crossattention"):
                if hasattr(mine, kind):
                    m, t = getattr(mine, kind), getattr(theirs, kind)
                    getattr(m, "self").load_state_dict(t.attention.state_dict())
                    m.output.load_state_dict(t.output.state_dict())
            mine.intermediate_query.load_state_dict(theirs.intermediate_query.state_dict())
            mine.output_query.load_state_dict(theirs.output_query.state_dict())
        model.query_tokens.copy_(blip.query_tokens)
        lm.model.embed_tokens.weight.copy_(phi.model.embed_tokens.weight)
        lm.lm_head.load_state_dict(phi.lm_head.state_dict())
        lm.model.final_layernorm.load_state_dict(phi.model.final_layernorm.state_dict())
        for mine, theirs in zip(lm.model.layers, phi.model.layers):
            a, t = mine.self_attn, theirs.self_attn
            a.query_key_value.weight.copy_(ref.fuse_qkv(t.q_proj.weight, t.k_proj.weight, t.v_proj.weight,
                                                        DIMS["heads"]))
            a.query_key_value.bias.copy_(ref.fuse_qkv(t.q_proj.bias, t.k_proj.bias, t.v_proj.bias, DIMS["heads"]))
            a.dense.weight.copy_(t.dense.weight)
            a.dense.bias.copy_(t.dense.bias)
            mine.mlp.load_state_dict(theirs.mlp.state_dict())
            mine.input_layernorm.load_state_dict(theirs.input_layernorm.state_dict())


def train_like_tinygptv(model: ref.MiniGPT4Ref, seed: int):
    """Random values for what TinyGPT-V trains (LoRA, norm weights, the linear layers);
    biases of norms stay as they were (frozen in TinyGPT-V)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "llama_proj" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith(("layernorm.weight", "post_layernorm.weight")):
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)


def build_reference(tok, phi, blip, adapter="default", image=IMAGE):
    torch.manual_seed(7)
    m = ref.MiniGPT4Ref(vocab=phi.config.vocab_size, image=IMAGE, adapter=adapter, **DIMS)
    lavis_from_hf(m, phi, blip)
    train_like_tinygptv(m, 11)
    if image != IMAGE:  # stage 4: TinyGPT-V builds EVA at 448 from the 224 weights
        with torch.no_grad():
            m.visual_encoder.pos_embed = torch.nn.Parameter(
                ref.lavis_interpolate_pos_embed(m.visual_encoder.pos_embed, image // DIMS["patch"]))
    return m.eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tinygptv-bases"))
    tok = fx.local_tokenizer()
    tok_dir = os.path.join(root, "tokenizer")
    tok.save_pretrained(tok_dir)
    phi, blip, lm_dir, blip_dir = base_models(root, tok, seed=0)
    other = base_models(os.path.join(root, "other"), tok, seed=100)
    return {"tok": tok, "tok_dir": tok_dir, "phi": phi, "blip": blip, "lm": lm_dir, "blip2": blip_dir,
            "other_lm": other[2], "other_blip2": other[3]}


def tinygptv_inputs(tok, stage: int):
    """The sample the TinyGPT-V way (minigpt_base.prompt_wrap + the answer + end_sym):
    the prompt split at <ImageHere>, each piece and the answer tokenized on their own."""
    def t(s):
        return tok(s, add_special_tokens=False)["input_ids"]
    if stage == 3:
        prompt = "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "
        question = "Describe this image in detail."
    else:
        prompt = "[INST] <Img><ImageHere></Img> [refer] give me the location of the red square  [/INST]"
        question = "[refer] give me the location of the red square"
    before, after = prompt.split("<ImageHere>")
    answer = "a red square on white." if stage == 3 else "{<10><15><80><85>}"
    conv = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return conv, t(before), t(after), t(answer + "###")


def checkpoint(model, path, conf, full=False):
    state = model.state_dict() if full else model.trainable_state_dict()
    torch.save({"model": state, "config": conf, "epoch": 4, "optimizer": {"state": {}, "param_groups": []}}, path)
    return state


STAGE_CONFIGS = {
    3: {"model": {"arch": "minigpt4", "prompt_template": "###Human: {} ###Assistant: ", "lora_r": 4,
                  "lora_alpha": 16, "end_sym": "###"}},
    4: {"model": {"arch": "minigpt_v2", "image_size": 2 * IMAGE, "lora_r": 4, "lora_alpha": 16,
                  "chat_template": True, "end_sym": "###"}},
}


@pytest.mark.parametrize("stage,adapter,full", [(3, "default", False), (4, "default", False),
                                                (3, None, False), (4, "default", True)],
                         ids=["stage3", "stage4-448px", "peft-0.2-keys", "full-dump"])
def test_a_tinygptv_checkpoint_reproduces_its_logits(bases, tmp_path, stage, adapter, full):
    tok, image = bases["tok"], IMAGE if stage == 3 else 2 * IMAGE
    model = build_reference(tok, bases["phi"], bases["blip"], adapter, image)
    ckpt = str(tmp_path / "checkpoint_4.pth")
    state = checkpoint(model, ckpt, STAGE_CONFIGS[stage], full)
    if not full:  # exactly what TinyGPT-V trains, plus its one buffer
        assert {k for k in state if "llama_model" not in k} == {
            "llama_proj.weight", "llama_proj.bias", "llama_proj2.weight", "llama_proj2.bias",
            "Qformer.bert.embeddings.position_ids"}
    # a full dump carries every weight: the bases may then be anything of the same shape
    lm, blip2 = (bases["other_lm"], bases["other_blip2"]) if full else (bases["lm"], bases["blip2"])
    out = str(tmp_path / "imported")
    summary = tinygptv_checkpoint.import_checkpoint(ckpt, out, lm=lm, blip2=blip2, tokenizer=bases["tok_dir"])
    assert summary["stage"] == stage and summary["image_size"] == image and summary["keys"] == len(state)
    loaded = export.load(out)
    assert loaded.meta["template"] == ("tinygptv-instruct" if stage == 3 else "tinygptv")
    assert loaded.model.vision.image_size == image and loaded.model.num_image_tokens == DIMS["nquery"]

    conv, before, after, answer = tinygptv_inputs(tok, stage)
    ids, labels = loaded.template.encode(conv, tok, loaded.model.num_image_tokens)
    bos = tok.eos_token_id  # Phi-2's bos is its eos, <|endoftext|>; the local tokenizer's too
    assert ids == [bos] + before + [loaded.model.image_token_id] * DIMS["nquery"] + after + answer
    assert labels == [-100] * (len(ids) - len(answer)) + answer
    px = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.logits(px, bos, before, after, answer)
        got = loaded.model(torch.tensor([ids]), pixel_values=px).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)

    with open(os.path.join(out, "tinygptv_import.json"), encoding="utf-8") as f:
        report = json.load(f)["report"]
    sources = {k for keys in report["loaded"].values() for k in keys}
    assert sources | set(report["merged_lora"]) | set(report["ignored"]) == set(state)
    assert report["ignored"]["Qformer.bert.embeddings.position_ids"].startswith("buffer")
    assert report["lora_scale"] == DIMS["alpha"] / DIMS["r"]


def test_the_merge_is_exact_for_every_lora_layer(bases, tmp_path):
    """q/k/v rows of query_key_value's LoRA update land in q/k/v_proj, head by head."""
    model = build_reference(bases["tok"], bases["phi"], bases["blip"])
    ckpt = str(tmp_path / "c.pth")
    checkpoint(model, ckpt, STAGE_CONFIGS[3])
    out = str(tmp_path / "imported")
    tinygptv_checkpoint.import_checkpoint(ckpt, out, lm=bases["lm"], blip2=bases["blip2"], tokenizer=bases["tok_dir"])
    lm = export.load(out).model.language_model
    heads, hd = DIMS["heads"], DIMS["hidden"] // DIMS["heads"]
    for i, layer in enumerate(model.phi.model.layers):
        qkv = layer.self_attn.query_key_value
        fused = qkv.weight + (qkv.lora_B["default"].weight @ qkv.lora_A["default"].weight) * qkv.scale
        mine = lm.model.layers[i].self_attn
        for j, proj in enumerate((mine.q_proj, mine.k_proj, mine.v_proj)):
            for h in range(heads):  # head h of q is rows 3h*hd.. of the fused matrix, then k, then v
                rows = fused[(3 * h + j) * hd:(3 * h + j + 1) * hd]
                torch.testing.assert_close(proj.weight[h * hd:(h + 1) * hd], rows, atol=1e-6, rtol=1e-6)
        d = layer.self_attn.dense
        torch.testing.assert_close(mine.dense.weight, d.weight + d.lora_B["default"].weight @ d.lora_A["default"].weight
                                   * d.scale, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mine.stabilizer_out_norm.weight, layer.post_layernorm.weight)
        assert torch.equal(mine.q_layernorm.bias, torch.zeros(hd))  # fresh and frozen in TinyGPT-V


def test_unknown_keys_stop_the_import_naming_them(bases, tmp_path):
    model = build_reference(bases["tok"], bases["phi"], bases["blip"])
    state = model.trainable_state_dict()
    state["llama_model.base_model.model.model.layers.0.self_attn.rotary.freq"] = torch.zeros(2)
    state["t5_proj.weight"] = torch.zeros(2, 2)
    ckpt = str(tmp_path / "c.pth")
    torch.save({"model": state, "config": STAGE_CONFIGS[3]}, ckpt)
    with pytest.raises(InputError, match=r"2 key\(s\).*(t5_proj|rotary\.freq)"):
        tinygptv_checkpoint.import_checkpoint(ckpt, str(tmp_path / "o"), lm=bases["lm"], blip2=bases["blip2"],
                                              tokenizer=bases["tok_dir"])
    assert not os.path.exists(tmp_path / "o")


def test_the_command_imports_and_refuses_bad_input_in_one_line(bases, tmp_path, capsys):
    from flows.cli import main
    model = build_reference(bases["tok"], bases["phi"], bases["blip"])
    ckpt = str(tmp_path / "c.pth")
    torch.save({"model": model.trainable_state_dict()}, ckpt)  # no config: --stage says which
    out = str(tmp_path / "out")
    common = ["--lm", bases["lm"], "--blip2", bases["blip2"], "--tokenizer", bases["tok_dir"]]
    assert main(["import-tinygptv", ckpt, "--output", out, *common]) == 2
    assert "pass --stage" in capsys.readouterr().err
    assert main(["import-tinygptv", ckpt, "--output", out, "--stage", "3", *common]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["template"] == "tinygptv-instruct" and os.path.exists(os.path.join(out, "warren_vlm.json"))
    # a pickle with code in it is refused by torch.load(weights_only=True)
    bad = str(tmp_path / "bad.pth")
    torch.save({"model": {"x": torch.zeros(1)}, "hook": ref.MiniGPT4Ref}, bad)
    assert main(["import-tinygptv", bad, "--output", str(tmp_path / "o2"), "--stage", "3", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights-only" in err[0]
    # the output must not hold the checkpoint (the export replaces the folder)
    import shutil
    inside = shutil.copy(ckpt, os.path.join(out, "c.pth"))
    assert main(["import-tinygptv", inside, "--output", out, "--stage", "3", *common]) == 2
    assert "contains the input" in capsys.readouterr().err and os.path.exists(inside)
