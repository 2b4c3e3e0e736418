"""Trainer configuration: dataclass groups loaded from YAML.

A YAML file mirrors `Config` group by group (`model.vision`, `model.lm`, `data`, `lora`,
`stage1`, `stage2`, `run`); anything it leaves out takes the default written on the field
below, and nowhere else. `load(path, overrides)` validates everything it reads, collects
every problem, and raises one `ConfigError` listing them all.

Each YAML in configs/train/ starts with a comment giving the command that runs it.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from pipelines.errors import ConfigError


@dataclass
class VisionConfig:
    """The vision tower. With `name_or_path` the weights load from the hub or a folder and
    the dimensions below are ignored; without it a random tower is built from them."""

    arch: Literal["siglip", "clip"] = "siglip"
    """Family: SigLIP (no CLS token) or CLIP (its CLS token is dropped)."""
    name_or_path: str | None = None
    """Hub name (e.g. google/siglip-so400m-patch14-384) or local folder of real weights."""
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    select_layer: int = -2
    """Which hidden state feeds the projector; -2 is the penultimate layer (LLaVA/Bunny)."""


@dataclass
class LMConfig:
    """The causal language model. With `name_or_path` the weights load from the hub or a
    folder; without it a random model of `arch` is built from the dimensions below."""

    arch: Literal["phi", "llama", "qwen2"] = "phi"
    name_or_path: str | None = None
    """Hub name (e.g. microsoft/phi-2) or local folder of real weights."""
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    """Grouped-query heads for llama/qwen2 random models (None = num_heads)."""
    vocab_size: int = 51200
    """Rows of the embedding table; grown to fit the tokenizer if smaller."""
    max_position_embeddings: int = 2048
    initializer_range: float | None = None
    """Std of random-init weights (None = the architecture's default, 0.02). Tiny random
    models need more: with 0.02 and a 64-wide model the frozen output head can only
    produce logits within about +-1, so no adapter could make the loss fall."""


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    projector: str = "mlp2x_gelu"
    """A name in mllm.projector.REGISTRY (mlp2x_gelu, linear, ...)."""
    transforms: list[str] = field(default_factory=list)
    """Names in mllm.model.TRANSFORMS applied, in order, after the model is built."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the frozen weights (trainable weights stay float32)."""


@dataclass
class DataConfig:
    tokenizer: str = "local"
    """'local' builds a small BPE tokenizer from the training text (tests, demo);
    otherwise a hub name or folder (e.g. microsoft/phi-2)."""
    tokenizer_vocab_size: int = 512
    """Vocabulary size of the 'local' tokenizer."""
    max_length: int = 2048
    """Tokens per sample after <image> expansion; text is cut, image tokens never are."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    group_by_modality_length: bool = True
    """Batches hold one modality (image or text-only) and similar lengths (LLaVA)."""
    megabatch: int = 8
    """Global batches sorted by length together when grouping (more = less padding)."""
    image_aspect: Literal["pad", "resize"] = "pad"
    """'pad' to a square with the mean colour (LLaVA-1.5), or plain 'resize'."""
    strict: bool = False
    """Every row is checked before step 1; a row that fails (missing or unreadable image,
    image tokens past max_length, text-only in stage 1, ...) goes to
    <stage>/rejects.parquet and the run trains on the rest. True stops the run instead."""


@dataclass
class LoraConfig:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    include_lm_head: bool = False
    """LLaVA/Bunny leave the output head out of LoRA; set true to include it."""


@dataclass
class StageConfig:
    """One training stage. Stage 1 trains the projector; stage 2 adds LoRA on the LM."""

    table: str = "mix"
    """Manifest table to train on ('stage1' captions, or the 'mix')."""
    template: str = "bunny"
    """Conversation template (mllm.templates.REGISTRY): plain, bunny, llama3, qwen2."""
    lr: float = 2e-4
    projector_lr: float | None = None
    """Projector learning rate in stage 2 (None = lr)."""
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int | None = None
    """Optimizer steps; when set, overrides epochs."""
    micro_batch_size: int = 16
    """Samples per forward pass on each process."""
    global_batch_size: int = 128
    """Samples per optimizer step over all processes; must be micro_batch_size x world
    size x an integer (the gradient accumulation steps)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 = autocast to bfloat16 (master weights stay float32)."""
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = 1.0
    init_from: str | None = None
    """Exported model folder to start from (stage 2: the stage-1 'final' folder; None
    means `<output_dir>/stage1/final`)."""
    save_every: int = 500
    """Write a checkpoint every N optimizer steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted)."""
    log_every: int = 1


@dataclass
class RunConfig:
    output_dir: str = "runs/train"
    seed: int = 42
    stage: Literal[1, 2] = 1
    """Stage `warren train` runs when --stage is not given."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(
        table="stage1", template="plain", lr=5e-4, global_batch_size=256, micro_batch_size=32))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(
        table="mix", template="bunny", lr=2e-4, projector_lr=2e-5, global_batch_size=128))
    run: RunConfig = field(default_factory=RunConfig)

    def stage(self, n: int) -> StageConfig:
        return self.stage1 if int(n) == 1 else self.stage2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading and checks

def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_value(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Coerce/check one YAML value against a type hint; append a problem if it fails."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], where, problems) if len(inner) == 1 else value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            problems.append(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        (item,) = typing.get_args(tp)
        return [_check_value(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        return _merge(tp(), value, where, problems)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 5e-4 (no dot) as a string: accept it when it parses.
            try:
                return float(value) if isinstance(value, str) else _bad(where, value, "a number", problems)
            except ValueError:
                return _bad(where, value, "a number", problems)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return _bad(where, value, "an integer", problems)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            return _bad(where, value, "true or false", problems)
        return value
    if tp is str:
        if not isinstance(value, str):
            return _bad(where, value, "a string", problems)
        return value
    return value


def _bad(where: str, value: Any, what: str, problems: list[str]) -> Any:
    problems.append(f"{where}: expected {what}, got {value!r}")
    return value


def _merge(default: Any, data: Any, where: str, problems: list[str]) -> Any:
    """Apply a YAML mapping onto a dataclass instance (its defaults), recursively."""
    if data is None:
        return default
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {data!r}")
        return default
    cls = type(default)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        sub = f"{where}.{key}"
        if key not in names:
            problems.append(f"{sub}: unknown key (known: {', '.join(sorted(names))})")
        elif _is_dataclass_type(hints[key]):
            kwargs[key] = _merge(getattr(default, key), value, sub, problems)
        else:
            kwargs[key] = _check_value(value, hints[key], sub, problems)
    return dataclasses.replace(default, **kwargs)


def _set_dotted(doc: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = doc
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: '{p}' is not a group")
    node[parts[-1]] = value


def from_dict(doc: dict | None, overrides: dict[str, Any] | None = None,
              source: str | None = None) -> Config:
    """Build and validate a Config from a mapping plus dotted overrides
    (e.g. {"stage1.max_steps": 10})."""
    doc = copy.deepcopy(doc or {})  # overrides must not leak into the caller's mapping
    for key, value in (overrides or {}).items():
        _set_dotted(doc, key, value)
    problems: list[str] = []
    cfg = _merge(Config(), doc, "", problems)
    # _merge prefixes keys with '.' at the top level; strip it for readable messages.
    problems = [p[1:] if p.startswith(".") else p for p in problems]
    if not problems:
        problems = validate(cfg)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def load(path: str, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config file (see configs/train/) and validate it."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError("file not found", source=str(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML ({e})", source=str(path)) from None
    if doc is not None and not isinstance(doc, dict):
        raise ConfigError("the top level must be a mapping", source=str(path))
    return from_dict(doc, overrides, source=str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """'stage1.max_steps=10' -> ('stage1.max_steps', 10) (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def validate(cfg: Config) -> list[str]:
    """Every cross-field problem of a structurally valid config, as readable lines."""
    from mllm import projector, templates, tinygptv  # noqa: F401  (registries; tinygptv adds TinyGPT-V's options)

    p: list[str] = []
    v, lm = cfg.model.vision, cfg.model.lm
    if v.name_or_path is None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "image_size", "patch_size"):
            if getattr(v, name) <= 0:
                p.append(f"model.vision.{name}: must be > 0")
        if v.image_size < v.patch_size:
            p.append(f"model.vision.image_size: {v.image_size} is smaller than patch_size {v.patch_size}")
        if v.hidden_size % max(v.num_heads, 1):
            p.append("model.vision.hidden_size: must be divisible by num_heads")
        if not -v.num_layers <= v.select_layer < v.num_layers:
            p.append(f"model.vision.select_layer: {v.select_layer} is outside the "
                     f"{v.num_layers}-layer tower")
    if lm.name_or_path is None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "vocab_size", "max_position_embeddings"):
            if getattr(lm, name) <= 0:
                p.append(f"model.lm.{name}: must be > 0")
        if lm.hidden_size % max(lm.num_heads, 1):
            p.append("model.lm.hidden_size: must be divisible by num_heads")
        if lm.num_kv_heads is not None and lm.num_heads % max(lm.num_kv_heads, 1):
            p.append("model.lm.num_kv_heads: must divide num_heads")
    if cfg.model.projector not in projector.REGISTRY:
        p.append(f"model.projector: unknown '{cfg.model.projector}' "
                 f"(known: {', '.join(sorted(projector.REGISTRY))})")
    from mllm.model import TRANSFORMS
    for t in cfg.model.transforms:
        if t not in TRANSFORMS:
            p.append(f"model.transforms: unknown '{t}' (known: {', '.join(sorted(TRANSFORMS)) or 'none'})")
    if cfg.data.tokenizer == "local" and cfg.data.tokenizer_vocab_size < 64:
        p.append("data.tokenizer_vocab_size: must be >= 64")
    if cfg.data.max_length < 8:
        p.append("data.max_length: must be >= 8")
    if cfg.data.megabatch <= 0:
        p.append("data.megabatch: must be > 0")
    if cfg.data.num_workers < 0:
        p.append("data.num_workers: must be >= 0")
    if cfg.lora.r <= 0 or cfg.lora.alpha <= 0:
        p.append("lora.r and lora.alpha: must be > 0")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        p.append("lora.dropout: must be in [0, 1)")
    for n in (1, 2):
        s, w = cfg.stage(n), f"stage{n}"
        if s.template not in templates.REGISTRY:
            p.append(f"{w}.template: unknown '{s.template}' "
                     f"(known: {', '.join(sorted(templates.REGISTRY))})")
        if s.lr <= 0 or (s.projector_lr is not None and s.projector_lr <= 0):
            p.append(f"{w}.lr: learning rates must be > 0")
        if not 0.0 <= s.warmup_ratio < 1.0:
            p.append(f"{w}.warmup_ratio: must be in [0, 1)")
        if s.micro_batch_size <= 0 or s.global_batch_size <= 0:
            p.append(f"{w}: batch sizes must be > 0")
        elif s.global_batch_size % s.micro_batch_size:
            p.append(f"{w}.global_batch_size: {s.global_batch_size} is not a multiple of "
                     f"micro_batch_size {s.micro_batch_size}")
        if s.max_steps is not None and s.max_steps <= 0:
            p.append(f"{w}.max_steps: must be > 0")
        if s.max_steps is None and s.epochs <= 0:
            p.append(f"{w}.epochs: must be > 0")
        if len(s.betas) != 2 or not all(0.0 <= b < 1.0 for b in s.betas):
            p.append(f"{w}.betas: expected two numbers in [0, 1)")
        if s.save_every <= 0 or s.log_every <= 0 or s.keep_last <= 0:
            p.append(f"{w}: save_every, log_every and keep_last must be > 0")
        if s.max_grad_norm is not None and s.max_grad_norm <= 0:
            p.append(f"{w}.max_grad_norm: must be > 0 or null")
    return p
