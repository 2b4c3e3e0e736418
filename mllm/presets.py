"""Named model presets, apart from the builders (which take every dimension).

Real-weight presets name hub repositories; pass local folders instead when the
weights are already on disk (`model_config("phi2-siglip", vision_path=..., lm_path=...)`).
The `-random` preset has the same dimensions with random weights (GPU benchmarks
without downloads); `tiny` is the 2-layer model the tests and the demo train.
"""
from __future__ import annotations

import dataclasses

from mllm.config import Config, LMConfig, ModelConfig, VisionConfig, from_dict
from pipelines.errors import ConfigError

SIGLIP_SO400M = VisionConfig(arch="siglip", name_or_path="google/siglip-so400m-patch14-384",
                             hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
                             image_size=384, patch_size=14)
CLIP_L_336 = VisionConfig(arch="clip", name_or_path="openai/clip-vit-large-patch14-336",
                          hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                          image_size=336, patch_size=14)
PHI2 = LMConfig(arch="phi", name_or_path="microsoft/phi-2", hidden_size=2560, intermediate_size=10240,
                num_layers=32, num_heads=32, vocab_size=51200, max_position_embeddings=2048)

MODELS: dict[str, ModelConfig] = {
    # Bunny-v1.0-3B: SigLIP-SO400M/14@384 + Phi-2.
    "phi2-siglip": ModelConfig(vision=SIGLIP_SO400M, lm=PHI2, projector="mlp2x_gelu"),
    # LLaVA-style: CLIP ViT-L/14@336 + Phi-2.
    "phi2-clip": ModelConfig(vision=CLIP_L_336, lm=PHI2, projector="mlp2x_gelu"),
    "phi2-siglip-random": ModelConfig(vision=dataclasses.replace(SIGLIP_SO400M, name_or_path=None),
                                      lm=dataclasses.replace(PHI2, name_or_path=None),
                                      projector="mlp2x_gelu"),
    "tiny": ModelConfig(
        vision=VisionConfig(arch="siglip", hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=2, image_size=32, patch_size=8),
        lm=LMConfig(arch="phi", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    vocab_size=512, max_position_embeddings=512, initializer_range=0.3),
        projector="mlp2x_gelu"),
}

# The tiny trainer config the tests and `warren demo` use; configs/train/tiny.yaml holds
# the same values (a test checks they agree).
TINY = {
    "model": dataclasses.asdict(MODELS["tiny"]),
    "data": {"tokenizer": "local", "tokenizer_vocab_size": 400, "max_length": 256,
             "num_workers": 0, "group_by_modality_length": True, "megabatch": 2},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
    "stage1": {"table": "stage1", "template": "plain", "lr": 5e-3, "warmup_ratio": 0.03,
               "max_steps": 30, "micro_batch_size": 8, "global_batch_size": 8,
               "precision": "fp32", "save_every": 10, "keep_last": 2},
    "stage2": {"table": "mix", "template": "bunny", "lr": 5e-3, "projector_lr": 1e-3,
               "warmup_ratio": 0.03, "max_steps": 30, "micro_batch_size": 4,
               "global_batch_size": 8, "precision": "fp32", "save_every": 10, "keep_last": 2},
    "run": {"output_dir": "runs/tiny", "seed": 0, "stage": 1},
}


def model_config(name: str, vision_path: str | None = None, lm_path: str | None = None) -> ModelConfig:
    """A preset's ModelConfig, optionally pointing at local copies of the weights."""
    try:
        cfg = MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset '{name}' (known: {', '.join(sorted(MODELS))})") from None
    if vision_path:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, name_or_path=vision_path))
    if lm_path:
        cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, name_or_path=lm_path))
    return cfg


def tiny(overrides: dict | None = None) -> Config:
    """The tiny trainer config (see TINY), with dotted overrides."""
    return from_dict(TINY, overrides, source="presets.TINY")
