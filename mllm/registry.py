"""The named parts a trainer config can ask for, and the one place that says who
provides them.

    model.vision.arch    -> VISION[arch](VisionConfig, dtype) -> a vision tower
    model.projector      -> mllm.projector.REGISTRY[name](vision_dim, lm_dim, ...) -> a connector
    model.transforms     -> TRANSFORMS[name]: a Transform (LM config changes, a hook run
                            after the model is built, parameters that train in every stage)
    stageN.template      -> mllm.templates.REGISTRY[name]

Nothing registers itself when a module is imported. Warren's own optional parts
(TinyGPT-V's norms, Q-Former connector, EVA tower, resampler and templates) are added by
one explicit call, `load_builtins()`, which config validation and model building make
before they look a name up (it runs once; later calls return at once). Code that adds
its own parts calls `register_*` itself, before building.

This module imports nothing from mllm at module level, so config, model and the parts
can all import it without an import circle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pipelines.errors import ConfigError


@dataclass(frozen=True)
class Transform:
    """A named change to the built model.

    lm_config   fn(arch) -> settings merged into the LM's transformers config before the
                LM is built or loaded (e.g. Phi's `qk_layernorm=True`); None = none
    apply       fn(vlm, model_cfg) -> vlm, run after the VLM is assembled; None = none
    trainable   regular expressions over the LM's parameter names (as
                `language_model.named_parameters()` gives them): matching parameters
                train in every stage, in float32, whatever the stage freezes
    """

    name: str
    lm_config: Callable[[str], dict[str, Any]] | None = None
    apply: Callable[[Any, Any], Any] | None = None
    trainable: tuple[str, ...] = ()
    help: str = ""


TRANSFORMS: dict[str, Transform] = {}
VISION: dict[str, Callable[..., Any]] = {}
_builtins = "no"  # no | loading | yes


def register_transform(transform: Transform) -> Transform:
    TRANSFORMS[transform.name] = transform
    return transform


def register_vision(arch: str, builder: Callable[..., Any]) -> None:
    """`builder(vision_cfg, dtype) -> tower` for `model.vision.arch: <arch>`. The tower
    has the interface of mllm.vision.VisionTower (hidden_size, image_size, num_patches,
    normalisation, `.model` with save_pretrained, forward(pixel_values) -> features)."""
    VISION[arch] = builder


def register_projector(name: str, builder: Callable[..., Any]) -> None:
    from mllm import projector
    projector.register(name, builder)


def load_builtins() -> None:
    """Register Warren's optional parts (mllm.tinygptv.register) once."""
    global _builtins
    if _builtins != "no":  # done, or under way (the parts may consult the registry themselves)
        return
    _builtins = "loading"
    try:
        from mllm import tinygptv
        from mllm import vision
        VISION.setdefault("siglip", vision.build)
        VISION.setdefault("clip", vision.build)
        tinygptv.register()
    except BaseException:
        _builtins = "no"
        raise
    _builtins = "yes"


def transforms() -> dict[str, Transform]:
    load_builtins()
    return TRANSFORMS


def transform(name: str) -> Transform:
    load_builtins()
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ConfigError(f"model.transforms: unknown '{name}' "
                          f"(known: {', '.join(sorted(TRANSFORMS)) or 'none'})") from None


def vision_builder(arch: str) -> Callable[..., Any]:
    load_builtins()
    try:
        return VISION[arch]
    except KeyError:
        raise ConfigError(f"model.vision.arch: unknown '{arch}' (known: {', '.join(sorted(VISION))})") from None


def projectors() -> dict[str, Callable[..., Any]]:
    load_builtins()
    from mllm import projector
    return projector.REGISTRY


def templates() -> dict[str, Any]:
    load_builtins()
    from mllm import templates as templates_mod
    return templates_mod.REGISTRY


def trainable_patterns(names: list[str]) -> list[str]:
    """The union of the `trainable` patterns of the named transforms."""
    out: list[str] = []
    for name in names:
        for pattern in transform(name).trainable:
            if pattern not in out:
                out.append(pattern)
    return out


def lm_config(names: list[str], arch: str) -> dict[str, Any]:
    """The LM config settings the named transforms ask for, merged. Two transforms that
    set the same key to different values (e.g. two kinds of QK-norm) are an error."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"model.transforms: '{name}' is listed twice")
        seen.add(name)
        t = transform(name)
        if t.lm_config is None:
            continue
        for key, value in t.lm_config(arch).items():
            if key == "warren_norms":
                norms = dict(merged.get(key) or {})
                for k, v in value.items():
                    if k in norms and norms[k] != v:
                        raise ConfigError(f"model.transforms: '{owner[f'{key}.{k}']}' and '{name}' both "
                                          f"set the LM's {k} norm ({norms[k]!r} vs {v!r}): list one")
                    norms[k] = v
                    owner[f"{key}.{k}"] = name
                merged[key] = norms
            else:
                if key in merged and merged[key] != value:
                    raise ConfigError(f"model.transforms: '{owner[key]}' and '{name}' both set "
                                      f"{key} ({merged[key]!r} vs {value!r}): list one")
                merged[key] = value
                owner[key] = name
    return merged
