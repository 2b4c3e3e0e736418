"""The `qformer` connector: TinyGPT-V's path from vision features to Phi-2.

    query_tokens (1, 32, 768)                                  frozen, from BLIP-2
    q = Blip2QFormerModel(query_tokens, cross-attention to the vision tokens)
                                                               frozen, from BLIP-2
    x = llama_proj(q)          Linear(768 -> 4096)             trains
    tokens = llama_proj2(x)    Linear(4096 -> LM width)        trains; no activation between

This is transformers' `Blip2QFormerModel` (BERT-base layers, a cross-attention layer
every other layer, the query branch only: `use_qformer_text_input=False`, as TinyGPT-V
drops the text branch), fed all vision tokens with an all-ones mask, as TinyGPT-V's
`encode_img`. The image always becomes `num_query_tokens` tokens.

Frozen as TinyGPT-V freezes it (`init_Qformer(freeze=True)`): the Q-Former's parameters
and the query tokens never train and the Q-Former stays in eval mode (no dropout) even
when the model trains; `frozen_parts()` tells the trainer which. The two linear layers
train (`model.qformer.freeze: false` trains the Q-Former too).

Weights: `load_pretrained()` reads `qformer.*` and `query_tokens` from the BLIP-2 model
named by `model.qformer.name_or_path` (hub name, TinyGPT-V's being
Salesforce/blip2-flan-t5-xxl, or a folder a Blip2Model / Blip2ForConditionalGeneration
was saved to). The trainer calls it when a run starts from the config
(mllm.model.from_config); an export carries the connector's own weights.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from mllm import projector as projectors
from mllm.config import ModelConfig, QFormerConfig
from pipelines.errors import ConfigError, InputError


# A Q-Former layer's feed-forward for text tokens (`intermediate`/`output`; the queries
# use `intermediate_query`/`output_query`).
TEXT_BRANCH = re.compile(r"^encoder\.layer\.\d+\.(intermediate|output)\.")


class QFormerConnector(projectors.Projector):
    """Maps (batch, tokens, vision_dim) to (batch, num_query_tokens, lm_dim)."""

    def __init__(self, vision_dim: int, lm_dim: int, cfg: QFormerConfig | None = None):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel
        cfg = cfg or QFormerConfig()
        self.cfg = cfg
        qconf = Blip2QFormerConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                   num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                                   cross_attention_frequency=cfg.cross_attention_frequency,
                                   encoder_hidden_size=vision_dim, use_qformer_text_input=False)
        self.qformer = Blip2QFormerModel(qconf)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=qconf.initializer_range)
        self.llama_proj = nn.Linear(cfg.hidden_size, cfg.proj_hidden_size)
        self.llama_proj2 = nn.Linear(cfg.proj_hidden_size, lm_dim)
        if cfg.freeze:
            self.qformer.requires_grad_(False)
            self.query_tokens.requires_grad_(False)
            self.qformer.eval()

    def num_image_tokens(self, num_patches: int) -> int:
        return self.cfg.num_query_tokens

    def frozen_parts(self) -> tuple[str, ...]:
        """Attribute names of the parts that never train."""
        return ("qformer", "query_tokens") if self.cfg.freeze else ()

    def train(self, mode: bool = True) -> "QFormerConnector":
        super().train(mode)
        if self.cfg.freeze:
            self.qformer.eval()
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        mask = torch.ones(features.shape[:-1], dtype=torch.long, device=features.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features,
                           encoder_attention_mask=mask).last_hidden_state
        return self.llama_proj2(self.llama_proj(out.to(self.llama_proj.weight.dtype)))

    def load_pretrained(self, name_or_path: str | None = None) -> bool:
        """Fill the Q-Former and query tokens from BLIP-2 weights (default: the config's
        name_or_path). Returns False when there is nothing to load."""
        from transformers import Blip2Config

        from mllm import blip2
        src = name_or_path or self.cfg.name_or_path
        if not src:
            return False
        conf = blip2.config(src)
        if not isinstance(conf, Blip2Config):
            raise InputError(f"model.qformer.name_or_path: a {type(conf).__name__}, not a BLIP-2 "
                             "model (Blip2Model / Blip2ForConditionalGeneration)", path=src)
        q = conf.qformer_config
        want = {"hidden_size": self.cfg.hidden_size, "num_hidden_layers": self.cfg.num_layers,
                "num_attention_heads": self.cfg.num_heads, "intermediate_size": self.cfg.intermediate_size,
                "cross_attention_frequency": self.cfg.cross_attention_frequency}
        diff = {k: (getattr(q, k), v) for k, v in want.items() if getattr(q, k) != v}
        if conf.num_query_tokens != self.cfg.num_query_tokens:
            diff["num_query_tokens"] = (conf.num_query_tokens, self.cfg.num_query_tokens)
        if q.encoder_hidden_size != self.qformer.config.encoder_hidden_size:
            diff["encoder_hidden_size (the vision width)"] = (q.encoder_hidden_size,
                                                              self.qformer.config.encoder_hidden_size)
        if diff:
            raise InputError("the BLIP-2 Q-Former differs from model.qformer / the vision tower: "
                             + ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in diff.items()), path=src)
        state = blip2.read(src, ("qformer.", "query_tokens"))
        qstate = blip2.strip(state, "qformer.")
        # The text branch (intermediate/output of each layer) is not built here: TinyGPT-V drops it too.
        qstate = {k: v for k, v in qstate.items() if not TEXT_BRANCH.match(k)}
        blip2.load_into(self.qformer, qstate, "Q-Former", src)
        if "query_tokens" not in state:
            raise InputError("no query_tokens in the BLIP-2 weights", path=src)
        with torch.no_grad():
            self.query_tokens.copy_(state["query_tokens"].to(self.query_tokens.dtype))
        return True


def build(vision_dim: int, lm_dim: int, model_cfg: ModelConfig | None = None, **kwargs) -> QFormerConnector:
    if kwargs:
        raise ConfigError(f"qformer: unknown arguments {sorted(kwargs)} (set model.qformer.* instead)")
    return QFormerConnector(vision_dim, lm_dim, model_cfg.qformer if model_cfg is not None else None)


build.takes_model_cfg = True


def register() -> None:
    projectors.register("qformer", build)
