"""Real weights, not only random init: tiny SigLIP and CLIP vision models, a Phi model
and a tokenizer saved with save_pretrained, and an open_clip checkpoint file, loaded
through the same hub-name-or-path code the presets use (mllm.vision.build,
mllm.model.build_lm, presets.model_config(..., vision_path, lm_path), the embed step's
`pretrained` path); every loaded tensor equals the saved one. The presets' image-token
counts are checked from their configs, with no weights (meta tensors)."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pyarrow as pa
import pytest
import torch

import mllm_fixtures as fx
from mllm import llava_hf, presets
from mllm import tokenizer as tok_mod
from mllm import vision as vision_mod
from mllm.config import LMConfig, VisionConfig
from mllm.model import build_lm, build_vlm
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# Odd sizes on purpose: the loaders must take the checkpoint's dimensions, not the config's.
SIGLIP = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
              image_size=40, patch_size=10)
CLIP = dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
            image_size=42, patch_size=14)
PHI = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, max_position_embeddings=128)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with seeded noise, so nothing equals a fresh init by chance
    (random-init biases and norms are zeros and ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def assert_same_weights(saved: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], prefix: str = ""):
    """Every saved tensor is in `loaded` (under `prefix`) with the same dtype and values."""
    assert saved, "nothing was saved"
    for name, tensor in saved.items():
        got = loaded[prefix + name]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Folders as save_pretrained writes them: SigLIP vision, full SigLIP (text + vision),
    CLIP vision, full CLIP, Phi (with a tokenizer)."""
    from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, PhiConfig,
                              PhiForCausalLM, SiglipConfig, SiglipModel, SiglipVisionConfig,
                              SiglipVisionModel)
    root = tmp_path_factory.mktemp("weights")
    out = {}

    def save(name, model):
        folder = str(root / name)
        model.save_pretrained(folder)
        out[name] = (folder, {k: v.clone() for k, v in model.state_dict().items()})

    save("siglip", _perturb(SiglipVisionModel(SiglipVisionConfig(**SIGLIP)), 1))
    save("clip", _perturb(CLIPVisionModel(CLIPVisionConfig(**CLIP)), 2))
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=99, max_position_embeddings=16)
    save("siglip-full", _perturb(SiglipModel(SiglipConfig(text_config=text, vision_config=SIGLIP)), 3))
    save("clip-full", _perturb(CLIPModel(CLIPConfig(text_config=text, vision_config=CLIP)), 4))
    save("phi", _perturb(PhiForCausalLM(PhiConfig(**PHI)), 5))
    tok = tok_mod.build_local(["a red square on the left", "a blue circle"] * 20, vocab_size=280)
    tok.save_pretrained(out["phi"][0])
    return out


@pytest.mark.parametrize("arch,name", [("siglip", "siglip"), ("clip", "clip")])
def test_vision_tower_loads_saved_weights(checkpoints, arch, name):
    folder, saved = checkpoints[name]
    # Dimensions in the config are ignored when a path is given.
    tower = vision_mod.build(VisionConfig(arch=arch, name_or_path=folder))
    assert_same_weights(saved, tower.model.state_dict())
    c = SIGLIP if arch == "siglip" else CLIP
    assert tower.image_size == c["image_size"] and tower.hidden_size == c["hidden_size"]
    assert tower.num_patches == (c["image_size"] // c["patch_size"]) ** 2


@pytest.mark.parametrize("arch,name,prefix", [("siglip", "siglip-full", "vision_model."),
                                              ("clip", "clip-full", "vision_model.")])
def test_vision_tower_takes_the_vision_half_of_a_full_checkpoint(checkpoints, arch, name, prefix):
    folder, saved = checkpoints[name]
    tower = vision_mod.build(VisionConfig(arch=arch, name_or_path=folder))
    vision = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    loaded = tower.model.state_dict()
    assert set(loaded) <= set(vision)  # SigLIP's head / CLIP's projection are not in the tower
    assert_same_weights({k: vision[k] for k in loaded}, loaded)
    assert len(loaded) > 10


def test_language_model_loads_saved_weights(checkpoints):
    folder, saved = checkpoints["phi"]
    lm = build_lm(LMConfig(arch="phi", name_or_path=folder))
    assert_same_weights(saved, lm.state_dict())
    # A tokenizer with more entries grows the table; the saved rows stay.
    grown = build_lm(LMConfig(arch="phi", name_or_path=folder), vocab_size=310)
    assert grown.get_input_embeddings().num_embeddings == 310
    assert torch.equal(grown.get_input_embeddings().weight[:300], saved["model.embed_tokens.weight"])


@pytest.mark.parametrize("preset,tower", [("phi2-siglip", "siglip"), ("phi2-clip", "clip")])
def test_presets_with_local_paths_load_every_weight(checkpoints, preset, tower):
    """model_config(preset, vision_path, lm_path) -> build_vlm: the path the Bunny configs
    take, with local folders instead of hub names."""
    v_folder, v_saved = checkpoints[tower]
    lm_folder, lm_saved = checkpoints["phi"]
    cfg = presets.model_config(preset, vision_path=v_folder, lm_path=lm_folder)
    assert cfg.vision.name_or_path == v_folder and cfg.lm.name_or_path == lm_folder
    tok = tok_mod.load(lm_folder)
    vlm = build_vlm(cfg, tok.convert_tokens_to_ids(tok_mod.IMAGE_TOKEN), len(tok))
    assert_same_weights(v_saved, vlm.vision.model.state_dict())
    lm_state = vlm.language_model.state_dict()
    assert_same_weights({k: v for k, v in lm_saved.items() if "embed_tokens" not in k}, lm_state)
    assert torch.equal(lm_state["model.embed_tokens.weight"][:300], lm_saved["model.embed_tokens.weight"])
    c = SIGLIP if tower == "siglip" else CLIP
    assert vlm.num_image_tokens == (c["image_size"] // c["patch_size"]) ** 2
    # The tower gives one feature per patch (CLIP's CLS dropped) from the penultimate layer.
    pixels = torch.zeros(1, 3, c["image_size"], c["image_size"])
    feats = vlm.vision(pixels)
    assert feats.shape == (1, vlm.num_image_tokens, c["hidden_size"])
    hidden = vlm.vision.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(feats, hidden[:, 1:] if tower == "clip" else hidden)


def test_tokenizer_from_a_folder_gets_image_and_pad(checkpoints):
    folder, _ = checkpoints["phi"]
    tok = tok_mod.load(folder)
    assert tok_mod.IMAGE_TOKEN in tok.get_vocab()
    assert tok.pad_token is not None
    assert tok("a red square", add_special_tokens=False)["input_ids"] == \
        tok_mod.build_local(["a red square on the left", "a blue circle"] * 20, vocab_size=280)(
            "a red square", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("preset,tokens,hidden", [("phi2-siglip", 729, 1152), ("phi2-clip", 576, 1024)])
def test_preset_image_token_counts_from_their_configs(preset, tokens, hidden):
    """SigLIP-SO400M/14@384: 27 x 27 = 729 patches, all kept; CLIP-L/14@336: 24 x 24 = 576
    patches + CLS, CLS dropped. Built on the meta device: configs only, no weights."""
    cfg = presets.model_config(preset)
    random = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, name_or_path=None),
                                 lm=dataclasses.replace(cfg.lm, name_or_path=None))
    with torch.device("meta"):
        vlm = build_vlm(random, image_token_id=51200, vocab_size=51201)
        features = vlm.vision(torch.empty(2, 3, cfg.vision.image_size, cfg.vision.image_size))
        projected = vlm.projector(features)
    assert vlm.num_image_tokens == tokens
    assert features.shape == (2, tokens, hidden)
    assert projected.shape == (2, tokens, 2560)
    llava = llava_hf.llava_config(vlm)
    assert llava.image_seq_length == tokens
    assert llava.vision_feature_select_strategy == ("full" if preset == "phi2-siglip" else "default")
    assert llava.text_config.vocab_size == 51201


# ------------------------------------------------------------------ open_clip (embed)

@pytest.fixture(scope="module")
def open_clip_checkpoints(tmp_path_factory):
    """A trained-looking open_clip checkpoint in both file forms open_clip reads:
    a training checkpoint (.pt: {'epoch', 'name', 'state_dict' with DDP's 'module.'
    prefix}) and a bare .safetensors state dict."""
    import open_clip
    from safetensors.torch import save_file

    from pipelines import embed
    embed.register_tiny()
    model = _perturb(open_clip.create_model(embed.TINY_MODEL), 7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("open_clip")
    pt, st = str(root / "epoch_3.pt"), str(root / "tiny.safetensors")
    torch.save({"epoch": 3, "name": "tiny-run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, pt)
    save_file({k: v.contiguous() for k, v in state.items()}, st)
    return model, state, {"pt": pt, "safetensors": st}


@pytest.mark.parametrize("form", ["pt", "safetensors"])
def test_embed_step_loads_an_open_clip_checkpoint_file(open_clip_checkpoints, form):
    from pipelines import embed
    model, state, files = open_clip_checkpoints
    cfg = embed.EmbedConfig(model=embed.TINY_MODEL, pretrained=files[form], workers=0, batch_size=4)
    assert not cfg.random_init
    loaded = embed.load(cfg)
    assert_same_weights(state, loaded.model.state_dict())
    # ... and embeds with them: the same image vector as the saved model gives.
    table = pa.table({"uid": ["a", "b"], "jpg": [fx.jpeg("red", "square"), fx.jpeg("blue", "circle")],
                      "caption": ["a red square", "a blue circle"]})
    img, txt, ok = embed.embed_table(cfg, table)
    assert ok.all()
    with torch.no_grad():
        ref = model.eval().encode_image(_pixels(loaded, fx.jpeg("red", "square")))
    ref = torch.nn.functional.normalize(ref, dim=-1)[0].numpy()
    assert np.allclose(img[0], ref, atol=1e-5)


def _pixels(loaded, blob: bytes) -> torch.Tensor:
    """open_clip's own inference transform on one image (the reference)."""
    from PIL import Image
    return loaded.preprocess(Image.open(io.BytesIO(blob)).convert("RGB")).unsqueeze(0)


def test_embed_step_reports_a_missing_checkpoint(tmp_path):
    from pipelines import embed
    from pipelines.errors import InputError
    with pytest.raises(InputError, match="checkpoint not found"):
        embed.load(embed.EmbedConfig(model=embed.TINY_MODEL, pretrained=str(tmp_path / "none.pt")))
