"""TinyGPT-V's recipe as options on Warren's trainer: importing this module registers

  model transforms   stabilizers, qk_norm, post_attn_norm        (mllm.stabilizers)
  projectors         resampler, resampler{8,16,32,64,...}         (mllm.resampler)
  templates          tinygptv, tinygptv-{vqa,caption,refer,...}   (mllm.multitask)

and names the four-stage schedule (configs/train/tinygpt-v/). Quantised inference is
mllm.quantize. The user guide is docs/tinygpt-v.md.
"""
from __future__ import annotations

from mllm import model as _model
from mllm import multitask, resampler, stabilizers  # noqa: F401  (registrations)

STAGES = ("1-warmup", "2-pretrain", "3-instruct", "4-multitask")
"""The schedule's config files under configs/train/tinygpt-v/, in order."""

for _name, _fn in stabilizers.TRANSFORMS.items():
    _model.register_transform(_name, _fn)

stabilizers.quiet_load_report()

enable_training = stabilizers.enable_training
