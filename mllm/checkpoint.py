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

A `step-*` folder can still be damaged afterwards (a disk that filled, a copy cut short,
a bad sector): `load` reads every file of a checkpoint before changing anything, and when
the newest one does not read it says so in one warning line and resumes from the
newest older one that does; when none does, it stops with an error listing why.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import uuid
import zipfile

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipelines.errors import InputError

log = logging.getLogger(__name__)

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


class CorruptCheckpoint(InputError):
    """A checkpoint folder whose files do not read back."""


def read(path: str, rank: int = 0) -> dict:
    """Every file of one checkpoint, read and parsed (nothing applied yet). A file that
    is missing, truncated or not what it should be raises CorruptCheckpoint."""
    def bad(what: str, e: Exception | str) -> CorruptCheckpoint:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return CorruptCheckpoint(f"{what} does not read ({reason})", path=path)

    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or "step" not in state or "scheduler" not in state:
            raise ValueError("no step or scheduler")
    except (OSError, ValueError) as e:
        raise bad("state.json", e) from None
    out = {"state": state}
    for key, name in (("weights", "trainable.safetensors"), ("rng", f"rng-rank{rank}.safetensors")):
        file = os.path.join(path, name)
        if key == "rng" and not os.path.exists(file):
            out["rng"] = None       # not damage: another world size (load says so)
            continue
        try:
            out[key] = load_file(file)
        except Exception as e:  # noqa: BLE001 — safetensors raises its own error types
            raise bad(name, e) from None
    try:
        out["optimizer"] = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True,
                                      map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError) as e:
        raise bad("optimizer.pt", e) from None
    return out


def load(path: str, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore a checkpoint in place; returns its state.json (step, sampler, ...) and
    `loaded_from`, the checkpoint folder actually read.

    `path` is normally the latest checkpoint; if it does not read, the newest older
    intact one under the same `checkpoints/` folder is used (one warning line)."""
    ckdir = os.path.dirname(os.path.abspath(path))
    m = STEP_DIR.match(os.path.basename(os.path.abspath(path)))
    older = [] if m is None else [os.path.join(ckdir, f"step-{s:08d}")
                                  for s in reversed(list_steps(os.path.dirname(ckdir)))
                                  if s < int(m.group(1))]
    problems = []
    for candidate in [path] + older:
        try:
            got = read(candidate, rank)
        except CorruptCheckpoint as e:
            problems.append(str(e))
            continue
        if problems:
            log.warning("checkpoint %s is damaged (%s); resuming from %s instead",
                        os.path.basename(path), problems[0], os.path.basename(candidate))
        return {**_apply(candidate, got, model, optimizer, scheduler, rank), "loaded_from": candidate}
    raise InputError(f"no intact checkpoint to resume from ({'; '.join(problems)}); "
                     "start again without --resume in a new output folder", path=ckdir)


def _apply(path: str, got: dict, model, optimizer, scheduler, rank: int) -> dict:
    state, weights = got["state"], got["weights"]
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise InputError(f"checkpoint does not fit the model (missing {missing[:3]}, "
                         f"unexpected {unknown[:3]}): was it written by another config?", path=path)
    if got["rng"] is None:
        raise InputError(f"no RNG state for rank {rank}: resume with the same number of "
                         f"processes ({state.get('world_size')})", path=path)
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(got["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(got["rng"])
    _set_py_np_rng(state)
    return state
