"""The house: no import circle in mllm/ and no registration by import side effects.
Names a config uses are found through mllm.registry, whose one explicit call
(`load_builtins`) adds TinyGPT-V's parts; every module imports on its own, first."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["mllm.config", "mllm.model", "mllm.registry", "mllm.tinygptv", "mllm.vision", "mllm.stabilizers",
           "mllm.qformer", "mllm.eva", "mllm.multitask", "mllm.resampler", "mllm.projector",
           "mllm.tinygptv_checkpoint", "mllm.export", "mllm.train", "mllm.quantize"]


def _py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_every_module_imports_first_in_a_fresh_process_and_registers_nothing():
    code = ("import importlib, sys\n"
            f"for name in {MODULES!r}:\n"
            "    for m in [m for m in sys.modules if m.startswith('mllm')]: del sys.modules[m]\n"
            "    importlib.import_module(name)\n"
            "    from mllm import registry, projector, templates\n"
            "    assert not registry.TRANSFORMS and set(projector.REGISTRY) == {'linear', 'mlp2x_gelu'}, name\n"
            "    assert not any(t.startswith('tinygptv') for t in templates.REGISTRY), name\n"
            "print('ok')\n")
    r = _py(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_config_and_model_do_not_import_tinygptv_until_a_name_is_looked_up():
    code = ("import sys, mllm.config, mllm.model\n"
            "print('mllm.tinygptv' in sys.modules)\n"
            "from mllm import config\n"
            "c = config.load('configs/train/tinygpt-v/1-warmup.yaml')\n"
            "print('mllm.tinygptv' in sys.modules, c.model.projector, c.stage1.template)\n")
    r = _py(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "True", "qformer", "tinygptv-pretrain"]


def test_load_builtins_is_one_explicit_idempotent_call():
    from mllm import projector, registry, templates
    registry.load_builtins()
    before = (dict(registry.TRANSFORMS), dict(projector.REGISTRY), dict(templates.REGISTRY), dict(registry.VISION))
    registry.load_builtins()
    assert before == (dict(registry.TRANSFORMS), dict(projector.REGISTRY), dict(templates.REGISTRY),
                      dict(registry.VISION))
    assert {"tinygptv_norms", "qk_layernorm", "post_attn_norm", "lm_norms", "stabilizers", "qk_norm"} == \
        set(registry.TRANSFORMS)
    assert {"siglip", "clip", "eva"} <= set(registry.VISION) and "qformer" in projector.REGISTRY


def test_parts_of_ones_own_register_explicitly(tmp_path):
    """A project adds a transform the same way Warren adds TinyGPT-V's."""
    import dataclasses

    import torch

    from mllm import presets, registry
    from mllm.config import from_dict
    from mllm.model import build_vlm
    from pipelines.errors import ConfigError

    with pytest.raises(ConfigError, match="model.transforms: unknown 'scale_head'"):
        from_dict(presets.TINY, {"model.transforms": ["scale_head"]})
    seen = []

    def apply(vlm, model_cfg):
        seen.append(model_cfg.transforms)
        return vlm
    registry.register_transform(registry.Transform("scale_head", apply=apply, trainable=(r"^lm_head\.weight$",)))
    try:
        cfg = from_dict(presets.TINY, {"model.transforms": ["scale_head"]})
        torch.manual_seed(0)
        vlm = build_vlm(dataclasses.replace(cfg.model), 5, 300)
        assert seen == [["scale_head"]]
        assert registry.trainable_patterns(["scale_head", "lm_norms"])[0] == r"^lm_head\.weight$"
    finally:
        del registry.TRANSFORMS["scale_head"]
