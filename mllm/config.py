"""Trainer configuration: dataclass groups loaded from YAML.

A YAML file mirrors `Config` group by group (`model.vision`, `model.lm`, `data`, `lora`,
`stage1`, `stage2`, `run`); anything it leaves out takes the default written on the field
below, and nowhere else. `load(path, overrides)` validates everything it reads, collects
every problem, and raises one `ConfigError` listing them all.

Each YAML in configs/train/ starts with a comment giving the command that runs it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines import config as shared_config
from pipelines.errors import ConfigError


@dataclass
class VisionConfig:
    """The vision tower. With `name_or_path` the weights load from the hub or a folder and
    the dimensions below are ignored; without it a random tower is built from them."""

    arch: Literal["siglip", "clip", "eva"] = "siglip"
    """Family: SigLIP (no CLS token), CLIP (its CLS token is dropped) or EVA (BLIP-2's
    EVA ViT-g as TinyGPT-V uses it: every token, CLS included, through its ln_vision;
    mllm.eva)."""
    name_or_path: str | None = None
    """Hub name (e.g. google/siglip-so400m-patch14-384) or local folder of real weights;
    for EVA a BLIP-2 model (e.g. Salesforce/blip2-flan-t5-xxl: its vision model is read)."""
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
class QFormerConfig:
    """The `qformer` connector (mllm.qformer): BLIP-2's Q-Former (learned queries that
    cross-attend to the vision features), then TinyGPT-V's two linear layers
    (hidden_size -> proj_hidden_size -> LM width, no activation between). Without
    `name_or_path` a random Q-Former is built from the dimensions below."""

    name_or_path: str | None = None
    """BLIP-2 weights whose Q-Former and query tokens load at the start of training: a
    hub name (TinyGPT-V's is Salesforce/blip2-flan-t5-xxl) or a folder a Blip2Model /
    Blip2ForConditionalGeneration was saved to."""
    num_query_tokens: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    """A cross-attention layer every this many layers (BLIP-2: every other one)."""
    proj_hidden_size: int = 4096
    """Width between TinyGPT-V's two linear layers (llama_proj: 768 -> 4096, llama_proj2:
    4096 -> the LM's width)."""
    freeze: bool = True
    """Keep the Q-Former and its query tokens frozen (TinyGPT-V); only the linear layers train."""


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    projector: str = "mlp2x_gelu"
    """A name in mllm.projector.REGISTRY (mlp2x_gelu, linear, qformer, resampler, ...)."""
    transforms: list[str] = field(default_factory=list)
    """Names in mllm.registry.TRANSFORMS (e.g. tinygptv_norms), applied in order."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the frozen weights (trainable weights stay float32)."""
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    """Settings of the `qformer` connector (read only when model.projector is qformer)."""

    def __post_init__(self):
        # A model config read back from JSON (warren_vlm.json) carries the group as a dict.
        if isinstance(self.qformer, dict):
            self.qformer = QFormerConfig(**self.qformer)


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
    targets: list[str] = field(default_factory=list)
    """Only the LM's linear layers whose names end with one of these (e.g. TinyGPT-V's
    query_key_value/dense are [q_proj, k_proj, v_proj, dense] in transformers' Phi);
    empty = every linear layer of the LM (LLaVA/Bunny)."""


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
    warmup_steps: int | None = None
    """Warmup in optimizer steps; when set, overrides warmup_ratio."""
    schedule: Literal["cosine", "linear_warmup_cosine"] = "cosine"
    """'cosine': transformers' get_cosine_schedule_with_warmup (linear 0 -> lr, then a
    cosine to min_lr). 'linear_warmup_cosine': TinyGPT-V's (LAVIS')
    LinearWarmupCosineLRScheduler: linear warmup_lr -> lr, then the cosine's value at the
    current step of the whole run (it does not restart at the end of warmup)."""
    min_lr: float = 0.0
    """Where the cosine ends (TinyGPT-V stage 1: 8e-5)."""
    warmup_lr: float = 0.0
    """Where the warmup starts (TinyGPT-V: 1e-6)."""
    lora: bool | None = None
    """Wrap the LM in LoRA in this stage; None = the trainer stage's default (stage 1
    no, stage 2 yes). TinyGPT-V's release has LoRA in all four stages."""
    image_size: int | None = None
    """Train (and export) the vision tower at this input size, its position embeddings
    interpolated (bicubic) from the tower's own (TinyGPT-V: 224, then 448 in stage 4);
    None = the tower's size."""
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
# The loader is pipelines.config (one mechanism for curate, mix and train): it checks
# every value against the field's type hint, names unknown keys, and collects every
# problem with its dotted name; `validate` below adds the cross-field checks.

def from_dict(doc: dict | None, overrides: dict[str, Any] | list[str] | None = None,
              source: str | None = None) -> Config:
    """Build and validate a Config from a mapping plus dotted overrides
    (e.g. {"stage1.max_steps": 10}, or ["stage1.max_steps=10"] as `--set` gives them)."""
    doc = shared_config.apply_overrides(doc or {}, overrides)  # a copy: the caller's stays
    problems: list[str] = []
    cfg = shared_config.merge(Config(), doc, "", problems)
    if not problems:
        problems = validate(cfg)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def load(path: str, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Read a YAML config file (see configs/train/) and validate it."""
    return from_dict(shared_config.load_yaml(str(path), "trainer config"), overrides,
                     source=str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """'stage1.max_steps=10' -> ('stage1.max_steps', 10) (the value is read as YAML;
    a malformed value is a ConfigError naming the field)."""
    return shared_config.parse_override(text)


def help_text() -> str:
    """Every key of a trainer config with its default (what `warren train --help` lists)."""
    return shared_config.help_text(Config(), "config keys (YAML groups; override with --set KEY=VALUE):")


def validate(cfg: Config) -> list[str]:
    """Every cross-field problem of a structurally valid config, as readable lines."""
    from mllm import registry

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
    if cfg.model.projector not in registry.projectors():
        p.append(f"model.projector: unknown '{cfg.model.projector}' "
                 f"(known: {', '.join(sorted(registry.projectors()))})")
    known = registry.transforms()
    for t in cfg.model.transforms:
        if t not in known:
            p.append(f"model.transforms: unknown '{t}' (known: {', '.join(sorted(known)) or 'none'})")
    if len(set(cfg.model.transforms)) != len(cfg.model.transforms):
        p.append("model.transforms: a name is listed twice")
    p += _check_tgv_fields(cfg)
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
        if s.template not in registry.templates():
            p.append(f"{w}.template: unknown '{s.template}' "
                     f"(known: {', '.join(sorted(registry.templates()))})")
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


def _check_tgv_fields(cfg: Config) -> list[str]:
    """Checks of the Q-Former, LoRA-scope and schedule fields (TinyGPT-V's recipe)."""
    p: list[str] = []
    q = cfg.model.qformer
    for name in ("num_query_tokens", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "cross_attention_frequency", "proj_hidden_size"):
        if getattr(q, name) <= 0:
            p.append(f"model.qformer.{name}: must be > 0")
    if q.hidden_size % max(q.num_heads, 1):
        p.append("model.qformer.hidden_size: must be divisible by num_heads")
    if any(not t or not isinstance(t, str) for t in cfg.lora.targets):
        p.append("lora.targets: expected non-empty module-name suffixes")
    for n in (1, 2):
        s, w = cfg.stage(n), f"stage{n}"
        if s.min_lr < 0 or s.warmup_lr < 0:
            p.append(f"{w}.min_lr / warmup_lr: must be >= 0")
        if s.warmup_steps is not None and s.warmup_steps < 0:
            p.append(f"{w}.warmup_steps: must be >= 0")
        if s.image_size is not None and s.image_size <= 0:
            p.append(f"{w}.image_size: must be > 0")
    return p
