"""Training checkpoints: everything `--resume` needs to continue exactly.

    checkpoints/step-00000040/
      trainable.safetensors    the trained parameters (projector, LoRA A/B)
      optimizer.pt             AdamW state (loaded with torch.load(weights_only=True))
      rng-rank{r}.safetensors  torch CPU/CUDA generator states of every process
      state.json               step, scheduler, sampler identity, Python/NumPy RNG
      config.yaml              the resolved config of the run

A checkpoint is written into a temporary folder and renamed into place, so a folder
named `step-*` is always complete; a kill mid-write leaves only a `.tmp-*` folder,
which the next save or resume removes. The frozen weights are not saved: they are
rebuilt the same way (seeded random init, or the same pretrained/export folder).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipelines.errors import InputError

STEP_DIR = re.compile(r"^step-(\d{8})$")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def _py_np_rng() -> dict:
    np_state = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])]}


def _set_py_np_rng(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save(root: str, step: int, model, optimizer, scheduler, sampler_state: dict,
         config: dict, rank: int = 0, world_size: int = 1, keep_last: int = 2,
         barrier=lambda: None) -> str:
    """Write checkpoint `step` under `root/checkpoints`. Every rank calls this (each
    writes its own RNG state into a shared temporary folder); rank 0 writes the rest
    and renames the folder once all ranks are done."""
    ckdir = os.path.join(root, "checkpoints")
    final = os.path.join(ckdir, f"step-{step:08d}")
    tmp = os.path.join(ckdir, f".step-{step:08d}.tmp")
    if rank == 0:
        os.makedirs(ckdir, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier()
    save_file(rng_state(), os.path.join(tmp, f"rng-rank{rank}.safetensors"))
    if rank == 0:
        save_file(trainable_state(model), os.path.join(tmp, "trainable.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        state = {"step": step, "world_size": world_size, "scheduler": scheduler.state_dict(),
                 "sampler": sampler_state, **_py_np_rng()}
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f)
    barrier()
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_steps(root)[:-keep_last]:
            shutil.rmtree(os.path.join(ckdir, f"step-{old:08d}"), ignore_errors=True)
    barrier()
    return final


def list_steps(root: str) -> list[int]:
    ckdir = os.path.join(root, "checkpoints")
    if not os.path.isdir(ckdir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(ckdir) if (m := STEP_DIR.match(name)))


def latest(root: str) -> str | None:
    steps = list_steps(root)
    return os.path.join(root, "checkpoints", f"step-{steps[-1]:08d}") if steps else None


def load(path: str, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore a checkpoint in place; returns its state.json (step, sampler, ...)."""
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    weights = load_file(os.path.join(path, "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise InputError(f"checkpoint does not fit the model (missing {missing[:3]}, "
                         f"unexpected {unknown[:3]}): was it written by another config?", path=path)
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True,
                                         map_location="cpu"))
    scheduler.load_state_dict(state["scheduler"])
    rng_file = os.path.join(path, f"rng-rank{rank}.safetensors")
    if not os.path.exists(rng_file):
        raise InputError(f"no RNG state for rank {rank}: resume with the same number of "
                         f"processes ({state.get('world_size')})", path=path)
    set_rng_state(load_file(rng_file))
    _set_py_np_rng(state)
    return state
