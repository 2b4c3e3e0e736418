"""A Warren VLM as transformers' Llava: `LlavaForConditionalGeneration` and
`AutoProcessor` load the folder as they are (no trust_remote_code), and Warren loads
such a folder back (`mllm.export.load`, `--init-from`, `warren generate`).

    warren export --checkpoint runs/x/stage2/final --format llava-hf --output runs/x/hf

    config.json                  LlavaConfig: the tower's SiglipVisionConfig/CLIPVisionConfig,
                                 the LM's config, image token id, feature layer and strategy
    model.safetensors            model.vision_tower.*, model.multi_modal_projector.linear_{1,2}.*,
                                 model.language_model.*, lm_head.weight (LoRA merged)
    generation_config.json       eos = the template's end token
    tokenizer files              the training tokenizer (with <image>)
    chat_template.jinja          the training template (see `chat_template`)
    preprocessor_config.json     LlavaImageProcessor: pad to square with the mean colour,
    processor_config.json        bicubic resize, the tower's normalisation
    warren_llava.json            what Warren needs to load it back (template, image aspect,
                                 the ModelConfig it was trained as)
    lineage.json, README.md      the model card (mllm.lineage)

The mapping is exact: Llava's tower is the same transformers class as Warren's,
`vision_feature_layer` = `select_layer`, `vision_feature_select_strategy` is "full" for
SigLIP (every patch) and "default" for CLIP (CLS dropped), `multi_modal_projector`
(linear_1, gelu, linear_2) is `mlp2x_gelu`, and Llava's language model is the LM's
decoder with its output head beside it. What Llava cannot express is refused in one
line: TinyGPT-V's stabilisers (norms inside the LM's attention), a resampler or
Q-Former connector, another projector, and an output head with a bias (Phi's `lm_head`
has one; Llava's has none, so a non-zero bias would change every logit: export it
anyway only with `drop_head_bias=True`, which the card then records).
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from mllm.config import LMConfig, ModelConfig, VisionConfig
from mllm.tokenizer import IMAGE_TOKEN
from pipelines.errors import ConfigError, InputError

FORMAT = "llava-hf"
META = "warren_llava.json"
META_VERSION = 1

# Warren's vision arch <-> Llava's feature strategy ("full" keeps every token, "default"
# drops the first one, CLIP's CLS).
STRATEGY = {"siglip": "full", "clip": "default"}
VISION_TYPES = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}
LM_ARCH = {"phi": "phi", "llama": "llama", "qwen2": "qwen2"}


class NotExportable(ConfigError):
    """The model has parts transformers' Llava has no place for."""


# ----------------------------------------------------------------------- checks

def problems(vlm, model_cfg: ModelConfig, drop_head_bias: bool = False) -> list[str]:
    """Why `vlm` cannot be written as a Llava folder (empty when it can)."""
    p = []
    if model_cfg.transforms:
        p.append(f"it uses TinyGPT-V's stabilisers ({', '.join(model_cfg.transforms)}), norms inside the "
                 "LM that LlavaForConditionalGeneration has no place for")
    elif any(getattr(m, "always_trainable", False) for m in vlm.modules()):
        p.append("it carries modules outside the Llava layout (always-trainable norms)")
    if model_cfg.projector != "mlp2x_gelu":
        p.append(f"its connector is '{model_cfg.projector}'; Llava's multi_modal_projector is "
                 "mlp2x_gelu only (a resampler or Q-Former has no Llava equivalent)")
    if vlm.vision.arch not in STRATEGY:
        p.append(f"vision tower '{vlm.vision.arch}' is not SigLIP or CLIP")
    head = vlm.language_model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    if bias is not None and not drop_head_bias:
        peak = float(bias.detach().abs().max())
        if peak != 0.0:
            p.append(f"the LM's output head has a bias (max |b| = {peak:.3g}) and Llava's lm_head has "
                     "none, so every logit would change; pass --drop-head-bias to export anyway")
    return p


def check(vlm, model_cfg: ModelConfig, drop_head_bias: bool = False) -> None:
    found = problems(vlm, model_cfg, drop_head_bias)
    if found:
        raise NotExportable(f"cannot export as {FORMAT}: " + "; ".join(found)
                            + " (Warren's own format keeps it: mllm.export.load)")


# ---------------------------------------------------------------- chat template

def _join(text: str, value: str, placeholder: str, **fixed: str) -> str:
    """Jinja printing `text` with `{placeholder}` as the Jinja expression `value` and the
    fixed fields (`{end}`, `{system}`) filled in, as Template renders them."""
    for key, filled in fixed.items():
        text = text.replace("{" + key + "}", filled)
    parts = text.split("{" + placeholder + "}")
    return "{{- " + f" + {value} + ".join(_lit(p) for p in parts) + " -}}"


def _lit(s: str) -> str:
    """A Jinja string literal."""
    return json.dumps(s, ensure_ascii=False)


def chat_template(template, tokenizer) -> str:
    """Jinja rendering `template` as Warren does, over transformers' message format:
    `[{"role": "system"|"user"|"assistant", "content": str | [{"type": "image"},
    {"type": "text", "text": ...}]}]`. An image item (or `<image>` in the text) puts
    `<image>\\n` in front of the user's text, which is stripped, as LLaVA's
    preprocess_multimodal does; a system message replaces the default system prompt."""
    if type(template).segments is not _base_segments():
        raise NotExportable(f"template '{template.name}' renders turns its own way "
                            "(a task template); export a model trained with a plain template")
    from mllm.encoding import start_text
    end = template.end_token(tokenizer)
    start = start_text(tokenizer) if getattr(template, "bos", False) else ""
    return (
        "{%- set ns = namespace(system=" + _lit(template.system) + ") -%}\n"
        "{%- set msgs = messages -%}\n"
        "{%- if messages and messages[0]['role'] == 'system' -%}\n"
        "  {%- set c = messages[0]['content'] -%}\n"
        "  {%- set ns.system = c if c is string else (c | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('\\n')) -%}\n"
        "  {%- set msgs = messages[1:] -%}\n"
        "{%- endif -%}\n"
        + ("{{- " + _lit(start) + " -}}\n" if start else "")
        + (_join(template.prefix, "ns.system", "system") + "\n" if template.prefix else "")
        + "{%- for m in msgs -%}\n"
        "  {%- set c = m['content'] -%}\n"
        "  {%- if c is string -%}{%- set text = c -%}{%- set n_image = 0 -%}\n"
        "  {%- else -%}\n"
        "    {%- set text = c | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}\n"
        "    {%- set n_image = c | selectattr('type', 'equalto', 'image') | list | length -%}\n"
        "  {%- endif -%}\n"
        "  {%- if m['role'] == 'user' -%}\n"
        "    {%- if n_image > 0 or '<image>' in text -%}\n"
        "      {%- set text = ('<image>\\n' + (text | replace('<image>', '') | trim)) | trim -%}\n"
        "    {%- endif -%}\n"
        + ("" if template.prompt_text else
           "    {%- set text = '<image>' if '<image>' in text else '' -%}\n")
        + "    " + _join(template.user, "text", "content", system=template.system) + "\n"
        "    {%- if not loop.last or add_generation_prompt -%}{{- " + _lit(template.assistant) + " -}}{%- endif -%}\n"
        "  {%- elif m['role'] == 'assistant' -%}\n"
        "    " + _join(template.answer, "text", "content", end=end) + "\n"
        + ("    {{- " + _lit(template.after) + " -}}\n" if template.after else "")
        + "  {%- endif -%}\n"
        "{%- endfor -%}\n")


def _base_segments():
    from mllm.templates import Template
    return Template.segments


def warren_text(template, conversations: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """The text Warren's template renders for a conversation (before tokenization)."""
    render = getattr(template, "render", None)
    if callable(render):
        return render(conversations, tokenizer, add_generation_prompt=add_generation_prompt)
    return "".join(t for t, _ in template.segments(conversations, tokenizer, add_generation_prompt))


def to_messages(conversations: list[dict], image=None) -> list[dict]:
    """LLaVA-format turns (`from`: human|gpt|system, `value`) as transformers chat
    messages; the first human turn carries `image` (a PIL image, path or URL, or True
    for an image item without data) when the conversation has `<image>` or an image is given."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    out, placed = [], False
    for turn in conversations:
        role = roles[turn["from"]]
        text = turn["value"]
        if role == "user" and not placed and (image is not None or IMAGE_TOKEN in text):
            item = {"type": "image"}
            if image is not None and image is not True:
                item["image"] = image
            out.append({"role": role, "content": [item, {"type": "text",
                                                         "text": text.replace(IMAGE_TOKEN, "").strip()}]})
            placed = True
        else:
            out.append({"role": role, "content": text})
    return out


_PROBES = [
    [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red square."}],
    [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A red square."}],
    [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red square."}],
    [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Red."},
     {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "A circle, on the left."}],
    [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello!"}],
]


def verify_chat_template(jinja: str, template, tokenizer) -> None:
    """Render probe conversations (and their generation prompts) both ways; refuse the
    export if the Jinja text differs from Warren's by one character. Conversations the
    template does not take (stage-1 'plain' takes one image-caption pair) are skipped."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from mllm.templates import ConversationError
    checked = 0
    for conv in _PROBES:
        for gen in (False, True):
            turns = conv[:-1] if gen else conv
            try:
                want = warren_text(template, turns, tokenizer, add_generation_prompt=gen)
            except ConversationError:
                continue
            got, _ = render_jinja_template(conversations=[to_messages(turns)], chat_template=jinja,
                                           add_generation_prompt=gen, **tokenizer.special_tokens_map)
            if got[0] != want:
                raise NotExportable(f"template '{template.name}': the chat template renders {got[0]!r} "
                                    f"where Warren renders {want!r}")
            checked += 1
    if not checked:
        raise NotExportable(f"template '{template.name}' renders none of the probe conversations")


# ---------------------------------------------------------------------- writing

def llava_config(vlm):
    from transformers import LlavaConfig
    lm = vlm.language_model
    text = lm.config.to_dict()
    text["vocab_size"] = lm.get_input_embeddings().num_embeddings
    return LlavaConfig(
        vision_config=vlm.vision.model.config.to_dict(), text_config=text,
        image_token_index=vlm.image_token_id, image_seq_length=vlm.num_image_tokens,
        vision_feature_layer=vlm.vision.select_layer,
        vision_feature_select_strategy=STRATEGY[vlm.vision.arch],
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))


def state_dict(vlm) -> dict[str, torch.Tensor]:
    """Warren's weights under Llava's names (tensors shared, not copied)."""
    sd = {f"model.vision_tower.{k}": v for k, v in vlm.vision.model.state_dict().items()}
    net = vlm.projector.net
    for k, v in net[0].state_dict().items():
        sd[f"model.multi_modal_projector.linear_1.{k}"] = v
    for k, v in net[2].state_dict().items():
        sd[f"model.multi_modal_projector.linear_2.{k}"] = v
    lm = vlm.language_model
    sd.update({f"model.language_model.{k}": v for k, v in lm.get_decoder().state_dict().items()})
    sd["lm_head.weight"] = lm.get_output_embeddings().weight
    return sd


def image_processor(vlm, aspect: str):
    """LlavaImageProcessor doing what Warren's ImageProcessor does: pad to a square with
    the mean colour (aspect 'pad'), bicubic resize to the tower's size, normalise."""
    from transformers import LlavaImageProcessor
    from transformers.image_utils import PILImageResampling
    size = vlm.vision.image_size
    mean, std = vlm.vision.normalisation
    return LlavaImageProcessor(
        do_pad=aspect == "pad", do_resize=True, size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC, do_center_crop=False,
        crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(mean), image_std=list(std), do_convert_rgb=True)


def save(vlm, tokenizer, template, folder: str, image_aspect: str, model_cfg: ModelConfig,
         drop_head_bias: bool = False, lineage_doc: dict | None = None, source: str | None = None) -> str:
    """Write `vlm` as a Llava folder at `folder`, atomically (a temporary sibling renamed
    into place). `template` is a mllm.templates.Template."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

    from mllm import lineage
    from mllm.export import quiet_hf, staged_folder
    check(vlm, model_cfg, drop_head_bias)
    if os.path.isdir(folder) and os.listdir(folder) and not is_folder(folder):
        raise ConfigError(f"{folder} exists and holds files that are not a Llava export: "
                          "choose a new or empty output folder")
    jinja = chat_template(template, tokenizer)
    verify_chat_template(jinja, template, tokenizer)
    config = llava_config(vlm)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    sd = state_dict(vlm)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]
    llava.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=True, assign=True)
    end_id = tokenizer.convert_tokens_to_ids(template.end_token(tokenizer))
    llava.generation_config = GenerationConfig(eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    processor = LlavaProcessor(
        image_processor=image_processor(vlm, image_aspect), tokenizer=tokenizer,
        patch_size=vlm.vision.model.config.patch_size,
        vision_feature_select_strategy=STRATEGY[vlm.vision.arch],
        num_additional_image_tokens=1 if vlm.vision.arch == "clip" else 0,
        chat_template=jinja, image_token=IMAGE_TOKEN)
    head_bias = getattr(vlm.language_model.get_output_embeddings(), "bias", None)
    dropped = 0.0 if head_bias is None else float(head_bias.detach().abs().max())

    folder = os.path.abspath(folder)
    with staged_folder(folder) as tmp:
        with quiet_hf():
            llava.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        meta = {"format": FORMAT, "version": META_VERSION, "template": template.name,
                "image_aspect": image_aspect, "image_token_id": vlm.image_token_id,
                "num_image_tokens": vlm.num_image_tokens, "model": dataclasses.asdict(model_cfg),
                "head_bias_dropped": dropped}
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        lineage.update(tmp, **(lineage_doc or {}),
                       export={"format": FORMAT, "from": source, "template": template.name,
                               "image_aspect": image_aspect,
                               "vision_feature_select_strategy": STRATEGY[vlm.vision.arch],
                               "vision_feature_layer": vlm.vision.select_layer,
                               "image_tokens": vlm.num_image_tokens,
                               "head_bias_dropped": dropped})
    return folder


# ---------------------------------------------------------------------- reading

def is_folder(path: str) -> bool:
    """A folder whose config.json is a transformers Llava config."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            return json.load(f).get("model_type") == "llava"
    except (OSError, ValueError):
        return False


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, META)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _model_config(config, dtype: str) -> ModelConfig:
    v, t = config.vision_config, config.text_config
    arch = VISION_TYPES[v.model_type]
    vision = VisionConfig(arch=arch, name_or_path=None, hidden_size=v.hidden_size,
                          intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
                          num_heads=v.num_attention_heads, image_size=v.image_size,
                          patch_size=v.patch_size, select_layer=config.vision_feature_layer)
    lm = LMConfig(arch=LM_ARCH.get(t.model_type, t.model_type), name_or_path=None,
                  hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                  num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
                  num_kv_heads=getattr(t, "num_key_value_heads", None), vocab_size=t.vocab_size,
                  max_position_embeddings=t.max_position_embeddings)
    return ModelConfig(vision=vision, lm=lm, projector="mlp2x_gelu", transforms=[], dtype=dtype)


def _check_loadable(config, folder: str) -> None:
    p = []
    v = config.vision_config
    if v.model_type not in VISION_TYPES:
        p.append(f"vision tower '{v.model_type}' (Warren loads SigLIP and CLIP towers)")
    elif config.vision_feature_select_strategy != STRATEGY[VISION_TYPES[v.model_type]]:
        p.append(f"vision_feature_select_strategy '{config.vision_feature_select_strategy}' with a "
                 f"{VISION_TYPES[v.model_type]} tower (Warren uses "
                 f"'{STRATEGY[VISION_TYPES[v.model_type]]}')")
    if not isinstance(config.vision_feature_layer, int):
        p.append(f"several vision feature layers {config.vision_feature_layer}")
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        p.append(f"projector activation '{config.projector_hidden_act}' / bias "
                 f"{config.multimodal_projector_bias} (Warren's mlp2x_gelu: gelu with biases)")
    if p:
        raise InputError("a Llava folder Warren cannot load: " + "; ".join(p), path=folder)


def load(folder: str, dtype: str | None = None, device: str = "cpu", template: str | None = None):
    """A Llava folder as mllm.export.Loaded (Warren's VLM sharing Llava's modules).
    The template comes from warren_llava.json, or `template` for a folder Warren did
    not write."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration

    from mllm import projector as projectors
    from mllm import tokenizer as tok_mod
    from mllm.data import ImageProcessor
    from mllm.export import Loaded, quiet_hf
    from mllm.model import VLM
    from mllm.templates import get as get_template
    from mllm.vision import VisionTower

    meta = read_meta(folder)
    config = AutoConfig.from_pretrained(folder)
    _check_loadable(config, folder)
    name = template or meta.get("template")
    if name is None:
        raise InputError(f"a Llava folder without {META}: name its conversation template "
                         "(e.g. template='bunny' or 'vicuna_v1')", path=folder)
    saved_dtype = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    dtype = dtype or (saved_dtype if saved_dtype in ("float32", "bfloat16", "float16") else "float32")
    torch_dtype = getattr(torch, dtype)
    with quiet_hf():
        llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype)
    arch = VISION_TYPES[config.vision_config.model_type]
    tower = VisionTower(llava.model.vision_tower, arch, config.vision_feature_layer)
    mm = llava.model.multi_modal_projector
    proj = projectors.build("mlp2x_gelu", mm.linear_1.in_features, mm.linear_2.out_features)
    proj.net[0].load_state_dict(mm.linear_1.state_dict())
    proj.net[2].load_state_dict(mm.linear_2.state_dict())
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config.text_config)
    setattr(lm, lm.base_model_prefix, llava.model.language_model)
    lm.set_output_embeddings(llava.lm_head)
    left = [n for n, t in list(lm.named_parameters()) + list(lm.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover — an LM class with parts outside decoder + head
        raise InputError(f"the LM class {type(lm).__name__} has weights outside its decoder and "
                         f"head ({left[:3]})", path=folder)
    vlm = VLM(tower, proj, lm, config.image_token_index)
    if vlm.num_image_tokens != config.image_seq_length:
        raise InputError(f"image_seq_length {config.image_seq_length} but the tower gives "
                         f"{vlm.num_image_tokens} tokens", path=folder)
    vlm.to(device).eval()
    tokenizer = tok_mod.load(folder)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_index:
        raise InputError(f"the tokenizer's {IMAGE_TOKEN} id differs from image_token_index "
                         f"{config.image_token_index}", path=folder)
    model_cfg = _model_config(config, dtype)
    aspect = meta.get("image_aspect") or _aspect(folder)
    mean, std = vlm.vision.normalisation
    processor = ImageProcessor(vlm.vision.image_size, mean, std, aspect)
    info = {"format": FORMAT, "template": name, "image_token_id": vlm.image_token_id,
            "num_image_tokens": vlm.num_image_tokens, "image_aspect": aspect,
            "model": dataclasses.asdict(model_cfg),
            "trained_as": meta.get("model")}
    return Loaded(vlm, tokenizer, get_template(name), processor, info, model_cfg)


def _aspect(folder: str) -> str:
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return "pad" if json.load(f).get("do_pad") else "resize"
    return "pad"
