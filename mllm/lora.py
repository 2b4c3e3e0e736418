"""LoRA on the language model's linear layers, through peft.

For a frozen linear layer W (out x in), LoRA adds a trainable low-rank update:

    y = x W^T + (dropout(x) A^T B^T) * (alpha / r)

with A (r x in, random init) and B (out x r, zero init), so training starts from the
base model exactly. Merging folds the update in: W' = W + (B A) * (alpha / r); the merged
model computes the same function without dropout.

Targets are named in full (`language_model.model.layers.0.self_attn.q_proj`, ...) rather
than by suffix: suffixes such as `fc1`/`q_proj` also occur in the vision tower, which
must get no adapters. `LoraConfig.targets` narrows them to the LM layers whose names end
with one of its suffixes (TinyGPT-V: attention only, [q_proj, k_proj, v_proj, dense]).
"""
from __future__ import annotations

from torch import nn

from mllm.config import LoraConfig


def target_modules(vlm: nn.Module, include_lm_head: bool = False,
                   suffixes: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Full names of every nn.Linear inside the VLM's language model (only those whose
    name ends with one of `suffixes`, when given)."""
    from pipelines.errors import ConfigError
    head = vlm.language_model.get_output_embeddings()
    names = []
    for name, module in vlm.language_model.named_modules():
        if isinstance(module, nn.Linear) and (include_lm_head or module is not head):
            if suffixes and not any(name == s or name.endswith("." + s) for s in suffixes):
                continue
            names.append(f"language_model.{name}")
    if suffixes and not names:
        raise ConfigError(f"lora.targets: no linear layer of the LM ends with {list(suffixes)}")
    return names


def apply(vlm: nn.Module, cfg: LoraConfig):
    """Wrap the VLM in a peft model with LoRA on its LM; everything else is frozen
    (the trainer re-enables the projector)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                            target_modules=target_modules(vlm, cfg.include_lm_head, cfg.targets))
    return get_peft_model(vlm, config)


def merge(model) -> nn.Module:
    """Fold the adapters into the base weights and return the plain VLM."""
    return model.merge_and_unload()


def unwrap(model) -> nn.Module:
    """The VLM inside a peft wrapper (or the model itself)."""
    from peft import PeftModel
    return model.get_base_model() if isinstance(model, PeftModel) else model
