"""Quantised inference: int8 dynamic on the CPU (ours and torch.ao), and the GPU
bitsandbytes path's configuration and its errors where it cannot run."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import mllm_fixtures as fx
from mllm import export, generate, presets, quantize
from mllm.config import QFormerConfig, VisionConfig
from mllm.model import build_vlm
from pipelines.errors import ConfigError, MissingDependencyError

TINY = presets.MODELS["tiny"]


@pytest.fixture(autouse=True)
def one_thread():
    with fx.single_thread():
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny VLM of TinyGPT-V's architecture (EVA tower, Q-Former connector, its norms), exported."""
    tok = fx.local_tokenizer()
    model_cfg = dataclasses.replace(
        TINY, transforms=["tinygptv_norms"], projector="qformer",
        vision=VisionConfig(arch="eva", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                            image_size=28, patch_size=14, select_layer=-1),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                              proj_hidden_size=48, num_query_tokens=8))
    torch.manual_seed(0)
    vlm = build_vlm(model_cfg, tok.convert_tokens_to_ids("<image>"), len(tok))
    with torch.no_grad():
        for name, p in vlm.language_model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
    folder = str(tmp_path_factory.mktemp("q") / "final")
    return export.save(vlm, tok, presets.tiny(), "tinygptv", folder, model_cfg=model_cfg)


def test_int8_linear_matches_the_float_layer_closely():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    q = quantize.Int8DynamicLinear(lin)
    assert q.qweight_t.dtype == torch.int8 and q.qweight_t.shape == (256, 96)
    x = torch.randn(3, 5, 256)
    want, got = lin(x), q(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    rel = (got - want).norm() / want.norm()
    assert 0 < rel < 0.02
    assert q(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("engine", ["auto", "warren", "ao"])
def test_int8_dynamic_quantises_the_lm_linears_only_and_keeps_the_answers(exported, engine):
    full = quantize.load(exported, "none")
    q = quantize.load(exported, "int8-dynamic", engine=engine)
    lm = q.model.language_model
    assert not [n for n, m in lm.named_modules() if type(m) is nn.Linear and m is not lm.get_output_embeddings()]
    assert type(lm.get_output_embeddings()) is nn.Linear  # the head stays float
    assert any(type(m) is nn.Linear for m in q.model.projector.modules())  # projector untouched
    assert quantize.weight_bytes(lm) < 0.8 * quantize.weight_bytes(full.model.language_model)
    # the norms are kept (float32 where hooked, trained values) and still applied after quantisation
    norms = {n: p for n, p in full.model.language_model.named_parameters() if "norm" in n}
    assert len(norms) == 2 * 7 + 2 and any("stabilizer_out_norm" in n for n in norms)
    mine = dict(q.model.language_model.named_parameters())
    for name, p in norms.items():
        assert torch.equal(mine[name], p), name
    ids = torch.tensor([generate.prompt_ids(full, "[vqa] What color is the shape?", True)])
    pixels = full.processor(fx.jpeg("red", "square")).unsqueeze(0)
    with torch.no_grad():
        a = full.model(ids, pixel_values=pixels).logits
        b = q.model(ids, pixel_values=pixels).logits
    assert (a - b).norm() / a.norm() < 0.05
    # random weights leave near-ties between the top logits: agreement is a loose bound
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
    assert not torch.equal(a, b)  # it did quantise
    text = generate.answer(q, fx.jpeg("red", "square"), "[vqa] What color is the shape?", max_new_tokens=6)
    assert isinstance(text, str)


def test_int8_dynamic_refuses_a_gpu_device_or_non_float32(exported):
    with pytest.raises(ConfigError, match="runs on the CPU"):
        quantize.load(exported, "int8-dynamic", device="cuda")
    with pytest.raises(ConfigError, match="float32"):
        quantize.load(exported, "int8-dynamic", dtype="bfloat16")
    with pytest.raises(ConfigError, match="unknown quantisation"):
        quantize.load(exported, "int3")


def test_bitsandbytes_configs_for_8_and_4_bits():
    c8, c4 = quantize.bnb_config(8), quantize.bnb_config(4, torch.bfloat16)
    assert c8.load_in_8bit and not c8.load_in_4bit and c8.llm_int8_skip_modules == ["lm_head"]
    assert c4.load_in_4bit and c4.bnb_4bit_quant_type == "nf4"
    assert c4.bnb_4bit_compute_dtype == torch.bfloat16
    with pytest.raises(ConfigError):
        quantize.bnb_config(2)


def test_gpu_modes_say_what_to_do_when_they_cannot_run(exported, monkeypatch):
    with pytest.raises(ConfigError, match="pass --device cuda, or use --quantize int8-dynamic"):
        quantize.load(exported, "8bit", device="cpu")
    # a GPU but no bitsandbytes: the install command
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import builtins
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(MissingDependencyError, match="pip install bitsandbytes"):
        quantize.load(exported, "4bit", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no.*visible.*pip install bitsandbytes|none is visible"):
        quantize.load(exported, "8bit", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and bitsandbytes")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_bitsandbytes_loads_and_answers_on_a_gpu(exported, mode):
    pytest.importorskip("bitsandbytes")
    q = quantize.load(exported, mode, device="cuda")
    text = generate.answer(q, fx.jpeg("red", "square"), "[vqa] What color is the shape?", max_new_tokens=6)
    assert isinstance(text, str)


def test_warren_generate_quantize_flag(exported, capsys):
    import argparse

    from flows.cli import main
    from flows.commands import generate as generate_cmd
    parser = argparse.ArgumentParser()
    generate_cmd.add_arguments(parser)
    if "--quantize" not in parser._option_string_actions:
        pytest.skip("flows/commands/generate.py has no --quantize flag yet")
    args = ["generate", "--checkpoint", exported, "--prompt", "[vqa] What color is it?",
            "--max-new-tokens", "4"]
    assert main(args + ["--quantize", "int8-dynamic"]) == 0
    printed = capsys.readouterr().out.strip()
    want = generate.answer(quantize.load(exported, "int8-dynamic"), None, "[vqa] What color is it?",
                           max_new_tokens=4)
    assert printed == want
    assert main(args + ["--quantize", "8bit"]) == 2
    assert "--device cuda" in capsys.readouterr().err
