"""Reading parts of a BLIP-2 checkpoint (its vision model, its Q-Former and query tokens)
without loading the rest (the language model of Salesforce/blip2-flan-t5-xxl is 11B
parameters; TinyGPT-V needs none of it).

`name_or_path` is a hub name (Salesforce/blip2-flan-t5-xxl) or a local folder written by
`save_pretrained` of a Blip2Model / Blip2ForConditionalGeneration (or of the part alone).
Weights are read from safetensors (only the shards holding the wanted keys) or, for old
folders, pytorch_model*.bin with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import os

import torch

from pipelines.errors import InputError

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


def config(name_or_path: str):
    """The transformers config of a BLIP-2 model or part (hub or folder)."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read a BLIP-2 config ({str(e).splitlines()[0]})", path=name_or_path) from None


def _fetch(name_or_path: str, filename: str) -> str | None:
    """Local path of `filename` in the folder or hub repository, or None if absent."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.exists(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    try:
        return hf_hub_download(name_or_path, filename)
    except EntryNotFoundError:
        return None
    except Exception as e:  # no network, unknown repo: one line naming it
        raise InputError(f"cannot fetch {filename} ({type(e).__name__}: {str(e).splitlines()[0]})",
                         path=name_or_path) from None


def read(name_or_path: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every tensor whose key starts with one of `prefixes`, keys unchanged."""
    def wanted(key: str) -> bool:
        return key.startswith(prefixes)

    for index_name, single, safe in ((SAFE_INDEX, SAFE_SINGLE, True), (BIN_INDEX, BIN_SINGLE, False)):
        index = _fetch(name_or_path, index_name)
        if index is not None:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted({s for k, s in weight_map.items() if wanted(k)})
            files = [_fetch(name_or_path, s) for s in shards]
        else:
            one = _fetch(name_or_path, single)
            files = [one] if one is not None else []
        if not files:
            continue
        out: dict[str, torch.Tensor] = {}
        for path in files:
            if path is None:
                raise InputError("a weight shard named in the index is missing", path=name_or_path)
            if safe:
                from safetensors import safe_open
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        if wanted(key):
                            out[key] = f.get_tensor(key)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
                out.update({k: v for k, v in state.items() if wanted(k)})
        return out
    raise InputError("no model.safetensors or pytorch_model.bin (or their index)", path=name_or_path)


def strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: str) -> None:
    """load_state_dict(strict) with one clear line when the weights do not fit."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise InputError(f"the {what} weights do not fit the configured model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shape {shapes[:3]}): check the "
                         "dimensions in the config", path=path)
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
