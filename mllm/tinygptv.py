"""TinyGPT-V's recipe as options of Warren's trainer. `register()` (called once by
mllm.registry.load_builtins) adds

  model transforms   tinygptv_norms, qk_layernorm, post_attn_norm, lm_norms,
                     stabilizers, qk_norm                            (mllm.stabilizers)
  vision tower       eva (BLIP-2's EVA ViT-g + TinyGPT-V's ln_vision)  (mllm.eva)
  connectors         qformer (BLIP-2 Q-Former + TinyGPT-V's two linear layers)
                                                                     (mllm.qformer)
                     resampler, resampler{8,16,32,64,...} (Warren's) (mllm.resampler)
  templates          tinygptv-pretrain, tinygptv-instruct, tinygptv, tinygptv-<task>
                                                                     (mllm.multitask)
  LM classes         <family>_warren models with their norms, in transformers' Auto
                     classes                                          (mllm.stabilizers)

The four-stage schedule is configs/train/tinygpt-v/; TinyGPT-V's own checkpoints load
through mllm.tinygptv_checkpoint (`warren import-tinygptv`). The user guide is
docs/tinygpt-v.md.
"""
from __future__ import annotations

STAGES = ("1-warmup", "2-pretrain", "3-instruct", "4-multitask")
"""The schedule's config files under configs/train/tinygpt-v/, in order."""


def register() -> None:
    from mllm import eva, multitask, qformer, registry, resampler, stabilizers
    for t in stabilizers.transforms():
        registry.register_transform(t)
    stabilizers.register_auto_classes()
    registry.register_vision("eva", eva.build)
    qformer.register()
    resampler.register()
    multitask.register()
