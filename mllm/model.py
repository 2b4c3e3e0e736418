"""The compact VLM: frozen vision tower -> projector -> causal LM.

`<image>` is expanded by the data pipeline into `num_image_tokens` copies of the image
token id, so every sequence length is known before the forward pass (truncation can
protect the image span, and batches pad exactly). The model swaps those placeholder
embeddings for the projected patch features, in order: the k-th image in
`pixel_values` fills the k-th run of placeholders in the batch (row-major).

`build_vlm(cfg)` is the one place a model is assembled. The parts a config names are
looked up in mllm.registry: the vision tower by `model.vision.arch`, the connector by
`model.projector`, and `model.transforms` (e.g. TinyGPT-V's norms), whose LM settings are
applied when the LM is built and whose hooks run after, in the order listed.
`trainable_set` is the one place that says what trains in a stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mllm import projector as projectors
from mllm import registry
from mllm.config import Config, LMConfig, ModelConfig
from pipelines.errors import WarrenError

IGNORE_INDEX = -100


class ImageTokenMismatch(WarrenError):
    """The batch's image placeholders do not match the images given."""


@dataclass
class VLMOutput:
    """`loss` is the mean over supervised tokens; `loss_sum` and `num_tokens` let a
    trainer normalise over a whole accumulated step instead of per micro-batch."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None

    # HF Trainer reads outputs["loss"] or outputs[0].
    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return [v for v in (self.loss, self.logits) if v is not None][key]

    def keys(self):
        return [k for k in ("loss", "logits") if getattr(self, k) is not None]


class VLM(nn.Module):
    # Read by transformers/peft utilities that walk sub-modules (weight conversions).
    base_model_prefix = ""

    def __init__(self, vision: nn.Module, projector: projectors.Projector,
                 language_model: nn.Module, image_token_id: int):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = int(image_token_id)

    @property
    def num_image_tokens(self) -> int:
        """Placeholders one `<image>` expands into."""
        return self.projector.num_image_tokens(self.vision.num_patches)

    @property
    def config(self):
        # Lets HF utilities that peek at `model.config` (Trainer, peft) work on the VLM.
        return self.language_model.config

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vision(pixel_values)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(features.to(proj_dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by projected features."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        n_slots = int(mask.sum())  # note: a host sync, once per forward
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_images * self.num_image_tokens:
            raise ImageTokenMismatch(
                f"batch has {n_slots} image placeholders but {n_images} image(s) x "
                f"{self.num_image_tokens} tokens; expand <image> with the data pipeline")
        if n_images:
            feats = self.image_features(pixel_values).reshape(-1, embeds.shape[-1])
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                supervised_logits_only: bool = False) -> VLMOutput:
        """Causal-LM forward. With `labels`, the loss is next-token cross-entropy on the
        positions whose label is not IGNORE_INDEX.

        `supervised_logits_only` computes the output head only at supervised positions
        (no logits are returned): the head over image and prompt tokens is work whose
        result the loss never reads. Same loss, less compute and memory.
        """
        embeds = self.embed(input_ids, pixel_values)
        lm = self.language_model
        fast = (supervised_logits_only and labels is not None
                and getattr(lm.config, "final_logit_softcapping", None) is None)
        if fast:
            hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                      use_cache=False).last_hidden_state
            target = labels[:, 1:]
            keep = target != IGNORE_INDEX
            logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
            loss_sum = F.cross_entropy(logits.float(), target[keep], reduction="sum")
            n = keep.sum()
            return VLMOutput(loss=loss_sum / n.clamp(min=1), loss_sum=loss_sum, num_tokens=n)
        logits = lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
        if labels is None:
            return VLMOutput(logits=logits)
        target = labels[:, 1:]
        loss_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        n = (target != IGNORE_INDEX).sum()
        return VLMOutput(loss=loss_sum / n.clamp(min=1), logits=logits, loss_sum=loss_sum,
                         num_tokens=n)


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_lm(cfg: LMConfig, vocab_size: int | None = None,
             dtype: torch.dtype = torch.float32, transforms: list[str] = (),
             **load_kwargs) -> nn.Module:
    """A causal LM from real weights (`cfg.name_or_path`: hub name such as microsoft/phi-2,
    or a local folder) or a random one of `cfg.arch` with the dimensions in `cfg`, with
    the LM settings of the named `transforms` (e.g. TinyGPT-V's norms; see
    mllm.stabilizers). `vocab_size` (the tokenizer's length) grows the embedding table
    when larger. `load_kwargs` go to from_pretrained (quantization_config, device_map)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mllm import stabilizers
    registry.load_builtins()  # Warren's LM classes (norms) must be known to the Auto classes
    settings = registry.lm_config(list(transforms), cfg.arch)
    if cfg.name_or_path:
        config = stabilizers.with_norms(AutoConfig.from_pretrained(cfg.name_or_path),
                                        settings.get("warren_norms"))
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=config, dtype=dtype,
                                                     **load_kwargs)
    else:
        from transformers import LlamaConfig, PhiConfig, Qwen2Config
        config_cls = {"phi": PhiConfig, "llama": LlamaConfig, "qwen2": Qwen2Config}[cfg.arch]
        kw = dict(vocab_size=max(cfg.vocab_size, vocab_size or 0), hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads,
                  max_position_embeddings=cfg.max_position_embeddings)
        if cfg.initializer_range is not None:
            kw["initializer_range"] = cfg.initializer_range
        if cfg.arch != "phi":
            kw["num_key_value_heads"] = cfg.num_kv_heads or cfg.num_heads
        config = stabilizers.with_norms(config_cls(**kw), settings.get("warren_norms"))
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    stabilizers.float_hooked_norms(model)
    if vocab_size and model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model


def build_vlm(model_cfg: ModelConfig, image_token_id: int, vocab_size: int | None = None,
              transforms: list[Callable[[VLM, ModelConfig], VLM]] | None = None,
              pretrained_connector: bool = False, lm_load_kwargs: dict | None = None) -> VLM:
    """Assemble the VLM. Every dimension comes from `model_cfg`; real tower and LM weights
    load where it names them. The connector is fresh (float32) unless
    `pretrained_connector` (the start of training: `from_config`) loads the weights its
    config names (e.g. a BLIP-2 Q-Former); an export's own connector weights are loaded
    by `mllm.export.load`. `transforms` run after the named ones in the config."""
    dtype = _TORCH_DTYPES[model_cfg.dtype]
    tower = registry.vision_builder(model_cfg.vision.arch)(model_cfg.vision, dtype)
    lm = build_lm(model_cfg.lm, vocab_size, dtype, model_cfg.transforms, **(lm_load_kwargs or {}))
    proj = projectors.build(model_cfg.projector, tower.hidden_size, lm.config.hidden_size,
                            **_connector_kwargs(model_cfg))
    if pretrained_connector and hasattr(proj, "load_pretrained"):
        proj.load_pretrained()
    vlm = VLM(tower, proj, lm, image_token_id)
    for name in model_cfg.transforms:
        t = registry.transform(name)
        if t.apply is not None:
            vlm = t.apply(vlm, model_cfg)
    for fn in transforms or []:
        vlm = fn(vlm, model_cfg)
    return vlm


def _connector_kwargs(model_cfg: ModelConfig) -> dict:
    """Builder arguments a connector takes from the model config (the Q-Former's group)."""
    registry.load_builtins()
    builder = projectors.REGISTRY.get(model_cfg.projector)
    return {"model_cfg": model_cfg} if getattr(builder, "takes_model_cfg", False) else {}


def from_config(cfg: Config, tokenizer) -> VLM:
    """The VLM for a trainer config and its tokenizer (which owns the `<image>` id), with
    the pretrained connector weights its config names."""
    from mllm.tokenizer import IMAGE_TOKEN
    return build_vlm(cfg.model, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), len(tokenizer),
                     pretrained_connector=True)


# ------------------------------------------------------------------ what trains

def trainable_set(model: nn.Module, vlm: VLM, model_cfg: ModelConfig) -> list[str]:
    """Make trainable, after the trainer froze everything (and wrapped LoRA, whose
    adapters peft left trainable): the connector, float32, except the parts it keeps
    frozen (`frozen_parts()`, e.g. TinyGPT-V's Q-Former and query tokens); and the LM
    parameters the transforms name (e.g. TinyGPT-V's norm weights), float32. Returns
    the names of every trainable parameter of `model`."""
    from mllm import stabilizers
    vlm.projector.float().requires_grad_(True)
    frozen = getattr(vlm.projector, "frozen_parts", lambda: ())()
    for part in frozen:
        target = getattr(vlm.projector, part)
        target.requires_grad_(False)
    stabilizers.enable_trainable(vlm.language_model, registry.trainable_patterns(model_cfg.transforms))
    return [n for n, p in model.named_parameters() if p.requires_grad]
