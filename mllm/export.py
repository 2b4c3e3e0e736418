"""A trained VLM as one folder that loads with one call: `mllm.export.load(folder)`.

    warren_vlm.json       format, model config, image token id, template, image size
    vision/               the tower (transformers save_pretrained: config + safetensors)
    language_model/       the LM, LoRA already merged in
    projector.safetensors
    tokenizer/
    config.yaml           the resolved trainer config that produced it

Loading goes through the same `from_pretrained` path as real hub weights: the export
is a ModelConfig whose `name_or_path`s point at the sub-folders.

`load` also takes a transformers Llava folder (`warren export --format llava-hf`, see
mllm.llava_hf), told apart by its files: `warren_vlm.json` here, a `config.json` of
model_type "llava" there. Either way the result is a `Loaded`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import dataclass

import yaml
from safetensors.torch import load_file, save_file

from mllm.config import Config, LMConfig, ModelConfig, VisionConfig
from mllm.data import ImageProcessor
from mllm.model import VLM, build_vlm
from mllm.templates import Template
from mllm.templates import get as get_template
from pipelines.errors import InputError

FORMAT = 1
META = "warren_vlm.json"


@contextlib.contextmanager
def quiet_hf():
    """No transformers progress bars ('Loading weights', 'Writing model shards') while
    saving/loading sub-models: the trainer has its own progress bar."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def staged_folder(folder: str):
    """A temporary sibling of `folder` to write a model into; renamed over `folder` when
    the block succeeds, removed when it fails (a killed export leaves no half folder
    under the final name)."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(folder)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def save(vlm: VLM, tokenizer, cfg: Config, template: str, folder: str,
         image_aspect: str = "pad", model_cfg: ModelConfig | None = None) -> str:
    """Write the export folder atomically (a temporary sibling renamed into place).
    `model_cfg` describes `vlm` (default: cfg.model)."""
    with staged_folder(folder) as tmp:
        with quiet_hf():
            vlm.vision.model.save_pretrained(os.path.join(tmp, "vision"))
            vlm.language_model.save_pretrained(os.path.join(tmp, "language_model"))
        save_file({k: v.detach().cpu().contiguous() for k, v in vlm.projector.state_dict().items()},
                  os.path.join(tmp, "projector.safetensors"))
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        meta = {"format": FORMAT, "model": dataclasses.asdict(model_cfg or cfg.model),
                "image_token_id": vlm.image_token_id, "template": template,
                "num_image_tokens": vlm.num_image_tokens, "image_aspect": image_aspect}
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    return folder


@dataclass
class Loaded:
    model: VLM
    tokenizer: object
    template: Template
    processor: ImageProcessor
    meta: dict
    model_cfg: ModelConfig


def kind(folder: str) -> str | None:
    """'warren' (this module's export), 'llava-hf' (mllm.llava_hf), or None."""
    from mllm import llava_hf
    if os.path.exists(os.path.join(folder, META)):
        return "warren"
    if llava_hf.is_folder(folder):
        return llava_hf.FORMAT
    return None


def tokenizer_dir(folder: str) -> str:
    """Where a model folder of either kind keeps its tokenizer."""
    return os.path.join(folder, "tokenizer") if kind(folder) == "warren" else folder


def load(folder: str, dtype: str | None = None, device: str = "cpu",
         template: str | None = None) -> Loaded:
    """Model, tokenizer, template and image processor of an export folder (Warren's or
    a Llava folder; `template` names the template of a Llava folder Warren did not write)."""
    found = kind(folder)
    if found is None:
        raise InputError(f"not a model folder (no {META}, and no config.json of a Llava model)",
                         path=folder)
    if found != "warren":
        from mllm import llava_hf
        return llava_hf.load(folder, dtype=dtype, device=device, template=template)
    meta_path = os.path.join(folder, META)
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise InputError(f"unsupported export format {meta.get('format')!r}", path=folder)
    saved = model_config(meta["model"])
    model_cfg = dataclasses.replace(
        saved, dtype=dtype or saved.dtype,
        vision=dataclasses.replace(saved.vision, name_or_path=os.path.join(folder, "vision")),
        lm=dataclasses.replace(saved.lm, name_or_path=os.path.join(folder, "language_model")))
    from mllm import tokenizer as tok_mod
    tokenizer = tok_mod.load(os.path.join(folder, "tokenizer"))
    with quiet_hf():
        vlm = build_vlm(model_cfg, meta["image_token_id"], len(tokenizer))
    vlm.projector.load_state_dict(load_file(os.path.join(folder, "projector.safetensors")))
    vlm.to(device).eval()
    mean, std = vlm.vision.normalisation
    processor = ImageProcessor(vlm.vision.image_size, mean, std, meta.get("image_aspect", "pad"))
    return Loaded(vlm, tokenizer, get_template(meta["template"]), processor, meta,
                  model_config(meta["model"]))


def model_config(d: dict) -> ModelConfig:
    """A ModelConfig from its dict form (as warren_vlm.json stores it)."""
    d = dict(d)
    return ModelConfig(vision=VisionConfig(**d.pop("vision")), lm=LMConfig(**d.pop("lm")), **d)
