"""TinyGPT-V's training stabilisers for small LMs, added at build time.

TinyGPT-V found that a frozen small LM (Phi-2) fed with projected image tokens trains
unstably (loss spikes, NaN) and fixed it with extra norms in every attention layer:

  QK-norm        an RMSNorm over each head's query and key vectors, after the q/k
                 projections and before rotary embeddings; bounds the attention logits
                 q.k / sqrt(d) however large the projections' outputs grow.
  post-attn norm an RMSNorm on the attention output (after `dense` / `o_proj`), before
                 it is added back to the residual stream.

Its release edits transformers' modeling_phi.py to get them. Here they are wrapped
around an unmodified model: for every attention module with `q_proj` and `k_proj` and an
output projection `dense` (Phi) or `o_proj` (Llama, Qwen2, Mistral, ...), the transform
adds norm sub-modules to it

    <attn>.stabilizer_q_norm    RMSNorm(head_dim), shared by all heads (QK-norm)
    <attn>.stabilizer_k_norm    RMSNorm(head_dim)
    <attn>.stabilizer_out_norm  RMSNorm(hidden_size)           (post-attention norm)

and forward hooks that apply them to the projections' outputs. The hooks follow the
module in each slot: when peft replaces `q_proj` by a LoRA layer (or merges it back),
the hook moves to the new module at the next forward, so the norm always sees the full
projection, LoRA update included, and is applied once.

dtype: the norms' weights are float32 whatever the model's dtype, and they compute in
float32 (autocast off) and cast the result back to the activation dtype.

Training: the norm modules carry `always_trainable = True`; `enable_training(vlm)` makes
them trainable after the trainer froze everything else (see docs/tinygpt-v.md for the
trainer hook). LoRA never wraps them: it targets nn.Linear layers named in full.

Save/load: the norms are sub-modules of the LM, so the LM's `save_pretrained` (the
export) writes them under their module names. When the transform runs on an LM loaded
from a local folder (an export), it reads the norms back from that folder's safetensors;
a folder without them (a plain pretrained LM) starts from weight 1.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from pipelines.errors import ConfigError, InputError

PREFIX = "stabilizer_"
Q_NORM, K_NORM, OUT_NORM = f"{PREFIX}q_norm", f"{PREFIX}k_norm", f"{PREFIX}out_norm"
OUT_SLOTS = ("o_proj", "dense", "out_proj")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last `dim` features (per head
    when `dim` is the head size and the input holds several heads side by side).
    Always float32 inside; the output has the input's dtype."""

    always_trainable = True

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = int(dim), float(eps)
        self.weight = nn.Parameter(torch.ones(self.dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, shape = x.dtype, x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float().reshape(*shape[:-1], shape[-1] // self.dim, self.dim)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            h = h * self.weight.float()
        return h.reshape(shape).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, float32"


def attention_modules(lm: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, output slot) of every attention block in a causal LM: modules with
    q_proj and k_proj children and an output projection (o_proj, dense or out_proj)."""
    found = []
    for name, m in lm.named_modules():
        children = dict(m.named_children())
        if "q_proj" in children and "k_proj" in children:
            out = next((s for s in OUT_SLOTS if s in children), None)
            if out is not None:
                found.append((name, m, out))
    return found


def _head_dim(attn: nn.Module, config) -> int:
    hd = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    return int(hd or config.hidden_size // config.num_attention_heads)


class _NormHook:
    """Forward hook applying `attn.<norm_name>` to a projection's output. An object,
    not a closure, so deep copies of the model (quantize_dynamic, copy.deepcopy) hook
    their own copy of the norm."""

    def __init__(self, attn: nn.Module, norm_name: str):
        self.attn, self.norm_name = attn, norm_name

    def __call__(self, module, inputs, output):
        return getattr(self.attn, self.norm_name)(output)


def _has_hook(module: nn.Module, attn: nn.Module, norm_name: str) -> bool:
    return any(isinstance(h, _NormHook) and h.attn is attn and h.norm_name == norm_name
               for h in module._forward_hooks.values())


def _remove_hooks(module: nn.Module, attn: nn.Module, norm_name: str) -> None:
    for m in module.modules():
        for key, h in list(m._forward_hooks.items()):
            if isinstance(h, _NormHook) and h.attn is attn and h.norm_name == norm_name:
                del m._forward_hooks[key]


def _hook_slots(attn: nn.Module) -> None:
    """Make sure the module now in each hooked slot carries its norm hook, once: a
    module that wraps the previous one (a LoRA layer around its base_layer) takes the
    hook over from it. No reference to a replaced module is kept, so a module swapped
    out (e.g. by quantisation) is freed."""
    for slot, norm_name in attn._stabilizer_slots.items():
        current = getattr(attn, slot)
        if _has_hook(current, attn, norm_name):
            continue
        _remove_hooks(current, attn, norm_name)
        current.register_forward_hook(_NormHook(attn, norm_name))


def _pre_hook(attn: nn.Module, args, kwargs):
    _hook_slots(attn)
    return None


def _install(attn: nn.Module, slot: str, norm_name: str, norm: nn.Module) -> None:
    if hasattr(attn, norm_name):
        raise ConfigError(f"{type(attn).__name__} already has {norm_name}: a stabiliser "
                          "transform is listed twice in model.transforms")
    attn.add_module(norm_name, norm)
    if not hasattr(attn, "_stabilizer_slots"):
        attn._stabilizer_slots = {}  # slot -> norm name
        attn.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    attn._stabilizer_slots[slot] = norm_name
    _hook_slots(attn)


def add_stabilizers(lm: nn.Module, qk_norm: bool = True, out_norm: bool = True,
                    eps: float = 1e-6) -> int:
    """Add QK-norm and/or the post-attention RMSNorm to every attention block of `lm`
    (in place, float32, weight 1). Returns the number of attention blocks changed."""
    config = lm.config
    attns = attention_modules(lm)
    if not attns:
        raise ConfigError(f"no attention block with q_proj/k_proj and o_proj/dense in "
                          f"{type(lm).__name__}: the stabilisers support Phi- and Llama-family LMs")
    for _, attn, out_slot in attns:
        device = attn.q_proj.weight.device if hasattr(attn.q_proj, "weight") else None
        if qk_norm:
            hd = _head_dim(attn, config)
            _install(attn, "q_proj", Q_NORM, RMSNorm(hd, eps).to(device))
            _install(attn, "k_proj", K_NORM, RMSNorm(hd, eps).to(device))
        if out_norm:
            _install(attn, out_slot, OUT_NORM, RMSNorm(config.hidden_size, eps).to(device))
    return len(attns)


def stabilizer_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every stabiliser parameter under `module`, by full name."""
    return {n: p for n, p in module.named_parameters() if PREFIX in n}


def enable_training(model: nn.Module) -> list[str]:
    """Make every module marked `always_trainable` float32 and trainable (call after
    the trainer's freeze and LoRA wrapping). Returns the parameter names enabled."""
    names = []
    for name, m in model.named_modules():
        if getattr(m, "always_trainable", False):
            m.float().requires_grad_(True)
            names += [f"{name}.{n}" for n, _ in m.named_parameters()]
    return names


# ----------------------------------------------------------------- save / load

def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "model.safetensors")
    return [single] if os.path.exists(single) else []


def saved_stabilizers(folder: str) -> dict[str, torch.Tensor]:
    """The stabiliser tensors an LM folder holds (written by save_pretrained)."""
    from safetensors import safe_open
    out = {}
    for path in _safetensors_files(folder):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if PREFIX in key:
                    out[key] = f.get_tensor(key)
    return out


def load_saved(lm: nn.Module, folder: str | None, kinds=(Q_NORM, K_NORM, OUT_NORM)) -> int:
    """Fill the LM's stabilisers of `kinds` from `folder` (a local LM folder) when it
    holds them. Returns how many tensors were loaded (0: fresh norms, e.g. a hub LM)."""
    if not folder or not os.path.isdir(folder):
        return 0

    def mine(name: str) -> bool:
        return any(f".{k}." in f".{name}" for k in kinds)
    saved = {k: v for k, v in saved_stabilizers(folder).items() if mine(k)}
    if not saved:
        return 0
    params = {n: p for n, p in stabilizer_parameters(lm).items() if mine(n)}
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise InputError(f"the saved stabilisers do not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}): was it exported with other "
                         "model.transforms?", path=folder)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(torch.float32))
    return len(saved)


def quiet_load_report() -> None:
    """Tell transformers that stabiliser keys in an LM folder are expected: its
    from_pretrained builds the plain architecture and would otherwise print a LOAD
    REPORT calling them UNEXPECTED ('not ok if you expect identical arch'), although
    `load_saved` loads them right after. Adds one regex to the base class's ignore list
    (classes that set their own list keep it and still print the report)."""
    from transformers import PreTrainedModel
    current = set(PreTrainedModel._keys_to_ignore_on_load_unexpected or ())
    PreTrainedModel._keys_to_ignore_on_load_unexpected = sorted(current | {IGNORE_ON_LOAD})


IGNORE_ON_LOAD = rf"\.{PREFIX}(q|k|out)_norm\.weight$"


# --------------------------------------------------------------- transforms

def _transform(qk_norm: bool, out_norm: bool):
    def apply(vlm, model_cfg):
        lm = vlm.language_model
        add_stabilizers(lm, qk_norm=qk_norm, out_norm=out_norm)
        kinds = ((Q_NORM, K_NORM) if qk_norm else ()) + ((OUT_NORM,) if out_norm else ())
        load_saved(lm, model_cfg.lm.name_or_path, kinds)
        return vlm
    return apply


TRANSFORMS = {
    "stabilizers": _transform(True, True),   # both, as TinyGPT-V
    "qk_norm": _transform(True, False),
    "post_attn_norm": _transform(False, True),
}
