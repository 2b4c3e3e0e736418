"""Frozen linear weights cast to bfloat16 once per run instead of once per forward.

Under `torch.autocast(dtype=bfloat16)` every `F.linear` casts its weight and bias to
bfloat16 before the matmul. Autocast caches those casts only for leaves that require
grad, so a frozen weight (the whole base LM in LoRA training, the vision tower) is
converted again in every forward of every micro-batch: reading 4 bytes and writing 2
per parameter, each time, for a result that never changes. `cast(model)` makes those
copies once: each frozen `nn.Linear` gets bfloat16 weight and bias, which autocast then
uses as they are. The matmul inputs are the same bfloat16 values autocast would have
produced (round to nearest even, both ways), so losses and gradients are bit-identical
(tests/test_frozen_cast.py checks it).

Left alone: anything trainable (LoRA A/B, the projector, norms a transform marks
trainable), every non-Linear module (embeddings, norms and convolutions keep float32,
as autocast runs them), and a Linear weight shared with another module (tied
input/output embeddings: the lookup does not autocast). The float32 originals move to
the CPU (freeing accelerator memory) and `restore()` puts them back before the model
is merged and exported.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def frozen_linears(model: nn.Module) -> list[nn.Linear]:
    """Linear layers whose weight and bias are frozen float32 tensors used by nothing else."""
    # Exactly nn.Linear: subclasses may read their weight outside F.linear (MHA's out_proj).
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    ids = {id(m) for m in linears}
    shared = {id(p) for m in model.modules() if id(m) not in ids for p in m.parameters(recurse=False)}
    seen: dict[int, int] = {}
    for m in linears:
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    out = []
    for m in linears:
        params = list(m.parameters(recurse=False))
        if all(not p.requires_grad and p.dtype == torch.float32 and id(p) not in shared
               and seen[id(p)] == 1 for p in params):
            out.append(m)
    return out


def cast(model: nn.Module, dtype: torch.dtype = torch.bfloat16, keep_on: str = "cpu") -> Callable[[], None]:
    """Cast the frozen linear weights of `model` to `dtype` in place; returns `restore()`,
    which puts the float32 originals back (on the parameters' device)."""
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    with torch.no_grad():
        for m in frozen_linears(model):
            for p in m.parameters(recurse=False):
                saved.append((p, p.data.to(keep_on)))
                p.data = p.data.to(dtype)

    def restore() -> None:
        with torch.no_grad():
            for p, original in saved:
                p.data = original.to(p.device)
        saved.clear()

    return restore
