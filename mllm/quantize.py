"""Quantised inference for small devices (TinyGPT-V ran on 8 GB GPUs this way).

    loaded = mllm.quantize.load(folder, "int8-dynamic")          # CPU
    loaded = mllm.quantize.load(folder, "8bit", device="cuda")   # or "4bit"; GPU
    mllm.generate.answer(loaded, image, prompt)

Modes (only the language model's linear layers are quantised; the vision tower, the
connector, the embeddings and every norm (TinyGPT-V's included) stay as exported; the
output head stays unquantised too, as transformers' bitsandbytes integration leaves
`lm_head`):

  none          mllm.export.load as is
  int8-dynamic  CPU. Each nn.Linear of the LM gets int8 weights and activations
                quantised at run time, int32 accumulation; ~4x less weight memory than
                float32 for the quantised layers. Two engines:
                  ao      torch.ao.quantization.quantize_dynamic (fbgemm/x86 kernels;
                          deprecated in torch 2.14 in favour of torchao, still there
                          and the fastest here: ~5x ours for one-token decoding)
                  warren  `Int8DynamicLinear`: one float32 scale per output channel
                          (symmetric), per-token activation scales,
                              y = (q(x) @ Wq^T) * s_x * s_w + b
                          with `torch._int_mm` (no deprecated API)
                `engine="auto"` (the default) takes ao when torch still has it.
  8bit, 4bit    GPU. The LM loads through `from_pretrained(...,
                quantization_config=BitsAndBytesConfig(load_in_8bit=True))` (LLM.int8)
                or `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=float16)`: transformers 5 has no
                `load_in_8bit=` argument on from_pretrained any more (TinyGPT-V's
                release used it). Needs a CUDA GPU and `pip install bitsandbytes`.

Phi-2 (2.7B) weights: 5.4 GB in float16, ~2.9 GB in 8-bit, ~1.7 GB in 4-bit; TinyGPT-V's
EVA ViT-g (1.0B) adds ~2 GB in float16 and its Q-Former + linear layers (~0.1B) ~0.4 GB
in float32 (bench/quantize.py measures them).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
from typing import Literal

import torch
from torch import nn

from pipelines.errors import ConfigError, InputError, MissingDependencyError

Mode = Literal["none", "int8-dynamic", "8bit", "4bit"]
MODES = ("none", "int8-dynamic", "8bit", "4bit")


class Int8DynamicLinear(nn.Module):
    """A frozen nn.Linear with int8 weights (per-output-channel symmetric scales) and
    per-token dynamic int8 activations; int32 accumulation. Inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        w_scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        qweight = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
        # _int_mm takes (m, k) x (k, n): store the weight transposed once.
        self.register_buffer("qweight_t", qweight.t().contiguous())
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).float()
        x_scale = (x2.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        xq = torch.round(x2 / x_scale).clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.qweight_t)
        y = acc.float() * x_scale * self.w_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _linears(lm: nn.Module, include_lm_head: bool) -> list[tuple[nn.Module, str, nn.Linear]]:
    head = lm.get_output_embeddings()
    out = []
    for parent_name, parent in lm.named_modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and (include_lm_head or child is not head):
                out.append((parent, name, child))
    return out


def ao_available() -> bool:
    """Whether torch still ships dynamic quantisation with a CPU engine."""
    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401
    except ImportError:
        return False
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "qnnpack"))


Engine = Literal["auto", "ao", "warren"]


def quantize_dynamic_int8(vlm, engine: Engine = "auto",
                          include_lm_head: bool = False):
    """Quantise the VLM's language model in place for CPU inference (see the module
    docstring); returns the VLM. The model must be float32 on the CPU. The float
    weights are freed at the next garbage collection (`load` runs one)."""
    lm = vlm.language_model
    p = next(lm.parameters())
    if p.device.type != "cpu":
        raise ConfigError(f"int8-dynamic quantisation runs on the CPU (the LM is on {p.device}); "
                          "on a GPU use --quantize 8bit or 4bit")
    if p.dtype != torch.float32:
        raise ConfigError(f"int8-dynamic quantisation expects a float32 model (got {p.dtype}); "
                          "load it with dtype='float32'")
    lm.eval()
    targets = _linears(lm, include_lm_head)
    if engine == "auto":
        engine = "ao" if ao_available() else "warren"
    if engine == "warren":
        for parent, name, child in targets:
            setattr(parent, name, Int8DynamicLinear(child))
    elif engine == "ao":
        import warnings

        from torch.ao.quantization import quantize_dynamic
        for _, _, child in targets:
            # fbgemm's packed weight keeps the float bias tensor alive: a copy, so it
            # does not pin the memory-mapped checkpoint file (see _own_memory).
            if child.bias is not None:
                child.bias.data = child.bias.data.clone()
        names = set()
        for full, m in lm.named_modules():
            if any(m is child for _, _, child in targets):
                names.add(full)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the torch.ao deprecation notices
            quantize_dynamic(lm, names, dtype=torch.qint8, inplace=True)
    else:
        raise ConfigError(f"unknown int8 engine {engine!r} (auto, ao or warren)")
    _own_memory(lm)
    return vlm


@torch.no_grad()
def _own_memory(module: nn.Module) -> None:
    """Copy the tensors left in float (embeddings, norms, head) out of the memory-mapped
    checkpoint file they were loaded from, so that the mapping, and with it the float32
    weights just replaced, can be released: otherwise the file's pages read during the
    conversion stay resident."""
    for m in module.modules():
        for p in m.parameters(recurse=False):
            p.data = p.data.clone()
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and name in m._buffers:
                m._buffers[name] = b.clone()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer, torch.ao packed int8 weights included."""
    total = 0
    seen = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in module.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, b = packed._weight_bias()
            total += w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
    return total


# ------------------------------------------------------------------- GPU (bitsandbytes)

def bnb_config(bits: int, compute_dtype: torch.dtype = torch.float16):
    """transformers 5 BitsAndBytesConfig for 8-bit (LLM.int8) or 4-bit (NF4) weights."""
    from transformers import BitsAndBytesConfig
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True,
                                  llm_int8_skip_modules=["lm_head"])
    raise ConfigError(f"bitsandbytes quantisation is 8 or 4 bits (got {bits})")


def check_gpu_quantization(device: str) -> None:
    """Raise one clear error naming every fix when 8/4-bit GPU loading cannot work here
    (MissingDependencyError when bitsandbytes is all that is missing)."""
    problems = []
    if not str(device).startswith("cuda"):
        problems.append(f"8bit/4bit quantisation loads the LM on a CUDA GPU (device is {device!r}): "
                        "pass --device cuda, or use --quantize int8-dynamic on the CPU")
    elif not torch.cuda.is_available():
        problems.append("8bit/4bit quantisation needs a CUDA GPU and none is visible here: "
                        "use --quantize int8-dynamic on the CPU")
    try:
        import bitsandbytes  # noqa: F401
        has_bnb = True
    except ImportError:
        has_bnb = False
    if not has_bnb and not problems:
        raise MissingDependencyError("bitsandbytes", "8bit/4bit GPU quantisation")
    if not has_bnb:
        problems.append("8bit/4bit quantisation needs 'bitsandbytes': pip install bitsandbytes")
    if problems:
        raise ConfigError(problems)


def _load_bnb(folder: str, bits: int, dtype: str | None, device: str):
    from mllm import export
    from mllm import tokenizer as tok_mod
    from mllm.data import ImageProcessor
    from mllm.model import build_vlm
    from mllm.templates import get as get_template
    from safetensors.torch import load_file

    meta = _meta(folder)
    saved = export.model_config(meta["model"])
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                   "float32": torch.float32}[dtype or "float16"]
    model_cfg = dataclasses.replace(
        saved, dtype=dtype or "float16",
        vision=dataclasses.replace(saved.vision, name_or_path=os.path.join(folder, "vision")),
        lm=dataclasses.replace(saved.lm, name_or_path=os.path.join(folder, "language_model")))
    tokenizer = tok_mod.load(os.path.join(folder, "tokenizer"))
    with export.quiet_hf():
        # The LM's norms (TinyGPT-V's) come with it: its config names them.
        vlm = build_vlm(model_cfg, meta["image_token_id"], len(tokenizer), lm_load_kwargs={
            "device_map": {"": device}, "quantization_config": bnb_config(bits, torch_dtype)})
    vlm.projector.load_state_dict(load_file(os.path.join(folder, "projector.safetensors")))
    vlm.vision.to(device)
    vlm.projector.to(device)
    for m in vlm.language_model.modules():  # hooked norms are built before dispatch
        if m.__class__.__name__ in ("RMSNorm", "HeadLayerNorm"):
            m.to(device)
    vlm.eval()
    mean, std = vlm.vision.normalisation
    processor = ImageProcessor(vlm.vision.image_size, mean, std, meta.get("image_aspect", "pad"))
    return export.Loaded(vlm, tokenizer, get_template(meta["template"]), processor, meta, saved)


def _meta(folder: str) -> dict:
    from mllm.export import META
    path = os.path.join(folder, META)
    if not os.path.exists(path):
        raise InputError(f"not a Warren model folder (no {META})", path=folder)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load(folder: str, mode: Mode = "none", dtype: str | None = None, device: str = "cpu",
         engine: Engine = "auto"):
    """An exported model (mllm.export.Loaded) with its LM quantised as `mode` says."""
    from mllm import export
    if mode not in MODES:
        raise ConfigError(f"unknown quantisation {mode!r} (known: {', '.join(MODES)})")
    if mode == "none":
        return export.load(folder, dtype=dtype, device=device)
    if mode == "int8-dynamic":
        if str(device) != "cpu":
            raise ConfigError(f"int8-dynamic quantisation runs on the CPU (device is {device!r}): "
                              "use --quantize 8bit or 4bit on a GPU")
        if dtype not in (None, "float32"):
            raise ConfigError(f"int8-dynamic quantisation starts from float32 weights (--dtype {dtype})")
        loaded = export.load(folder, dtype="float32", device="cpu")
        quantize_dynamic_int8(loaded.model, engine=engine)
        # The float layers just replaced sit in reference cycles: collect them now, so
        # the memory is back before the first token rather than at some later collection.
        gc.collect()
        return loaded
    check_gpu_quantization(device)
    return _load_bnb(folder, 8 if mode == "8bit" else 4, dtype, device)
