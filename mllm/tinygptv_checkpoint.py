"""TinyGPT-V checkpoints onto Warren's model: `warren import-tinygptv CKPT --output DIR`.

A TinyGPT-V checkpoint (`checkpoint_N.pth`, the released `TinyGPT-V_for_StageN.pth`)
is what its runner saves: `{"model": state_dict, "optimizer", "config", ...}`, the
state dict holding only the parameters that trained (runner_base._save_checkpoint) plus
buffers. Its keys (derived from TinyGPT-V's MiniGPT4/MiniGPTv2 classes, its
modeling_phi.py and peft's LoRA wrapper):

  llama_proj.{weight,bias}, llama_proj2.{weight,bias}           -> the qformer connector
  llama_model.base_model.model.model.layers.N.                  (LoRA-wrapped Phi-2;
                                                                 `llama_model.model.` without LoRA)
    self_attn.query_key_value.lora_{A,B}[.default].weight       -> merged into q/k/v_proj
    self_attn.dense.lora_{A,B}[.default].weight                 -> merged into dense
    self_attn.{q,k}_layernorm.{weight,bias}                     -> same names (transformers' Phi)
    post_layernorm.weight                                       -> self_attn.stabilizer_out_norm.weight
    input_layernorm.{weight,bias}                               -> same
  llama_model.base_model.model.model.final_layernorm.{weight,bias}
  Qformer.bert.embeddings.position_ids                          (a buffer; ignored)

A full dump may also hold the frozen parts, which map too: the fused
`query_key_value.{weight,bias}` (TinyGPT-V splits it per head: view(heads, 3,
head_dim), i.e. [q_h0, k_h0, v_h0, q_h1, ...]), `dense`, `mlp.fc{1,2}`, `embed_tokens`,
`lm_head`; the Q-Former in LAVIS' names (`Qformer.bert.encoder.layer.N.attention.self.query`
-> transformers' `qformer.encoder.layer.N.attention.attention.query`, ...; its text
branch, which TinyGPT-V deletes, is ignored with a reason); `query_tokens`; `ln_vision`
(-> the EVA tower's post_layernorm) and `visual_encoder.*` (LAVIS' EVA -> transformers'
Blip2VisionModel).

LoRA is merged exactly: W' = W + B A (alpha / r), with TinyGPT-V's r 64, alpha 16 unless
the checkpoint's config says otherwise. The parts the checkpoint lacks come from the
base weights: `--lm` (Phi-2 in transformers' layout, e.g. microsoft/phi-2) and `--blip2`
(EVA ViT-g and the Q-Former, e.g. Salesforce/blip2-flan-t5-xxl). Every key of the
checkpoint is accounted for: loaded, merged, or ignored with a reason; any other key
stops the import with its name. The result is a Warren export folder (mllm.export.load,
`warren generate`, `stageN.init_from`), with `tinygptv_import.json` listing what went where.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import torch

from pipelines.errors import ConfigError, InputError

LORA_R, LORA_ALPHA = 64, 16  # TinyGPT-V's (MiniGPT4/MiniGPTv2 defaults, stage 2/4 configs)
LM_PREFIXES = ("llama_model.base_model.model.", "llama_model.")

_L = r"model\.layers\.(\d+)\."
LM_RULES = [  # (regex over the key after the LM prefix, kind, Warren name template)
    (re.compile(_L + r"self_attn\.query_key_value\.(?:base_layer\.)?(weight|bias)$"), "fused_qkv", None),
    (re.compile(_L + r"self_attn\.(query_key_value|dense)\.lora_([AB])(?:\.[^.]+)?\.weight$"), "lora", None),
    (re.compile(_L + r"self_attn\.dense\.(?:base_layer\.)?(weight|bias)$"), "copy",
     "model.layers.{0}.self_attn.dense.{1}"),
    (re.compile(_L + r"self_attn\.([qk])_layernorm\.(weight|bias)$"), "copy",
     "model.layers.{0}.self_attn.{1}_layernorm.{2}"),
    (re.compile(_L + r"post_layernorm\.weight$"), "copy", "model.layers.{0}.self_attn.stabilizer_out_norm.weight"),
    (re.compile(_L + r"input_layernorm\.(weight|bias)$"), "copy", "model.layers.{0}.input_layernorm.{1}"),
    (re.compile(_L + r"mlp\.(fc1|fc2)\.(weight|bias)$"), "copy", "model.layers.{0}.mlp.{1}.{2}"),
    (re.compile(r"model\.embed_tokens\.weight$"), "copy", "model.embed_tokens.weight"),
    (re.compile(r"model\.final_layernorm\.(weight|bias)$"), "copy", "model.final_layernorm.{0}"),
    (re.compile(r"lm_head\.(weight|bias)$"), "copy", "lm_head.{0}"),
    (re.compile(_L + r"self_attn\.rotary_emb\.(inv_freq|cos_cached|sin_cached)$"), "ignore",
     "rotary buffer (recomputed)"),
]

_Q = r"Qformer\.bert\.encoder\.layer\.(\d+)\."
QFORMER_RULES = [
    (re.compile(r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)$"), "copy", "qformer.layernorm.{0}"),
    (re.compile(_Q + r"(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)$"), "copy",
     "qformer.encoder.layer.{0}.{1}.attention.{2}.{3}"),
    (re.compile(_Q + r"(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)$"), "copy",
     "qformer.encoder.layer.{0}.{1}.output.{2}.{3}"),
    (re.compile(_Q + r"(intermediate_query|output_query)\.(dense|LayerNorm)\.(weight|bias)$"), "copy",
     "qformer.encoder.layer.{0}.{1}.{2}.{3}"),
    (re.compile(_Q + r"(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)$"), "ignore",
     "Q-Former text branch (TinyGPT-V deletes it; only queries pass)"),
    (re.compile(r"Qformer\.(cls\..*|bert\.embeddings\.(word_embeddings|position_embeddings)\..*)$"), "ignore",
     "Q-Former text branch (TinyGPT-V deletes it; only queries pass)"),
    (re.compile(r"Qformer\.bert\.embeddings\.position_ids$"), "ignore", "buffer of the deleted text embeddings"),
    (re.compile(r"query_tokens$"), "copy", "query_tokens"),
    (re.compile(r"(llama_proj|llama_proj2)\.(weight|bias)$"), "copy", "{0}.{1}"),
]

_B = r"visual_encoder\.blocks\.(\d+)\."
VISION_RULES = [
    (re.compile(r"ln_vision\.(weight|bias)$"), "copy", "post_layernorm.{0}"),
    (re.compile(r"visual_encoder\.cls_token$"), "copy", "embeddings.class_embedding"),
    (re.compile(r"visual_encoder\.pos_embed$"), "pos_embed", "embeddings.position_embedding"),
    (re.compile(r"visual_encoder\.patch_embed\.proj\.(weight|bias)$"), "copy", "embeddings.patch_embedding.{0}"),
    (re.compile(_B + r"norm(1|2)\.(weight|bias)$"), "copy", "encoder.layers.{0}.layer_norm{1}.{2}"),
    (re.compile(_B + r"attn\.qkv\.weight$"), "copy", "encoder.layers.{0}.self_attn.qkv.weight"),
    (re.compile(_B + r"attn\.(q|v)_bias$"), "qv_bias", "encoder.layers.{0}.self_attn.qkv.bias"),
    (re.compile(_B + r"attn\.proj\.(weight|bias)$"), "copy", "encoder.layers.{0}.self_attn.projection.{1}"),
    (re.compile(_B + r"mlp\.(fc1|fc2)\.(weight|bias)$"), "copy", "encoder.layers.{0}.mlp.{1}.{2}"),
    (re.compile(_B + r"attn\.relative_position_index$"), "ignore", "buffer (EVA-g uses no relative positions)"),
]


@dataclass
class Report:
    source: str = ""
    loaded: dict[str, list[str]] = field(default_factory=dict)
    """Warren parameter <- the checkpoint key(s) it was loaded from."""
    merged_lora: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    """checkpoint key -> why it needs no place in Warren's model."""
    lora_scale: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, TinyGPT-V run config or {}) of a .pth (torch.load(weights_only=True))
    or .safetensors file."""
    if not os.path.isfile(path):
        raise InputError("checkpoint file not found", path=path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path), {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusing a non-tensor object, a truncated file
        raise InputError(f"cannot read it as a weights-only torch checkpoint ({str(e).splitlines()[0]})",
                         path=path) from None
    if not isinstance(obj, dict):
        raise InputError("not a state dict (or a dict with a 'model' state dict)", path=path)
    state = obj.get("model", obj)
    conf = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"entries that are not tensors: {bad[:3]}", path=path)
    return state, conf


def _match(rules, key: str):
    for regex, kind, target in rules:
        m = regex.match(key)
        if m:
            return kind, target, m.groups()
    return None


def split_fused(t: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TinyGPT-V's fused query_key_value rows, [q_h0 k_h0 v_h0 q_h1 ...] (its _split_heads:
    view(heads, 3, head_dim)), as the q, k and v rows of transformers' q/k/v_proj."""
    rows = t.shape[0]
    hd = rows // (3 * num_heads)
    parts = t.reshape(num_heads, 3, hd, *t.shape[1:])
    return tuple(parts[:, j].reshape(num_heads * hd, *t.shape[1:]) for j in range(3))


def apply(vlm, state: dict[str, torch.Tensor], lora_scale: float | None = None,
          lora_alpha: float = LORA_ALPHA, source: str = "") -> Report:
    """Load a TinyGPT-V state dict into a Warren VLM built with the qformer connector,
    the eva tower and the tinygptv_norms transform (in place). Returns what went where."""
    report = Report(source=source)
    lm = vlm.language_model
    lm_params = dict(lm.named_parameters())
    proj_params = {**dict(vlm.projector.named_parameters())}
    vis_params = dict(vlm.vision.model.named_parameters())
    heads = lm.config.num_attention_heads
    unknown: list[str] = []
    lora: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    qv_bias: dict[str, dict[str, torch.Tensor]] = {}
    writes: list[tuple[dict, str, torch.Tensor, list[str]]] = []

    for key, value in state.items():
        prefix = next((p for p in LM_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            hit = _match(LM_RULES, key[len(prefix):])
            if hit is None:
                unknown.append(key)
                continue
            kind, target, groups = hit
            if kind == "ignore":
                report.ignored[key] = target
            elif kind == "copy":
                writes.append((lm_params, target.format(*groups), value, [key]))
            elif kind == "fused_qkv":
                layer, what = groups
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_fused(value, heads)):
                    writes.append((lm_params, f"model.layers.{layer}.self_attn.{proj}.{what}", part, [key]))
            elif kind == "lora":
                layer, module, ab = groups
                lora.setdefault((int(layer), module), {})[ab] = value
                report.merged_lora.append(key)
            continue
        hit = _match(QFORMER_RULES, key)
        if hit is not None:
            kind, target, groups = hit
            if kind == "ignore":
                report.ignored[key] = target
            else:
                writes.append((proj_params, target.format(*groups), value, [key]))
            continue
        hit = _match(VISION_RULES, key)
        if hit is not None:
            kind, target, groups = hit
            name = target.format(*groups) if kind != "ignore" else None
            if kind == "ignore":
                report.ignored[key] = target
            elif kind == "qv_bias":
                qv_bias.setdefault(name, {})[groups[1]] = (key, value)
            elif kind == "pos_embed":
                writes.append((vis_params, name, _fit_pos_embed(value, vis_params[name]), [key]))
            else:
                writes.append((vis_params, name, value, [key]))
            continue
        unknown.append(key)

    if unknown:
        raise InputError(f"{len(unknown)} key(s) TinyGPT-V's model does not have, e.g. {unknown[:4]}: "
                         "not a TinyGPT-V checkpoint?", field="model")
    for name, parts in qv_bias.items():
        if set(parts) != {"q", "v"}:
            raise InputError(f"EVA attention bias {name}: q_bias and v_bias come in pairs", field="model")
        (qk, q), (vk, v) = parts["q"], parts["v"]
        writes.append((vis_params, name, torch.cat([q, torch.zeros_like(q), v]), [qk, vk]))

    with torch.no_grad():
        for params, name, value, keys in writes:
            if name not in params:
                raise InputError(f"{keys[0]}: Warren's model has no {name} (was it built with the qformer "
                                 "connector, the eva tower and tinygptv_norms?)", field="model")
            p = params[name]
            if p.shape != value.shape:
                raise InputError(f"{keys[0]}: shape {tuple(value.shape)}, Warren's {name} is {tuple(p.shape)}",
                                 field="model")
            p.copy_(value.to(p.dtype))
            report.loaded[_label(params, lm_params, proj_params, name)] = keys
        for (layer, module), ab in sorted(lora.items()):
            if set(ab) != {"A", "B"}:
                raise InputError(f"layer {layer} {module}: LoRA A and B come in pairs", field="model")
            a, b = ab["A"].float(), ab["B"].float()
            r = a.shape[0]
            scale = lora_scale if lora_scale is not None else lora_alpha / r
            report.lora_scale = scale
            delta = (b @ a) * scale
            targets = ([f"model.layers.{layer}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")]
                       if module == "query_key_value" else [f"model.layers.{layer}.self_attn.dense.weight"])
            deltas = split_fused(delta, heads) if module == "query_key_value" else (delta,)
            for name, d in zip(targets, deltas):
                p = lm_params[name]
                if p.shape != d.shape:
                    raise InputError(f"LoRA of layer {layer} {module}: update {tuple(d.shape)} does not fit "
                                     f"{name} {tuple(p.shape)}", field="model")
                p.copy_((p.float() + d).to(p.dtype))
    return report


def _label(params, lm_params, proj_params, name: str) -> str:
    if params is lm_params:
        return f"language_model.{name}"
    if params is proj_params:
        return f"projector.{name}"
    return f"vision.model.{name}"


def _fit_pos_embed(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A full dump's EVA position embeddings at the tower's grid (TinyGPT-V stage 4 builds
    EVA at 448 px by interpolating the 224-px table the same way)."""
    if value.shape == target.shape:
        return value
    from mllm import eva
    new_grid = eva._grid(target.shape[1] - 1, "the tower's position embeddings")
    return eva.interpolate(value, new_grid, extra=1)


# ---------------------------------------------------------------------- import

TEMPLATES = {1: "tinygptv-pretrain", 2: "tinygptv-pretrain", 3: "tinygptv-instruct", 4: "tinygptv"}


def stage_of(conf: dict) -> int | None:
    """TinyGPT-V stage a checkpoint's run config describes (None: no config)."""
    model = conf.get("model") or {}
    if not model:
        return None
    if model.get("arch") == "minigpt_v2":
        return 4
    if "###Human" in str(model.get("prompt_template") or ""):
        return 3
    return 2 if model.get("lora_r") else 1


def import_checkpoint(ckpt: str, output: str, lm: str = "microsoft/phi-2",
                      blip2: str = "Salesforce/blip2-flan-t5-xxl", tokenizer: str | None = None,
                      stage: int | None = None, image_size: int | None = None,
                      template: str | None = None, dtype: str = "float32",
                      lora_alpha: float | None = None) -> dict:
    """Build TinyGPT-V's architecture from the base weights, load `ckpt` onto it and write
    a Warren export to `output`. Returns a summary (also in tinygptv_import.json)."""
    from mllm import eva, export, registry
    from mllm import tokenizer as tok_mod
    from mllm.config import Config, LMConfig, ModelConfig, VisionConfig
    from mllm.model import build_vlm
    from mllm.templates import get as get_template

    state, conf = read(ckpt)
    model_conf = conf.get("model") or {}
    stage = stage or stage_of(conf)
    if stage is None and template is None:
        raise ConfigError("the checkpoint carries no TinyGPT-V config: pass --stage 1|2|3|4 "
                          "(it picks the prompt format and the image size)")
    if stage is not None and stage not in TEMPLATES:
        raise ConfigError(f"--stage: {stage} is not a TinyGPT-V stage (1-4)")
    template = template or TEMPLATES[stage]
    registry.load_builtins()
    get_template(template)  # an unknown name fails here, before any weights load
    size = image_size or model_conf.get("image_size")
    alpha = lora_alpha if lora_alpha is not None else float(model_conf.get("lora_alpha") or LORA_ALPHA)

    tok = tok_mod.load(tokenizer or lm)
    model_cfg = ModelConfig(
        vision=VisionConfig(arch="eva", name_or_path=blip2, select_layer=-1),
        lm=LMConfig(arch="phi", name_or_path=lm), projector="qformer",
        qformer=qformer_config(blip2), transforms=["tinygptv_norms"], dtype=dtype)
    if "llama_proj.weight" in state:  # TinyGPT-V's is 4096 wide
        model_cfg = dataclasses.replace(model_cfg, qformer=dataclasses.replace(
            model_cfg.qformer, proj_hidden_size=int(state["llama_proj.weight"].shape[0])))
    vlm = build_vlm(model_cfg, tok.convert_tokens_to_ids(tok_mod.IMAGE_TOKEN), len(tok),
                    pretrained_connector=True)
    # TinyGPT-V's sizes: BLIP-2's own (224) in stages 1-3, twice that (448) in stage 4
    size = int(size or vlm.vision.image_size * (2 if stage == 4 else 1))
    eva.resize(vlm.vision, size)
    report = apply(vlm, state, lora_alpha=alpha, source=os.path.abspath(ckpt))
    model_cfg = describe(model_cfg, vlm)
    cfg = Config(model=model_cfg)
    export.save(vlm, tok, cfg, template, output, image_aspect="resize", model_cfg=model_cfg)
    summary = {"checkpoint": os.path.abspath(ckpt), "sha256": _sha256(ckpt), "stage": stage,
               "template": template, "image_size": size, "lm": lm, "blip2": blip2,
               "keys": len(state), "loaded": len(report.loaded), "lora_keys_merged": len(report.merged_lora),
               "ignored": len(report.ignored), "output": output, "report": report.to_dict()}
    with open(os.path.join(output, "tinygptv_import.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return {k: v for k, v in summary.items() if k != "report"}


def qformer_config(blip2_name_or_path: str):
    """model.qformer for the Q-Former of a BLIP-2 model (its dimensions, its weights)."""
    from transformers import Blip2Config

    from mllm import blip2
    from mllm.config import QFormerConfig
    conf = blip2.config(blip2_name_or_path)
    if not isinstance(conf, Blip2Config):
        raise InputError(f"--blip2: a {type(conf).__name__}, not a BLIP-2 model", path=blip2_name_or_path)
    q = conf.qformer_config
    return QFormerConfig(name_or_path=blip2_name_or_path, num_query_tokens=conf.num_query_tokens,
                         hidden_size=q.hidden_size, num_layers=q.num_hidden_layers,
                         num_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
                         cross_attention_frequency=q.cross_attention_frequency)


def describe(model_cfg, vlm):
    """The model config with the dimensions of what was actually built (for the export)."""
    v, c = vlm.vision.model.config, vlm.language_model.config
    vision = dataclasses.replace(model_cfg.vision, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                 num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads,
                                 image_size=v.image_size, patch_size=v.patch_size)
    lm = dataclasses.replace(model_cfg.lm, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                             num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                             vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings)
    return dataclasses.replace(model_cfg, vision=vision, lm=lm)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
