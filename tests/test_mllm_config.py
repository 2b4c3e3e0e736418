"""Trainer configs: every YAML in the repo loads; problems are collected, then raised once."""
from __future__ import annotations

import os

import pytest

from mllm import config, presets
from pipelines.errors import ConfigError
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIGS = os.path.join(ROOT, "configs", "train")


def all_train_yamls():
    found = []
    for folder, _, files in os.walk(TRAIN_CONFIGS):
        found += [os.path.join(folder, f) for f in files if f.endswith((".yaml", ".yml"))]
    return sorted(found)


def test_every_train_config_loads_and_names_its_command():
    paths = all_train_yamls()
    assert len(paths) >= 3
    for path in paths:
        config.load(path)
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        assert first.startswith("# ") and ("warren train" in first or "mllm.train" in first), path


def test_tiny_yaml_matches_the_preset_the_demo_uses():
    assert config.load(os.path.join(TRAIN_CONFIGS, "tiny.yaml")) == presets.tiny()


def test_bunny_recipe_numbers():
    s1 = config.load(os.path.join(TRAIN_CONFIGS, "bunny-phi2-siglip-stage1.yaml"))
    s2 = config.load(os.path.join(TRAIN_CONFIGS, "bunny-phi2-siglip-stage2.yaml"))
    assert (s1.stage1.lr, s1.stage1.global_batch_size, s1.stage1.warmup_ratio, s1.stage1.epochs) == \
        (5e-4, 256, 0.03, 1.0)
    assert s1.model.vision.name_or_path == "google/siglip-so400m-patch14-384"
    assert s1.model.lm.name_or_path == "microsoft/phi-2"
    assert (s2.lora.r, s2.lora.alpha, s2.lora.dropout) == (128, 256, 0.05)
    assert (s2.stage2.lr, s2.stage2.projector_lr, s2.stage2.global_batch_size) == (2e-4, 2e-5, 128)
    assert s2.stage2.template == "bunny" and s1.stage1.template == "plain"


def test_every_problem_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lm:\n    hidden_size: big\n  colour: red\nstage1:\n  precision: fp8\n")
    with pytest.raises(ConfigError) as e:
        config.load(str(bad))
    msg = str(e.value)
    assert len(e.value.problems) == 3
    assert "model.lm.hidden_size: expected an integer" in msg
    assert "model.colour: unknown key" in msg
    assert "stage1.precision: 'fp8' is not one of" in msg
    assert msg.startswith(str(bad))


def test_cross_field_problems_are_collected():
    with pytest.raises(ConfigError) as e:
        presets.tiny({"model.projector": "nope", "stage2.template": "vicuna",
                      "stage1.global_batch_size": 10, "lora.dropout": 1.5})
    assert len(e.value.problems) == 4
    assert "model.projector: unknown 'nope'" in str(e.value)
    assert "stage2.template: unknown 'vicuna'" in str(e.value)


def test_overrides_parse_as_yaml():
    assert config.parse_override("stage1.max_steps=10") == ("stage1.max_steps", 10)
    assert config.parse_override("stage1.lr=5e-4")[1] in ("5e-4", 5e-4)
    cfg = presets.tiny({"stage1.lr": "5e-4"})
    assert cfg.stage1.lr == 5e-4
