"""The curate run's configuration, and what a run folder must agree with before work starts.

Kept apart from `flows.curate` (which imports Prefect): `warren curate` validates the
config and the output folder here, in a fraction of a second, before Prefect starts.

A config is YAML with the groups below (pipelines/config.py loads it; `--set key=value`
overrides any field; `warren curate --help` lists every key with its default).

A run folder is keyed by its config and its input: the first run records both
(`curate_config.json`, `input.json`: the input's file list, sizes and modification
times); a rerun resumes only when both match, and otherwise stops in one line naming
what changed (`--restart` starts over, deleting only what Warren wrote there).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

from flows import runners
from pipelines import config, download, embed, runkey, select, storage
from pipelines.errors import ConfigError, InputError, OutputError


@dataclass(frozen=True)
class SourceConfig:
    path: str = field(metadata={"required": "source.path is required (metadata Parquet for urls, "
                                            "a folder for embeddings)"})
    """urls: LAION-style metadata Parquet (a file or a folder of them); embeddings: a LAION
    layout folder (img_emb/, text_emb/, metadata/) or Warren Parquet embedding tables."""
    kind: Literal["urls", "embeddings"] = "urls"
    """urls: download, embed, then select; embeddings: select on precomputed embeddings."""
    uid_column: str | None = None
    """The uid column; null: 'uid' for urls, 'key' (LAION) for embeddings."""
    url_column: str = "url"
    caption_column: str | None = "caption"
    shard_rows: int = 10_000
    """urls: rows per download / embedding shard."""
    coreset_shard_rows: int = 10_000
    """Rows per coreset-download part."""

    def __post_init__(self):
        p = []
        if not self.path:
            p.append("source.path is required (metadata Parquet for urls, a folder for embeddings)")
        if self.shard_rows < 1 or self.coreset_shard_rows < 1:
            p.append("source.shard_rows and coreset_shard_rows must be >= 1")
        if p:
            raise ConfigError(p)

    @property
    def uid(self) -> str:
        return self.uid_column or ("uid" if self.kind == "urls" else "key")


@dataclass(frozen=True)
class CurateConfig:
    """A whole curation run. Load with `load_config` (YAML + `key=value` overrides)."""
    output: str = field(metadata={"required": "output is required (config `output:` or --output)"})
    """The run folder (config `output:` or --output)."""
    source: SourceConfig = field(metadata={"required": "source.path is required (metadata "
                                                       "Parquet for urls, a folder for embeddings)"})
    download: download.DownloadConfig = field(default_factory=download.DownloadConfig)
    embed: embed.EmbedConfig = field(default_factory=embed.EmbedConfig)
    select: select.SelectConfig = field(default_factory=select.SelectConfig)
    runner: runners.RunnerConfig = field(default_factory=runners.RunnerConfig)
    coreset_images: Literal["download", "pool", "none"] = "download"
    """download: fetch the coreset's images; pool: copy them from the downloaded pool
    (urls only); none: no images."""
    report: bool = True
    """Write report.html."""

    def __post_init__(self):
        p = []
        if not self.output:
            p.append("output is required (config `output:` or --output)")
        if self.coreset_images == "pool" and self.source.kind != "urls":
            p.append("coreset_images: pool needs source.kind urls (embeddings have no pool images)")
        if p:
            raise ConfigError(p)

    def to_dict(self) -> dict:
        """Plain JSON types (tasks receive this, and `curate_config.json` records it)."""
        return json.loads(json.dumps({
            "output": self.output, "source": _asdict(self.source),
            "download": _asdict(self.download), "embed": _asdict(self.embed),
            "select": _asdict(self.select), "runner": _asdict(self.runner),
            "coreset_images": self.coreset_images, "report": self.report}))

    @classmethod
    def from_dict(cls, d: dict, source: str = "curate config") -> "CurateConfig":
        return config.build(cls, _with_implied(d), source=source)


def _asdict(group) -> dict:
    import dataclasses
    return dataclasses.asdict(group)


def _with_implied(d: dict | None) -> dict:
    """On precomputed embeddings the selection's uid column is the source's uid."""
    d = dict(d or {})
    src = d.get("source")
    if isinstance(src, dict) and src.get("kind") == "embeddings":
        sel = d.get("select")
        sel = dict(sel) if isinstance(sel, dict) else {} if sel is None else sel
        if isinstance(sel, dict):
            sel.setdefault("uid_column", src.get("uid_column") or "key")
            d["select"] = sel
    return d


def load_config(path: str | None, sets: list[str] | None = None, output: str | None = None,
                dask_address: str | None = None) -> CurateConfig:
    """Read a YAML config, apply `--set` overrides, and validate every group at once."""
    d = config.load_yaml(path, "curate config") if path else {}
    d = config.apply_overrides(d, sets)
    if output:
        d["output"] = output
    if dask_address:
        runner = d.get("runner")
        d["runner"] = {**(runner if isinstance(runner, dict) else {}), "dask_address": dask_address}
    return CurateConfig.from_dict(d, source=path or "curate config")


def help_text() -> str:
    return config.help_text(CurateConfig, "config keys (YAML groups; override with --set KEY=VALUE):")


# -- the run folder -----------------------------------------------------------------------
CONFIG_FILE = "curate_config.json"
INPUT_FILE = "input.json"
# Everything a curate run writes at the top of its folder: what --restart removes.
OWN_ENTRIES = ("_work", "pool", "embeddings", "images", "coreset.parquet", "rejects.parquet",
               "centroids.npy", "stats.json", "curate_stats.json", "manifest.json",
               "report.html", INPUT_FILE, CONFIG_FILE)


def check_input(c: CurateConfig) -> None:
    """A local source.path must exist before a run is keyed by it."""
    p = c.source.path
    if "://" in p and not p.startswith("file://"):
        return
    if not os.path.exists(p.removeprefix("file://")):
        raise InputError("not found (source.path)", path=p)


def check_output(c: CurateConfig) -> None:
    """The output is a folder (or can be one), and is apart from the input."""
    out = c.output
    runkey.check_apart(out, [c.source.path], what="output")
    if "://" in out and not out.startswith("file://"):
        return
    local = out.removeprefix("file://")
    if os.path.exists(local) and not os.path.isdir(local):
        raise ConfigError(f"output {out} is an existing file, not a folder: choose a folder")
    probe = local
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe.rstrip(os.sep)) or "."
    if os.path.isfile(probe):
        raise OutputError(out, f"{probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(out, "permission denied" if not _read_only(probe)
                          else "read-only file system")


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def restart(c: CurateConfig) -> list[str]:
    """Remove what an earlier run wrote into the output folder (only Warren's own
    entries; anything else there stays). Returns what was removed."""
    removed = []
    for name in OWN_ENTRIES:
        p = storage.join(c.output, name)
        if storage.exists(p):
            fs, fp = storage.filesystem(p)
            fs.rm(fp, recursive=True)
            removed.append(name)
    return removed


def check_run(c: CurateConfig) -> None:
    """A rerun into a folder must be the same run: same config (the runner, the output
    path and report may differ) and the same input. The first run records both."""
    cfg_path = storage.join(c.output, CONFIG_FILE)
    in_path = storage.join(c.output, INPUT_FILE)
    d = c.to_dict()
    keep = {k: v for k, v in d.items() if k not in ("runner", "output", "report")}
    current = runkey.fingerprint([c.source.path])
    if storage.exists(cfg_path):
        old = storage.read_json(cfg_path)
        old_keep = {k: v for k, v in old.items()
                    if k not in ("runner", "output", "report", "code_version")}
        if old_keep != keep:
            diff = sorted(k for k in set(keep) | set(old_keep) if old_keep.get(k) != keep.get(k))
            fields = _changed_fields(old_keep, keep)
            raise ConfigError(f"{c.output} holds a run with another config (differs in "
                              f"{', '.join(fields or diff)}); pass --restart to start over, "
                              "or choose another output folder", source="curate")
        saved = storage.read_json(in_path) if storage.exists(in_path) else None
        runkey.check_same(saved.get("fingerprint") if saved else None, current, c.output)
        if saved is None:
            storage.write_json(in_path, {"fingerprint": current})
        return
    from pipelines import manifest
    storage.makedirs(c.output)
    storage.write_json(in_path, {"fingerprint": current})
    storage.write_json(cfg_path, {**d, "code_version": manifest.code_version()})


def _changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_fields(a, b, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def prepare(c: CurateConfig, restart_run: bool = False) -> None:
    """Everything checked before any work: output apart from input and writable, then
    (after --restart's cleanup) the same config and input as a run already there."""
    check_input(c)
    check_output(c)
    if restart_run:
        restart(c)
    check_run(c)
