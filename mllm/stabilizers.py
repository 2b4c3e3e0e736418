"""TinyGPT-V's norms for small LMs, as options on any Phi-, Llama- or Qwen2-family LM.

TinyGPT-V found that a small LM (Phi-2) fed projected image tokens trains unstably
(loss spikes, NaN) and changed the LM in its modified `modeling_phi.py`:

  QK-norm          `self_attn.q_layernorm` / `k_layernorm`: LayerNorm(head_dim,
                   eps=config.layer_norm_eps) on each head's query and key (mean
                   subtracted, with a bias), after the projections, before rotary
                   embeddings. transformers' own Phi builds exactly this with
                   `PhiConfig(qk_layernorm=True)`.
  post-attn norm   `layers.N.post_layernorm`: an RMSNorm(hidden_size, eps 1e-6) on the
                   attention output, before the residual add.
  LM norms         the LM's own `input_layernorm`s and `final_layernorm` train too.

In TinyGPT-V the weights (not the biases) of all of these train in every stage, in
float32 (base_model.py `init_llm`).

Transforms (model.transforms; mllm.registry):

  tinygptv_norms   TinyGPT-V's set: qk_layernorm + post_attn_norm + lm_norms
  qk_layernorm     the QK LayerNorm. On Phi through transformers' `qk_layernorm=True`
                   (so it survives any save/reload); on other families a LayerNorm
                   (eps 1e-5, Phi-2's) added by a forward hook, named the same
  post_attn_norm   the post-attention RMSNorm (hook; `self_attn.stabilizer_out_norm`)
  lm_norms         train the LM's `input_layernorm` and final norm weights
  stabilizers      Warren's own variant: an RMSNorm QK-norm (eps 1e-6, no mean, no
                   bias; `self_attn.stabilizer_{q,k}_norm`) + the post-attention RMSNorm
  qk_norm          Warren's RMSNorm QK-norm alone

How the norms live in the LM: the transforms describe them (`lm_norm_spec`), and the LM
is built with them. QK LayerNorm on Phi is transformers' own. Anything transformers
cannot build from its config (the post-attention norm, hooked QK-norms) makes the LM a
`<Family>WarrenForCausalLM`: the family's transformers class plus the norms, with a
config whose `model_type` is `<family>_warren` and whose `warren_norms` names them.
`mllm.registry.load_builtins()` registers these with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` rebuilds them with their weights; without
Warren, transformers refuses the folder ("does not recognize this architecture") rather
than loading the LM without its norms.

Hooks: every hooked norm is applied by a forward hook on the module in its slot
(`q_proj`, `k_proj`, the output projection `dense`/`o_proj`). When peft replaces a slot
by a LoRA layer (or merges it back), the hook moves to the new module at the next
forward, so the norm sees the full projection, LoRA update included, once. Hooked norms
compute in float32 and return the input's dtype.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from pipelines.errors import ConfigError

PREFIX = "stabilizer_"
Q_NORM, K_NORM, OUT_NORM = f"{PREFIX}q_norm", f"{PREFIX}k_norm", f"{PREFIX}out_norm"
Q_LN, K_LN = "q_layernorm", "k_layernorm"
OUT_SLOTS = ("o_proj", "dense", "out_proj")
QK_KINDS = ("layernorm", "rmsnorm")
LAYERNORM_EPS = 1e-5   # TinyGPT-V's q/k LayerNorm eps (Phi-2's layer_norm_eps)
RMSNORM_EPS = 1e-6     # TinyGPT-V's post_layernorm (LlamaRMSNorm) eps
WARREN_SUFFIX = "_warren"
FAMILIES = ("phi", "llama", "qwen2")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last `dim` features (per head
    when `dim` is the head size and the input holds several heads side by side).
    Always float32 inside; the output has the input's dtype."""

    def __init__(self, dim: int, eps: float = RMSNORM_EPS):
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


class HeadLayerNorm(nn.LayerNorm):
    """LayerNorm(head_dim) applied to each head of a (..., heads * head_dim) projection
    output, in float32; the output has the input's dtype. (The class name holds
    'LayerNorm', so transformers initialises it as one: weight 1, bias 0.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, shape = x.dtype, x.shape
        d = self.normalized_shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float().reshape(*shape[:-1], shape[-1] // d, d)
            h = nn.functional.layer_norm(h, (d,), self.weight.float(), self.bias.float(), self.eps)
        return h.reshape(shape).to(dtype)


# ------------------------------------------------------------------ hooks

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
        raise ConfigError(f"{type(attn).__name__} already has {norm_name}: two transforms add "
                          "the same norm (see model.transforms)")
    attn.add_module(norm_name, norm)
    if not hasattr(attn, "_stabilizer_slots"):
        attn._stabilizer_slots = {}  # slot -> norm name
        attn.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    attn._stabilizer_slots[slot] = norm_name
    _hook_slots(attn)


def add_stabilizers(lm: nn.Module, qk: str | None = "rmsnorm", out_norm: bool = True) -> int:
    """Add hooked norms to every attention block of `lm` (in place, float32, identity
    init): a QK-norm of kind `qk` ('rmsnorm': Warren's; 'layernorm': TinyGPT-V's
    LayerNorm, for families whose transformers class has none) and/or the
    post-attention RMSNorm. Returns the number of attention blocks changed."""
    config = lm.config
    attns = attention_modules(lm)
    if not attns:
        raise ConfigError(f"no attention block with q_proj/k_proj and o_proj/dense in "
                          f"{type(lm).__name__}: the norms support Phi- and Llama-family LMs")
    if qk not in (None, *QK_KINDS):
        raise ConfigError(f"unknown QK-norm {qk!r} (known: {', '.join(QK_KINDS)})")
    for _, attn, out_slot in attns:
        w = attn.q_proj.weight if hasattr(attn.q_proj, "weight") else None
        device = w.device if w is not None else None
        hd = _head_dim(attn, config)
        if qk == "rmsnorm":
            _install(attn, "q_proj", Q_NORM, RMSNorm(hd).to(device))
            _install(attn, "k_proj", K_NORM, RMSNorm(hd).to(device))
        elif qk == "layernorm":
            if hasattr(attn, Q_LN):
                raise ConfigError(f"{type(attn).__name__} already has a QK LayerNorm")
            _install(attn, "q_proj", Q_LN, HeadLayerNorm(hd, eps=LAYERNORM_EPS).to(device, torch.float32))
            _install(attn, "k_proj", K_LN, HeadLayerNorm(hd, eps=LAYERNORM_EPS).to(device, torch.float32))
        if out_norm:
            _install(attn, out_slot, OUT_NORM, RMSNorm(config.hidden_size).to(device))
    return len(attns)


def stabilizer_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of a norm added by this module (hooked or not), by full name."""
    return {n: p for n, p in module.named_parameters()
            if PREFIX in n or re.search(r"(^|\.)[qk]_layernorm\.", n)}


def float_hooked_norms(lm: nn.Module) -> None:
    """Hooked norms keep float32 weights whatever the LM's dtype (they compute in float32)."""
    for m in lm.modules():
        if isinstance(m, (RMSNorm, HeadLayerNorm)):
            m.float()


# ------------------------------------------------------------ the norm spec

def normalize_spec(spec: dict | None) -> dict:
    """{'qk': None|'layernorm'|'rmsnorm', 'post_attn': bool} from a partial mapping."""
    spec = dict(spec or {})
    unknown = set(spec) - {"qk", "post_attn"}
    if unknown:
        raise ConfigError(f"unknown LM norm setting(s) {sorted(unknown)} (known: qk, post_attn)")
    qk = spec.get("qk")
    if qk not in (None, *QK_KINDS):
        raise ConfigError(f"unknown QK-norm {qk!r} (known: {', '.join(QK_KINDS)})")
    return {"qk": qk, "post_attn": bool(spec.get("post_attn", False))}


def base_model_type(config) -> str:
    mt = type(config).model_type
    return mt[:-len(WARREN_SUFFIX)] if mt.endswith(WARREN_SUFFIX) else mt


def norms_of(config) -> dict:
    """The norms an LM config describes (transformers' own QK LayerNorm included)."""
    spec = normalize_spec(getattr(config, "warren_norms", None))
    if getattr(config, "qk_layernorm", False):
        spec["qk"] = "layernorm"
    return spec


def _register_auto(family: str):
    """The (config, model) classes of `family` with Warren's norms, created and
    registered with transformers' Auto classes on first use."""
    if family in _CLASSES:
        return _CLASSES[family]
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        base_cfg = CONFIG_MAPPING[family]
        base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_cfg]
    except KeyError:
        raise ConfigError(f"LM family '{family}' has no causal-LM class in transformers") from None
    title = base_cfg.__name__[:-len("Config")]
    cfg_cls = type(f"{title}WarrenConfig", (base_cfg,), {
        "model_type": family + WARREN_SUFFIX, "__module__": __name__,
        "__doc__": f"{base_cfg.__name__} with `warren_norms` (see mllm.stabilizers)."})

    def __init__(self, config):
        base_model.__init__(self, config)
        spec = normalize_spec(getattr(config, "warren_norms", None))
        hooked_qk = spec["qk"] if not (spec["qk"] == "layernorm" and getattr(config, "qk_layernorm", False)) else None
        add_stabilizers(self, qk=hooked_qk, out_norm=spec["post_attn"])

    model_cls = type(f"{title}WarrenForCausalLM", (base_model,), {
        "config_class": cfg_cls, "__init__": __init__, "__module__": __name__,
        # fresh norms on a pretrained LM are expected: no 'missing keys' report for them
        "_keys_to_ignore_on_load_missing": [rf"\.{PREFIX}(q|k|out)_norm\.weight$",
                                            r"\.[qk]_layernorm\.(weight|bias)$"],
        "__doc__": f"{base_model.__name__} with the norms its config's `warren_norms` names."})
    AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    _CLASSES[family] = (cfg_cls, model_cls)
    return _CLASSES[family]


_CLASSES: dict[str, tuple[type, type]] = {}


def register_auto_classes() -> None:
    for family in FAMILIES:
        _register_auto(family)


NOTE = ("an LM with norms transformers cannot build from its own config (Warren, TinyGPT-V "
        "recipe): load it through Warren (mllm.export.load, or mllm.registry.load_builtins() "
        "then AutoModelForCausalLM.from_pretrained)")


def with_norms(config, spec: dict | None):
    """The LM config for `config` (a transformers config; possibly already with norms)
    plus the norms in `spec`. Norms the config already has are kept (never dropped); a
    different kind of QK-norm than the config's is an error. Phi's QK LayerNorm is
    transformers' `qk_layernorm`; whatever is left makes a `<family>_warren` config."""
    want = normalize_spec(spec)
    have = norms_of(config)
    if want["qk"] and have["qk"] and want["qk"] != have["qk"]:
        raise ConfigError(f"the LM already has a {have['qk']} QK-norm; model.transforms asks for a "
                          f"{want['qk']} one")
    merged = {"qk": have["qk"] or want["qk"], "post_attn": have["post_attn"] or want["post_attn"]}
    family = base_model_type(config)
    d = config.to_dict()
    d.pop("model_type", None)
    d.pop("warren_norms", None)
    d.pop("warren_note", None)
    native_qk = family == "phi" and merged["qk"] == "layernorm"
    if native_qk:
        d["qk_layernorm"] = True
    extra = {k: v for k, v in merged.items() if v and not (k == "qk" and native_qk)}
    if not extra:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        d.pop("architectures", None)
        return CONFIG_MAPPING[family].from_dict(d)
    if family not in FAMILIES:
        raise ConfigError(f"TinyGPT-V's norms support the LM families {', '.join(FAMILIES)} "
                          f"(this LM is '{family}')")
    cfg_cls, model_cls = _register_auto(family)
    d["architectures"] = [model_cls.__name__]
    d["warren_norms"] = normalize_spec(extra)
    d["warren_note"] = NOTE
    return cfg_cls.from_dict(d)


# ----------------------------------------------------------------- transforms

TRAIN_QK_LN = r"(^|\.)self_attn\.[qk]_layernorm\.weight$"
TRAIN_QK_RMS = rf"(^|\.)self_attn\.{PREFIX}[qk]_norm\.weight$"
TRAIN_OUT = rf"(^|\.)self_attn\.{OUT_NORM}\.weight$"
TRAIN_INPUT_LN = r"(^|\.)layers\.\d+\.input_layernorm\.weight$"
TRAIN_FINAL_LN = r"^model\.(final_layernorm|norm)\.weight$"


def transforms():
    """The norm transforms (mllm.registry.Transform), for mllm.tinygptv.register."""
    from mllm.registry import Transform

    def spec(**s):
        return lambda arch: {"warren_norms": s}
    return [
        Transform("tinygptv_norms", spec(qk="layernorm", post_attn=True),
                  trainable=(TRAIN_QK_LN, TRAIN_OUT, TRAIN_INPUT_LN, TRAIN_FINAL_LN),
                  help="TinyGPT-V's: QK LayerNorm, post-attention RMSNorm, LM norms trained"),
        Transform("qk_layernorm", spec(qk="layernorm"), trainable=(TRAIN_QK_LN,),
                  help="QK LayerNorm (Phi: transformers' qk_layernorm)"),
        Transform("post_attn_norm", spec(post_attn=True), trainable=(TRAIN_OUT,),
                  help="RMSNorm on the attention output"),
        Transform("lm_norms", None, trainable=(TRAIN_INPUT_LN, TRAIN_FINAL_LN),
                  help="train the LM's input_layernorm and final norm weights"),
        Transform("stabilizers", spec(qk="rmsnorm", post_attn=True), trainable=(TRAIN_QK_RMS, TRAIN_OUT),
                  help="Warren's variant: RMSNorm QK-norm + post-attention RMSNorm"),
        Transform("qk_norm", spec(qk="rmsnorm"), trainable=(TRAIN_QK_RMS,),
                  help="Warren's variant: RMSNorm QK-norm"),
    ]


# ------------------------------------------------------------ trainable norms

class _Float32Norm:
    """Forward pre/post hooks letting a norm whose weights were made float32 take (and
    give back) activations of another dtype outside autocast."""

    def pre(self, module, args):
        x = args[0]
        module._warren_in_dtype = x.dtype
        return (x.to(module.weight.dtype),) + tuple(args[1:])

    def post(self, module, args, output):
        return output.to(module.__dict__.pop("_warren_in_dtype", output.dtype))


def enable_trainable(lm: nn.Module, patterns: list[str]) -> list[str]:
    """Make the LM parameters whose names match `patterns` trainable and float32
    (after the trainer froze everything). Norm modules whose weight becomes float32
    compute in float32 and return the input dtype. Returns the names enabled."""
    if not patterns:
        return []
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    modules = dict(lm.named_modules())
    names = []
    for name, p in lm.named_parameters():
        if not regex.search(name):
            continue
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else lm
        if any(q.dtype != torch.float32 for q in owner.parameters(recurse=False)):
            owner.float()  # weight and bias together: torch's norms need one dtype
            if not isinstance(owner, (RMSNorm, HeadLayerNorm)) and not getattr(owner, "_warren_fp32", False):
                hooks = _Float32Norm()
                owner.register_forward_pre_hook(hooks.pre)
                owner.register_forward_hook(hooks.post)
                owner._warren_fp32 = True
        p.requires_grad_(True)
        names.append(name)
    return names
