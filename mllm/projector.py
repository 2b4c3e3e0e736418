"""Connectors from vision features to the language model's embedding space.

A registry maps a name to a builder `(vision_dim, lm_dim, **kwargs) -> Projector`.
Every projector says how many tokens it emits for a given number of patches
(`num_image_tokens`), so the data pipeline can expand `<image>` to exactly that many
placeholders before the model sees the batch. A resampler with N learned queries, for
instance, returns N whatever the patch count; the MLPs below keep one token per patch.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipelines.errors import ConfigError


class Projector(nn.Module):
    """Maps (batch, patches, vision_dim) to (batch, num_image_tokens, lm_dim)."""

    def num_image_tokens(self, num_patches: int) -> int:
        return num_patches


class MLPProjector(Projector):
    """LLaVA-1.5's `mlp{depth}x_gelu`: Linear, then (GELU, Linear) x (depth - 1)."""

    def __init__(self, vision_dim: int, lm_dim: int, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(vision_dim, lm_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(lm_dim, lm_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


REGISTRY: dict[str, Callable[..., Projector]] = {
    "linear": lambda vision_dim, lm_dim, **kw: MLPProjector(vision_dim, lm_dim, depth=1),
    "mlp2x_gelu": lambda vision_dim, lm_dim, **kw: MLPProjector(vision_dim, lm_dim, depth=2),
}


def register(name: str, builder: Callable[..., Projector]) -> None:
    """Add a connector (e.g. a resampler) under `name`; its builder takes
    (vision_dim, lm_dim, **kwargs) and returns a Projector."""
    REGISTRY[name] = builder


def build(name: str, vision_dim: int, lm_dim: int, **kwargs) -> Projector:
    from mllm import registry
    registry.load_builtins()  # Warren's optional connectors (qformer, resampler), once
    try:
        builder = REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown projector '{name}' (known: {', '.join(sorted(REGISTRY))})") from None
    return builder(vision_dim, lm_dim, **kwargs)
