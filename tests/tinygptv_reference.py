"""A small re-derivation of TinyGPT-V's model, for tests: the same module layout (hence
the same state-dict keys) and the same arithmetic, written from TinyGPT-V's code
(minigpt4/models/{minigpt4,minigpt_base,base_model,eva_vit,Qformer}.py and its
modified modeling_phi.py), independent of Warren and of transformers' classes.

    MiniGPT4Ref
      visual_encoder   LAVIS EVA ViT: cls_token, pos_embed, patch_embed.proj,
                       blocks.N.{norm1, attn.{qkv (no bias), q_bias, v_bias, proj}, norm2, mlp.fc1/fc2}
      ln_vision        LayerNorm (eps 1e-5), float32
      Qformer.bert     LAVIS BERT: embeddings.LayerNorm, encoder.layer.N.{attention, crossattention
                       (every other layer), intermediate_query, output_query}
      query_tokens
      llama_proj, llama_proj2
      llama_model      peft-wrapped Phi: base_model.model.{model.{embed_tokens, layers, final_layernorm}, lm_head}
                       layers.N.{input_layernorm, self_attn.{query_key_value (+LoRA), q_layernorm,
                       k_layernorm, dense (+LoRA)}, post_layernorm (RMSNorm), mlp.fc1/fc2}

`MiniGPT4Ref.logits(image, ids_before, ids_after, answer_ids)` is TinyGPT-V's training
forward for one sample: [bos] + ids_before + image tokens + ids_after + answer ids.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------- EVA (LAVIS)

class EvaAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class EvaMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EvaAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = EvaMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Eva(nn.Module):
    def __init__(self, image, patch, dim, depth, heads, hidden):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([EvaBlock(dim, heads, hidden) for _ in range(depth)])

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x


def lavis_interpolate_pos_embed(pos: torch.Tensor, new_size: int) -> torch.Tensor:
    """eva_vit.interpolate_pos_embed: the CLS position kept, the grid resized bicubically."""
    extra, tokens = pos[:, :1], pos[:, 1:].float()
    orig = int(tokens.shape[1] ** 0.5)
    tokens = tokens.reshape(-1, orig, orig, pos.shape[-1]).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new_size, new_size), mode="bicubic", align_corners=False)
    return torch.cat((extra, tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


# ------------------------------------------------------------- Q-Former (LAVIS)

class BertSelfAttention(nn.Module):
    def __init__(self, hidden, heads, kv_width):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def _split(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).permute(0, 2, 1, 3)

    def forward(self, x, kv):
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        ctx = scores.softmax(dim=-1) @ v
        return ctx.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)


class BertSelfOutput(nn.Module):
    def __init__(self, hidden, inner=None):
        super().__init__()
        self.dense = nn.Linear(inner or hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden, heads, kv_width):
        super().__init__()
        setattr(self, "self", BertSelfAttention(hidden, heads, kv_width))
        self.output = BertSelfOutput(hidden)

    def forward(self, x, kv):
        return self.output(getattr(self, "self")(x, kv), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, hidden, heads, inner, encoder_width, cross):
        super().__init__()
        self.attention = BertAttention(hidden, heads, hidden)
        if cross:
            self.crossattention = BertAttention(hidden, heads, encoder_width)
        self.intermediate_query = BertIntermediate(hidden, inner)
        self.output_query = BertSelfOutput(hidden, inner)

    def forward(self, x, image):
        x = self.attention(x, x)
        if hasattr(self, "crossattention"):
            x = self.crossattention(x, image)
        return self.output_query(self.intermediate_query(x), x)


class BertEmbeddings(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(16).expand((1, -1)))  # persistent, as LAVIS


class BertEncoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BertModel(nn.Module):
    def __init__(self, hidden, heads, inner, depth, encoder_width, freq=2):
        super().__init__()
        self.embeddings = BertEmbeddings(hidden)
        self.encoder = BertEncoder([BertLayer(hidden, heads, inner, encoder_width, i % freq == 0)
                                    for i in range(depth)])

    def forward(self, query_embeds, image):
        x = self.embeddings.LayerNorm(query_embeds)
        for layer in self.encoder.layer:
            x = layer(x, image)
        return x


class QformerRef(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.bert = BertModel(**kw)


# ---------------------------------------------------------- Phi (TinyGPT-V's)

class LoraLinear(nn.Linear):
    """peft's LoRA layer: `weight`/`bias` of the base and lora_A/lora_B (peft 0.2 keys:
    `lora_A.weight`; later versions: `lora_A.default.weight`)."""

    def __init__(self, i, o, r, alpha, adapter: str | None):
        super().__init__(i, o)
        self.scale = alpha / r
        self.adapter = adapter
        if adapter is None:
            self.lora_A, self.lora_B = nn.Linear(i, r, bias=False), nn.Linear(r, o, bias=False)
        else:
            self.lora_A = nn.ModuleDict({adapter: nn.Linear(i, r, bias=False)})
            self.lora_B = nn.ModuleDict({adapter: nn.Linear(r, o, bias=False)})

    def forward(self, x):
        a = self.lora_A if self.adapter is None else self.lora_A[self.adapter]
        b = self.lora_B if self.adapter is None else self.lora_B[self.adapter]
        return F.linear(x, self.weight, self.bias) + b(a(x)) * self.scale


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, h):
        variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(variance + self.eps))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class PhiAttention(nn.Module):
    def __init__(self, hidden, heads, rotary_dim, r, alpha, adapter, eps=1e-5):
        super().__init__()
        self.heads, self.hd, self.rot = heads, hidden // heads, rotary_dim
        self.query_key_value = LoraLinear(hidden, 3 * hidden, r, alpha, adapter)
        self.dense = LoraLinear(hidden, hidden, r, alpha, adapter)
        self.q_layernorm = nn.LayerNorm(self.hd, eps=eps)
        self.k_layernorm = nn.LayerNorm(self.hd, eps=eps)

    def forward(self, x):
        b, n, _ = x.shape
        fused = self.query_key_value(x).view(b, n, self.heads, 3, self.hd)  # _split_heads
        q, k, v = fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]
        q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.rot, 2).float() / self.rot))
        freqs = torch.outer(torch.arange(n).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        q_rot, q_pass = q[..., :self.rot], q[..., self.rot:]
        k_rot, k_pass = k[..., :self.rot], k[..., self.rot:]
        q = torch.cat((q_rot * cos + rotate_half(q_rot) * sin, q_pass), dim=-1)
        k = torch.cat((k_rot * cos + rotate_half(k_rot) * sin, k_pass), dim=-1)
        w = (q @ k.transpose(2, 3)) / math.sqrt(self.hd)
        w = w + torch.full((n, n), float("-inf")).triu(1)
        out = (w.softmax(dim=-1, dtype=torch.float32) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.dense(out)


class PhiMLP(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, inner), nn.Linear(inner, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # gelu_new


class PhiDecoderLayer(nn.Module):
    def __init__(self, hidden, heads, inner, rotary_dim, r, alpha, adapter):
        super().__init__()
        self.self_attn = PhiAttention(hidden, heads, rotary_dim, r, alpha, adapter)
        self.mlp = PhiMLP(hidden, inner)
        self.input_layernorm = nn.LayerNorm(hidden, eps=1e-5)
        self.post_layernorm = LlamaRMSNorm(hidden)

    def forward(self, x):
        h = self.input_layernorm(x)
        return self.post_layernorm(self.self_attn(h)) + self.mlp(h) + x


class PhiModel(nn.Module):
    def __init__(self, vocab, hidden, heads, inner, depth, rotary_dim, r, alpha, adapter):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([PhiDecoderLayer(hidden, heads, inner, rotary_dim, r, alpha, adapter)
                                     for _ in range(depth)])
        self.final_layernorm = nn.LayerNorm(hidden, eps=1e-5)


class PhiForCausalLM(nn.Module):
    def __init__(self, vocab, hidden, **kw):
        super().__init__()
        self.model = PhiModel(vocab, hidden, **kw)
        self.lm_head = nn.Linear(hidden, vocab)

    def forward(self, embeds):
        x = embeds
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.final_layernorm(x))


class _Holder(nn.Module):
    def __init__(self, **modules):
        super().__init__()
        for k, v in modules.items():
            setattr(self, k, v)


class MiniGPT4Ref(nn.Module):
    """TinyGPT-V's MiniGPT4 / MiniGPTv2 with LoRA (the state-dict layout of its checkpoints)."""

    def __init__(self, *, vocab, hidden, heads, inner, depth, rotary_dim, image, patch, vdim, vdepth,
                 vheads, vhidden, qhidden, qheads, qinner, qdepth, nquery, proj_hidden,
                 r=4, alpha=16, adapter: str | None = "default"):
        super().__init__()
        self.visual_encoder = Eva(image, patch, vdim, vdepth, vheads, vhidden)
        self.ln_vision = nn.LayerNorm(vdim)
        self.Qformer = QformerRef(hidden=qhidden, heads=qheads, inner=qinner, depth=qdepth, encoder_width=vdim)
        self.query_tokens = nn.Parameter(torch.randn(1, nquery, qhidden))
        lm = PhiForCausalLM(vocab, hidden, heads=heads, inner=inner, depth=depth, rotary_dim=rotary_dim,
                            r=r, alpha=alpha, adapter=adapter)
        self.llama_model = _Holder(base_model=_Holder(model=lm))
        self.llama_proj = nn.Linear(qhidden, proj_hidden)
        self.llama_proj2 = nn.Linear(proj_hidden, hidden)

    @property
    def phi(self) -> PhiForCausalLM:
        return self.llama_model.base_model.model

    def encode_img(self, image):
        feats = F.layer_norm(self.visual_encoder(image).float(), self.ln_vision.normalized_shape,
                             self.ln_vision.weight, self.ln_vision.bias, 1e-5)
        q = self.Qformer.bert(self.query_tokens.expand(image.shape[0], -1, -1), feats)
        return self.llama_proj2(self.llama_proj(q))

    def logits(self, image, bos: int, before: list[int], after: list[int], answer: list[int]):
        emb = self.phi.model.embed_tokens
        parts = [emb(torch.tensor([[bos] + before])), self.encode_img(image), emb(torch.tensor([after + answer]))]
        return self.phi(torch.cat(parts, dim=1))

    def trainable_state_dict(self) -> dict:
        """What TinyGPT-V's runner saves: the parameters that train (its init_llm and
        init_Qformer) plus every buffer."""
        keep = {}
        train = ("lora_A", "lora_B", "q_layernorm.weight", "k_layernorm.weight", "post_layernorm.weight",
                 "input_layernorm.weight", "final_layernorm.weight", "llama_proj")
        params = dict(self.named_parameters())
        for k, v in self.state_dict().items():
            if k not in params or any(t in k for t in train):
                keep[k] = v.clone()
        return keep


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """TinyGPT-V's query_key_value rows from separate q/k/v rows: its _split_heads reads
    the fused output as view(heads, 3, head_dim), so head h's rows are q_h, k_h, v_h."""
    hd = q.shape[0] // heads
    rows = []
    for h in range(heads):
        rows += [q[h * hd:(h + 1) * hd], k[h * hd:(h + 1) * hd], v[h * hd:(h + 1) * hd]]
    return torch.cat(rows, dim=0)
