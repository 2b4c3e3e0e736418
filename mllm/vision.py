"""The frozen vision tower: SigLIP or CLIP vision models from transformers.

Features come from `select_layer` (the penultimate layer by default, as LLaVA and
Bunny use); CLIP's CLS token is dropped, SigLIP has none. The tower never trains, so
it runs without autograd and stays in eval mode even when its parent is put in train
mode.
"""
from __future__ import annotations

import torch
from torch import nn

from mllm.config import VisionConfig

# Pixel normalisation each family was trained with.
NORMALISATION = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


class VisionTower(nn.Module):
    def __init__(self, model: nn.Module, arch: str, select_layer: int = -2):
        super().__init__()
        self.model = model
        self.arch = arch
        self.select_layer = select_layer
        self.drop_cls = arch == "clip"
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def num_patches(self) -> int:
        c = self.model.config
        return (c.image_size // c.patch_size) ** 2

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return NORMALISATION[self.arch]

    def train(self, mode: bool = True) -> "VisionTower":
        # Frozen: dropout and any batch statistics stay in inference behaviour.
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.select_layer]
        return features[:, 1:] if self.drop_cls else features


def _classes(arch: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel
    return {"siglip": (SiglipVisionConfig, SiglipVisionModel),
            "clip": (CLIPVisionConfig, CLIPVisionModel)}[arch]


def build(cfg: VisionConfig, dtype: torch.dtype = torch.float32) -> VisionTower:
    """A tower from real weights (`cfg.name_or_path`: a hub name such as
    google/siglip-so400m-patch14-384 or openai/clip-vit-large-patch14-336, or a local
    folder; a full SigLIP/CLIP checkpoint works, its text half is skipped) or, without
    it, a random tower with exactly the dimensions in `cfg`."""
    config_cls, model_cls = _classes(cfg.arch)
    if cfg.name_or_path:
        model = model_cls.from_pretrained(cfg.name_or_path, dtype=dtype)
    else:
        extra = {"vision_use_head": False} if cfg.arch == "siglip" else {}
        config = config_cls(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                            image_size=cfg.image_size, patch_size=cfg.patch_size, **extra)
        model = model_cls(config).to(dtype)
    return VisionTower(model, cfg.arch, cfg.select_layer)
