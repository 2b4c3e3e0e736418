"""The EVA ViT-g vision tower as TinyGPT-V uses it: BLIP-2's vision model through
transformers' `Blip2VisionModel`, followed by TinyGPT-V's `ln_vision`.

TinyGPT-V (after MiniGPT-4/BLIP-2) runs LAVIS' EVA ViT-g (39 blocks; the 40th is
dropped) and a LayerNorm `ln_vision` over its last hidden state, and hands all tokens,
CLS included, to the Q-Former. transformers' BLIP-2 conversion puts `ln_vision` into
`Blip2VisionModel.post_layernorm`, but with the vision config's eps (1e-6) where
TinyGPT-V's `ln_vision` is a torch LayerNorm (eps 1e-5) computed in float32. This tower
applies `post_layernorm`'s weights with eps 1e-5, in float32, to
`hidden_states[select_layer]` (select_layer -1: the last block, as TinyGPT-V).

Weights: `name_or_path` is a BLIP-2 model (hub name or folder; only `vision_model.*` is
read) or a folder holding a Blip2VisionModel alone (what Warren's export writes).
Pixels are normalised with BLIP-2's (CLIP's) mean and std.

`resize(tower, size)` changes the input size, interpolating the position embeddings as
TinyGPT-V does for its 448-px stage 4 (LAVIS `interpolate_pos_embed`: bicubic,
align_corners=False, on the patch grid; the CLS position kept). It works for the CLIP
and SigLIP towers of mllm.vision too.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mllm.config import VisionConfig
from mllm.vision import VisionTower
from pipelines.errors import ConfigError

MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
LN_VISION_EPS = 1e-5  # TinyGPT-V's ln_vision: torch.nn.LayerNorm's default eps


class EvaTower(VisionTower):
    """Frozen like the SigLIP/CLIP towers; differs in its token count (CLS kept), its
    normalisation and the float32 `ln_vision` after the selected layer."""

    def __init__(self, model: nn.Module, select_layer: int = -1):
        super().__init__(model, "eva", select_layer)

    @property
    def num_patches(self) -> int:
        """Tokens per image: the patches plus the CLS token (TinyGPT-V keeps it)."""
        c = self.model.config
        return (c.image_size // c.patch_size) ** 2 + 1

    @property
    def normalisation(self):
        return MEAN_STD

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        h = out.hidden_states[self.select_layer]
        ln = self.model.post_layernorm
        with torch.autocast(device_type=h.device.type, enabled=False):
            y = nn.functional.layer_norm(h.float(), ln.normalized_shape, ln.weight.float(),
                                         ln.bias.float(), LN_VISION_EPS)
        return y.to(h.dtype)


def build(cfg: VisionConfig, dtype: torch.dtype = torch.float32) -> EvaTower:
    """An EVA tower from BLIP-2 weights (`cfg.name_or_path`) or, without, a random one
    with the dimensions in `cfg` (EVA ViT-g: 1408 wide, 39 layers, 16 heads, MLP 6144,
    patch 14)."""
    from transformers import Blip2Config, Blip2VisionConfig, Blip2VisionModel

    from mllm import blip2
    if cfg.name_or_path:
        conf = blip2.config(cfg.name_or_path)
        if isinstance(conf, Blip2Config):
            model = Blip2VisionModel(conf.vision_config)
            state = blip2.strip(blip2.read(cfg.name_or_path, ("vision_model.",)), "vision_model.")
            blip2.load_into(model, state, "EVA vision", cfg.name_or_path)
        elif isinstance(conf, Blip2VisionConfig):  # a Warren export's vision/ folder
            model = Blip2VisionModel.from_pretrained(cfg.name_or_path, dtype=dtype)
        else:
            raise ConfigError(f"model.vision.name_or_path: {cfg.name_or_path} is a "
                              f"{type(conf).__name__}, not a BLIP-2 model (arch eva)")
        model = model.to(dtype)
    else:
        conf = Blip2VisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                                 num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                                 image_size=cfg.image_size, patch_size=cfg.patch_size,
                                 layer_norm_eps=1e-6, qkv_bias=True)
        model = Blip2VisionModel(conf).to(dtype)
    return EvaTower(model, cfg.select_layer)


def _grid(n: int, what: str) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise ConfigError(f"{what}: {n} position embeddings are not a square grid")
    return g


@torch.no_grad()
def interpolate(pos: torch.Tensor, new_grid: int, extra: int) -> torch.Tensor:
    """(1, extra + g*g, d) position embeddings -> (1, extra + new_grid^2, d): the first
    `extra` (CLS) kept, the g x g grid resized bicubically (align_corners=False), in
    float32, as LAVIS' interpolate_pos_embed."""
    dtype = pos.dtype
    pos = pos.float()
    d = pos.shape[-1]
    head, grid = pos[:, :extra], pos[:, extra:]
    g = _grid(grid.shape[1], "position embeddings")
    grid = grid.reshape(-1, g, g, d).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((head, grid), dim=1).to(dtype)


@torch.no_grad()
def resize(tower: nn.Module, image_size: int) -> nn.Module:
    """Set the tower's input size to `image_size` (in place), interpolating its position
    embeddings from its current grid. EVA (Blip2VisionModel), CLIP and SigLIP."""
    model = tower.model
    conf = model.config
    if image_size % conf.patch_size:
        raise ConfigError(f"image_size {image_size} is not a multiple of the patch size {conf.patch_size}")
    if image_size == conf.image_size:
        return tower
    new_grid = image_size // conf.patch_size
    emb = model.embeddings if hasattr(model, "embeddings") else model.vision_model.embeddings
    if isinstance(emb.position_embedding, nn.Parameter):  # BLIP-2 / EVA: (1, 1 + g*g, d)
        new = interpolate(emb.position_embedding.data, new_grid, extra=1)
        emb.position_embedding = nn.Parameter(new, requires_grad=False)
        emb.num_patches, emb.num_positions = new_grid ** 2, new_grid ** 2 + 1
    else:  # CLIP (a CLS position) or SigLIP (none): an nn.Embedding
        old = emb.position_embedding.weight.data
        extra = old.shape[0] - emb.num_patches
        new = interpolate(old.unsqueeze(0), new_grid, extra=extra)[0]
        table = nn.Embedding(new.shape[0], new.shape[1]).to(device=old.device, dtype=old.dtype)
        table.weight.data.copy_(new)
        table.requires_grad_(False)
        emb.position_embedding = table
        emb.num_patches, emb.num_positions = new_grid ** 2, new.shape[0]
        emb.register_buffer("position_ids", torch.arange(new.shape[0], device=old.device).expand((1, -1)),
                            persistent=False)
    emb.image_size = image_size
    conf.image_size = image_size
    return tower
