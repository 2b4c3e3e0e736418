"""Config groups shared by the pipeline and ablation flows, and the loader that builds
them from YAML (with pipelines.config): every problem of every group is collected,
then raised once.

    mix:    recipe: configs/mix/bunny-695k.yaml            # a recipe file, or
            synthetic: {scale: 0.002, max_images: 64}      # scaled-down synthetic sources
    train:  config: configs/train/tiny.yaml
            set: {stage1.max_steps: 30}                    # dotted overrides of the trainer config
    eval:   benchmarks: [pope, gqa]
            data: playground/data/eval                     # LLaVA's eval folder, or
            demo_bench: {images: 24, seed: 1}              # a held-out procedural benchmark
            batch_size: 16, workers: 2, limit: null, max_new_tokens: null, device: auto

Relative paths are relative to the folder the flow runs in (the repository root for
`warren serve` and prefect.yaml's worker), as in every Warren config.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from pipelines import config
from pipelines.errors import ConfigError


@dataclass(frozen=True)
class SyntheticMix:
    """Bunny's recipe run on scaled-down synthetic sources in the real formats."""
    scale: float = 0.002
    max_images: int = 64
    recipe: str = "bunny-695k"


@dataclass(frozen=True)
class MixSpec:
    recipe: str | None = None            # a recipe file (warren mix --recipe)
    synthetic: SyntheticMix | None = None

    def check(self, where: str) -> list[str]:
        p = []
        if (self.recipe is None) == (self.synthetic is None):
            p.append(f"{where}: give exactly one of recipe or synthetic")
        if self.recipe is not None and not os.path.exists(self.recipe):
            p.append(f"{where}.recipe: {self.recipe} not found")
        return p


@dataclass(frozen=True)
class TrainSpec:
    config: str = "configs/train/tiny.yaml"
    set: dict = field(default_factory=dict)

    def check(self, where: str) -> list[str]:
        from mllm import config as config_mod
        try:
            config_mod.load(self.config, dict(self.set))
        except ConfigError as e:
            return [f"{where}: {x}" for x in e.problems] if e.problems else [f"{where}: {e}"]
        return []

    def load(self):
        from mllm import config as config_mod
        return config_mod.load(self.config, dict(self.set))


@dataclass(frozen=True)
class DemoBench:
    """pipelines/synth/demo_bench.py: POPE- and GQA-style sets on held-out images."""
    images: int = 24
    seed: int = 1


@dataclass(frozen=True)
class EvalSpec:
    benchmarks: list[str] = field(default_factory=lambda: ["pope", "gqa"])
    data: str | None = None              # LLaVA's playground/data/eval layout
    demo_bench: DemoBench | None = None
    batch_size: int = 16
    workers: int = 2
    limit: int | None = None
    max_new_tokens: int | None = None    # cap every answer (quick runs); null: the benchmark's
    device: str = "auto"

    def check(self, where: str) -> list[str]:
        p = []
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            p.append(f"{where}.max_new_tokens: must be >= 1 (or null)")
        if (self.data is None) == (self.demo_bench is None):
            p.append(f"{where}: give exactly one of data or demo_bench")
        if self.data is not None and not os.path.exists(self.data):
            p.append(f"{where}.data: {self.data} not found")
        if not self.benchmarks:
            p.append(f"{where}.benchmarks: name at least one")
        if self.batch_size < 1 or self.workers < 0 or (self.limit is not None and self.limit < 1):
            p.append(f"{where}: batch_size >= 1, workers >= 0 and limit >= 1 (or null)")
        return p


@dataclass(frozen=True)
class DemoPool:
    n: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class SourceSpec:
    demo_pool: DemoPool | None = None    # generate the procedural pool, serve it on 127.0.0.1
    path: str | None = None              # the curate config's source.path (metadata or embeddings)

    def check(self, where: str) -> list[str]:
        if (self.demo_pool is None) == (self.path is None):
            return [f"{where}: give exactly one of demo_pool or path"]
        if self.path is not None and "://" not in self.path and not os.path.exists(self.path):
            return [f"{where}.path: {self.path} not found"]
        return []


@dataclass(frozen=True)
class CurateSpec:
    """The curate config file and `key=value` overrides of it."""
    config: str = "configs/curate/demo.yaml"
    set: list[str] = field(default_factory=list)

    def check(self, where: str) -> list[str]:
        return [] if os.path.exists(self.config) else [f"{where}.config: {self.config} not found"]


# Loading: pipelines.config (the one mechanism curate, mix and train use) merges a
# mapping into these groups; each group's `check(where)` adds the cross-field problems.

def merge_top(cls, d, problems: list[str]):
    """`pipelines.config.merge` of a whole pipeline/ablate config. Unknown top-level keys
    are reported without blocking the groups, so one error names every problem (each
    group's `check(where)` runs on what merged)."""
    if isinstance(d, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        problems += [f"{k}: unknown key (known: {', '.join(sorted(known))})" for k in d if k not in known]
        d = {k: v for k, v in d.items() if k in known}
    own: list[str] = []
    cfg = config.merge(cls, d, "", own)
    problems += own
    return cfg


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
