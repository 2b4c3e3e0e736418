"""A resampler connector: N learned queries cross-attend to the vision tokens.

Warren's own connector, trained from scratch (TinyGPT-V's is the frozen, pretrained
BLIP-2 Q-Former: mllm.qformer). The idea of a fixed number of image tokens as a Warren
projector, next to `mlp2x_gelu`:

    kv = Linear(vision_dim -> width)(patches)                   (B, P, width)
    q  = queries                                                 (B, N, width)
    repeat depth times (pre-norm blocks):
        q = q + MultiheadAttention(LN(q), LN(kv), LN(kv))
        q = q + MLP(LN(q))                                       (4x, GELU)
    tokens = Linear(width -> lm_dim)(LN(q))                      (B, N, lm_dim)

The image always becomes exactly N tokens, whatever the patch count (SigLIP-384/14:
729 patches -> 32 tokens), so `<image>` expands to N placeholders: the VLM reads
`projector.num_image_tokens(...)` and the data pipeline follows it.

Registered names (mllm.projector.REGISTRY): `resampler` (32 queries, TinyGPT-V's
count) and `resampler{N}` for N in RESAMPLER_SIZES. A builder called with keyword
arguments (num_queries, depth, num_heads, width) accepts them too.
"""
from __future__ import annotations

import torch
from torch import nn

from mllm import projector as projectors
from pipelines.errors import ConfigError

DEFAULT_QUERIES = 32
RESAMPLER_SIZES = (8, 16, 32, 64, 96, 128, 144, 256)


def default_heads(width: int) -> int:
    """The most heads (<= 16) that divide `width` with at least 64 dims each (or one
    head for a width under 64)."""
    for h in range(16, 0, -1):
        if width % h == 0 and width // h >= min(64, width):
            return h
    return 1


class ResamplerBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class Resampler(projectors.Projector):
    """Maps (batch, patches, vision_dim) to (batch, num_queries, lm_dim)."""

    def __init__(self, vision_dim: int, lm_dim: int, num_queries: int = DEFAULT_QUERIES,
                 depth: int = 1, num_heads: int | None = None, width: int | None = None):
        super().__init__()
        width = int(width or vision_dim)
        num_heads = int(num_heads or default_heads(width))
        problems = []
        if num_queries <= 0:
            problems.append(f"resampler: num_queries must be > 0 (got {num_queries})")
        if depth <= 0:
            problems.append(f"resampler: depth must be > 0 (got {depth})")
        if width % num_heads:
            problems.append(f"resampler: width {width} is not divisible by num_heads {num_heads}")
        if problems:
            raise ConfigError(problems)
        self.num_queries = int(num_queries)
        self.queries = nn.Parameter(torch.empty(self.num_queries, width))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.kv_in = nn.Linear(vision_dim, width)
        self.blocks = nn.ModuleList(ResamplerBlock(width, num_heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, lm_dim)

    def num_image_tokens(self, num_patches: int) -> int:
        return self.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        kv = self.kv_in(features)
        q = self.queries.to(kv.dtype).unsqueeze(0).expand(features.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, kv)
        return self.out(self.norm_out(q))


def _builder(num_queries: int):
    def build(vision_dim: int, lm_dim: int, **kwargs) -> Resampler:
        kwargs.setdefault("num_queries", num_queries)
        return Resampler(vision_dim, lm_dim, **kwargs)
    return build


def register() -> None:
    """Add `resampler` and `resampler{N}` to mllm.projector.REGISTRY (mllm.tinygptv.register)."""
    projectors.register("resampler", _builder(DEFAULT_QUERIES))
    for n in RESAMPLER_SIZES:
        projectors.register(f"resampler{n}", _builder(n))
