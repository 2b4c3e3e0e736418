"""Prefect flow `ablate` (`warren ablate --config FILE`): same training, different data.

From one source (a curation run from URLs: its embeddings/ and its downloaded pool/),
arms of the SAME size are drawn:
- selection arms: the selection re-run on the source's embeddings with the source's own
  select config plus the arm's overrides (`select: {}` is the Bunny coreset as curated;
  `{policy: semdedup, keep: far}`, `{clip_band: null, centroid_band: null}`, ...);
- the random arm (exactly one, the baseline): a seeded uniform sample of the pool.
`size` (or, when null, the smallest selection arm) is the rows of every arm; a larger
selection is cut to it by the same seeded uniform sample Bunny's rule ends with.

Each arm's rows become its stage-1 table (captions; images from the pool); every arm
shares one instruction mix, one tokenizer (built once from the pool's and the mix's
text when the recipe's tokenizer is `local`), the identical trainer config and seed,
and the same benchmark questions. Arms run in parallel on the task runner
(flows/runners.py; `runner.max_workers` arms at once, default half the CPUs, at most
the arm count); each trains in its own process (`python -m mllm.train`), so arms do not
share torch's global random state and a Dask runner can place them on other machines.

Outputs in `output`: arms/<name>/ (select/, coreset/, stage1/, manifest.json, train/,
eval/), mix/, bench/ (demo benchmark), tokenizer/, and
- ablation.parquet  one row per (arm, benchmark): headline score, mean per-question
                    credit, difference to the random arm with its paired bootstrap 95 %
                    interval over questions (mllm.eval.ablation.ABLATION)
- ablation.html     the same as one self-contained page with a plot and how to read it
- ablation.json     the resolved config, arm sizes and paths, and the rows
Every part records its key (flows.pipeline.part), so a rerun skips finished arms and a
killed one resumes (selection by its markers, training from checkpoints, eval from its
answers file).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import runners, specs
from flows.pipeline import (_fresh, _logger, bench_data, curate_part, make_mix, mix_key, part,
                            source_part)
from pipelines import config, storage
from pipelines.errors import ConfigError, WarrenError

TASK = dict(cache_policy=NO_CACHE, persist_result=False)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# -- configuration --------------------------------------------------------------------------
@dataclass(frozen=True)
class ArmSpec:
    name: str
    select: dict | None = None       # overrides of the source's select config ({}: as curated)
    random: bool = False             # the baseline: a seeded uniform sample of the pool

    def check(self, where: str) -> list[str]:
        p = []
        if not NAME.match(self.name or ""):
            p.append(f"{where}.name: {self.name!r} must be a plain folder name")
        if (self.select is not None) == self.random:
            p.append(f"{where}: give exactly one of select (a mapping, {{}} for the source's "
                     "own rule) or random: true")
        return p


@dataclass(frozen=True)
class AblateSource:
    run: str | None = None                          # a finished curation run from URLs
    demo_pool: specs.DemoPool | None = None         # or: draw the demo pool, curate it
    curate: specs.CurateSpec = field(default_factory=specs.CurateSpec)

    def check(self, where: str) -> list[str]:
        if (self.run is None) == (self.demo_pool is None):
            return [f"{where}: give exactly one of run or demo_pool"]
        if self.run is not None:
            missing = [x for x in ("curate_config.json", "embeddings", "pool")
                       if not os.path.exists(os.path.join(self.run, x))]
            if missing:
                return [f"{where}.run: {self.run} is not a finished curation run from URLs "
                        f"(missing {', '.join(missing)})"]
        return self.curate.check(f"{where}.curate") if self.demo_pool is not None else []


@dataclass(frozen=True)
class Bootstrap:
    n: int = 2000
    seed: int = 0


@dataclass(frozen=True)
class AblateConfig:
    output: str
    source: AblateSource
    arms: list[ArmSpec]
    mix: specs.MixSpec
    train: specs.TrainSpec
    eval: specs.EvalSpec
    size: int | None = None
    seed: int = 0
    runner: dict = field(default_factory=dict)
    bootstrap: Bootstrap = field(default_factory=Bootstrap)

    def check(self) -> list[str]:
        p = []
        for i, a in enumerate(self.arms):
            p += a.check(f"arms[{i}]")
        names = [a.name for a in self.arms]
        if len(self.arms) < 2:
            p.append("arms: at least two (a selection and the random baseline)")
        if len(set(names)) != len(names):
            p.append(f"arms: names must differ ({', '.join(names)})")
        if sum(a.random for a in self.arms) != 1:
            p.append("arms: exactly one random arm (the baseline the others are compared to)")
        if self.size is not None and self.size < 1:
            p.append(f"size must be >= 1 (got {self.size})")
        if self.bootstrap.n < 100:
            p.append("bootstrap.n must be >= 100")
        try:
            runners.RunnerConfig(**self.runner)
        except (ConfigError, TypeError) as e:
            p.append(f"runner: {e}")
        return p

    @property
    def baseline(self) -> str:
        return next(a.name for a in self.arms if a.random)

    def to_dict(self) -> dict:
        return specs.to_dict(self)


def load_config(path: str, overrides: list[str] | None = None,
                output: str | None = None) -> AblateConfig:
    d = config.apply_overrides(config.load_yaml(path, "ablate config"), overrides)
    if output:
        d["output"] = output
    return _config(d, path)


def _config(d: dict, source: str = "ablate config") -> AblateConfig:
    problems: list[str] = []
    cfg = specs.merge_top(AblateConfig, d, problems)
    if cfg is not None:
        problems += cfg.check()
        for name in ("source", "mix", "train", "eval"):
            problems += getattr(cfg, name).check(name)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


# -- the source ------------------------------------------------------------------------------
def _pool_shards(run: str) -> list[str]:
    return storage.listdir(storage.join(run, "pool"), "images_*.parquet")


def _embeddings(run: str) -> str:
    return storage.join(run, "embeddings")


def shared_tokenizer(run: str, mix_table: str, out: str, vocab_size: int) -> str:
    """One local tokenizer for every arm, trained on the pool's captions and the mix's
    text (as the trainer's own `local` tokenizer is on its tables), so arms differ in
    their data only."""
    from mllm import data as data_mod
    from mllm import tokenizer as tok_mod
    from mllm.templates import BUNNY_SYSTEM
    from mllm.templates import REGISTRY as TEMPLATES
    texts = [t.format(system=BUNNY_SYSTEM, content="", end="") for tpl in TEMPLATES.values()
             for t in (tpl.prefix, tpl.user, tpl.assistant)] * 8
    for f in storage.listdir(_embeddings(run), "*.parquet"):
        texts += [c for c in storage.read_table(f, columns=["caption"]).column("caption").to_pylist() if c]
    texts += data_mod.texts(mix_table)
    tok = tok_mod.build_local(texts, vocab_size)
    tok.save_pretrained(out)
    return out


# -- arms ------------------------------------------------------------------------------------
@task(name="select", task_run_name="select-{arm}", **TASK)
def t_select(cfg: dict, arm: str, run: str) -> dict:
    """The arm's selection on the source's embeddings, at its natural size."""
    from pipelines import select
    c = _config(cfg)
    spec = next(a for a in c.arms if a.name == arm)
    base = storage.read_json(storage.join(run, "curate_config.json"))["select"]
    scfg = select.SelectConfig.from_dict({**base, **spec.select, "target": None})
    out = storage.join(c.output, "arms", arm, "select")
    key = {"select": scfg.to_dict(), "embeddings": _fingerprint(_embeddings(run))}

    def go(stale):
        if stale:
            _fresh(out)
        stats = select.run(scfg, _embeddings(run), out, progress=False)
        return {"coreset": storage.join(out, "coreset.parquet"), "rows": stats["coreset_rows"],
                "funnel": stats["funnel"], "config": scfg.to_dict()}
    return part(c.output, f"select-{arm}", key, go, _logger())


def _fingerprint(path: str) -> dict:
    from pipelines import runkey
    return {k: {"files": v["files"], "bytes": v["bytes"], "digest": v["digest"]}
            for k, v in runkey.fingerprint(path).items()}


def arm_rows(c: AblateConfig, arm: ArmSpec, run: str, selected: dict | None, size: int):
    """The arm's `size` rows (uid, url, caption, ...) as an Arrow table, by uid."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines import bands
    if arm.random:
        t = pa.concat_tables([storage.read_table(f, columns=["uid", "url", "caption"])
                              for f in storage.listdir(_embeddings(run), "*.parquet")])
    else:
        t = storage.read_table(selected["coreset"])
    uids = t.column("uid")
    keep = bands.sample(bands.uid_hash_arrow(uids), uids, size, c.seed)
    t = t.filter(pa.array(keep))
    return t.take(pc.sort_indices(t, [("uid", "ascending")]))


@task(name="arm", task_run_name="arm-{arm}", **TASK)
def t_arm(cfg: dict, arm: str, run: str, selected: dict | None, size: int, mix: dict,
          tokenizer: str | None, data: str, threads: int) -> dict:
    """One arm end to end: its rows and images, stage-1 table and manifest, both
    training stages (a subprocess), eval."""
    from flows.pipeline import eval_key, evaluate_model
    from pipelines import download, manifest
    from pipelines.mix import stage1
    c = _config(cfg)
    spec = next(a for a in c.arms if a.name == arm)
    log = _logger()
    root = storage.join(c.output, "arms", arm)
    sets = dict(c.train.set)
    if tokenizer is not None:
        sets["data.tokenizer"] = os.path.abspath(tokenizer)
    resolved = specs.TrainSpec(c.train.config, sets).load().to_dict()
    rows_from = storage.sha256(selected["coreset"]) if selected else _fingerprint(_embeddings(run))
    key = {"arm": specs.to_dict(spec), "size": size, "seed": c.seed, "rows_from": rows_from,
           "mix": mix["sha256"], "train": resolved,
           "eval": {k: v for k, v in specs.to_dict(c.eval).items() if k not in ("workers",)},
           "data": os.path.abspath(data)}

    def go(stale):
        if stale:
            _fresh(*(storage.join(root, x) for x in ("coreset", "stage1", "manifest.json",
                                                     "train", "eval")))
        cs_dir = storage.join(root, "coreset")
        rows = arm_rows(c, spec, run, selected, size)
        storage.write_table(rows, storage.join(cs_dir, "coreset.parquet"), rows.schema)
        images = download.gather_from_pool(storage.join(cs_dir, "coreset.parquet"),
                                           _pool_shards(run),
                                           storage.join(cs_dir, "images", "coreset_images.parquet"),
                                           storage.join(cs_dir, "images", "missing.parquet"))
        manifest.write(storage.join(cs_dir, "manifest.json"),
                       {"coreset": storage.join(cs_dir, "coreset.parquet")},
                       config={"arm": specs.to_dict(spec), "size": size, "seed": c.seed},
                       images={"coreset": {"kind": "parquet",
                                           "path": "images/coreset_images.parquet"}})
        man = storage.join(root, "manifest.json")
        _fresh(man)
        s1 = stage1.run(stage1.Stage1Config(manifest=man), storage.join(cs_dir, "coreset.parquet"),
                        storage.join(root, "stage1"))
        mm = manifest.load(mix["manifest"])
        stage1.add_to_manifest(man, "mix", mm.table_path("mix"), mm.images("mix"))
        log(f"arm {arm}: {rows.num_rows} rows ({images['images']} images), "
            f"stage-1 table {s1['kept']} records; training")
        train_out = storage.join(root, "train")
        summaries = {n: train_subprocess(c.train.config, sets, man, train_out, n, threads,
                                         c.eval.device) for n in (1, 2)}
        model = summaries[2]["final"]
        log(f"arm {arm}: trained (stage 2 loss {summaries[2]['final_loss']:.3f}); evaluating")
        ev = evaluate_model(c.eval, model, data, storage.join(root, "eval"), restart=False)
        ev_key = eval_key(c.eval, model, data)
        return {"rows": rows.num_rows, "images": images["images"], "model": model,
                "manifest": man, "eval": ev, "eval_key": ev_key,
                "train": {f"stage{n}": {k: s.get(k) for k in ("steps", "first_loss", "final_loss")}
                          for n, s in summaries.items()}}
    return part(c.output, f"arm-{arm}", key, go, log)


def train_subprocess(config: str, sets: dict, manifest_path: str, out: str, stage: int,
                     threads: int, device: str = "auto") -> dict:
    """One training stage in its own process (resuming its checkpoints); its summary."""
    from mllm import train
    done = train.completed(out, stage)
    if done is not None:
        return done
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "mllm.train", "--manifest", manifest_path, "--config", config,
           "--stage", str(stage), "--output", out, "--resume", "--no-progress",
           "--device", device]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    log_path = os.path.join(out, f"stage{stage}.log")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log_path, "wb") as logf:
        r = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if r.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read().strip().splitlines()[-1:] or ["(no output)"]
        raise WarrenError(f"training stage {stage} of {manifest_path} failed (exit {r.returncode}): "
                          f"{tail[0]} (log: {log_path})")
    done = train.completed(out, stage)
    if done is None:
        raise WarrenError(f"training stage {stage} ended without its summary (log: {log_path})")
    return done


# -- comparison ------------------------------------------------------------------------------
def credits(c: AblateConfig, arms: dict[str, dict], data: str) -> dict:
    """Per arm and benchmark: per-question credits and the headline, from the answers."""
    from mllm.eval import run
    from mllm.eval.types import REGISTRY
    out = {}
    for name, res in arms.items():
        benches = {}
        for b in c.eval.benchmarks:
            bench = REGISTRY[b]()
            if not hasattr(bench, "per_question"):
                raise ConfigError(f"benchmark {b} gives no per-question credits; an ablation "
                                  "needs them for its intervals", source="eval.benchmarks")
            r = res["eval"]["benchmarks"][b]
            answers = run.read_answers(r["answers"])[:r["n"]]
            ddir = os.path.abspath(run.benchmark_dir(data, b, bench))
            head = r.get("headline")
            benches[b] = {"credits": run.credits_of(bench, ddir, answers, c.eval.limit),
                          "headline": (head["key"], head["value"]) if head else None}
        out[name] = benches
    return out


@flow(name="ablate-arms")
def arms_flow(cfg: dict, run: str, mix: dict, tokenizer: str | None, data: str,
              parallel: int) -> tuple[dict, dict, int]:
    """Selections, then every arm, on the caller's task runner; (arms, natural sizes, size)."""
    c = _config(cfg)
    sel_arms = [a.name for a in c.arms if not a.random]
    futures = {a: t_select.submit(cfg, a, run) for a in sel_arms}
    selected = {a: f.result() for a, f in futures.items()}
    natural = {a: s["rows"] for a, s in selected.items()}
    size = c.size if c.size is not None else min(natural.values())
    short = {a: n for a, n in natural.items() if n < size}
    if size < 1 or short:
        raise ConfigError(f"arms must all have size {size}: "
                          + ", ".join(f"{a} keeps only {n} rows" for a, n in short.items())
                          + "; lower size (or loosen those arms' selection)", source="ablate")
    threads = max(1, (os.cpu_count() or 1) // parallel)
    futures = {a.name: t_arm.submit(cfg, a.name, run, selected.get(a.name), size, mix, tokenizer,
                                    data, threads) for a in c.arms}
    return {a: f.result() for a, f in futures.items()}, natural, size


@flow(name="ablate", log_prints=True)
def ablate(config: str, overrides: list[str] | None = None, output: str | None = None) -> dict:
    """Every arm of an ablation config; returns ablation.json's content."""
    from mllm.eval import ablation
    from pipelines import manifest

    c = load_config(config, overrides, output)
    cfg = c.to_dict()
    log = _logger()
    t0 = time.perf_counter()
    storage.makedirs(c.output)
    # the source: a finished curation run, or the demo pool curated here
    if c.source.run is not None:
        run = c.source.run
    else:
        src = specs.SourceSpec(demo_pool=c.source.demo_pool)
        found = source_part(c.output, src, log)
        run = curate_part(c.output, src, c.source.curate, found, log)["run"]
    # what every arm shares: the mix, the tokenizer, the benchmark
    mix_manifest = storage.join(c.output, "mix.json")
    mx = part(c.output, "mix", mix_key(c.mix),
              lambda stale: make_mix(c.mix, c.output, mix_manifest, log), log)
    mx = {**mx, "manifest": mix_manifest, "sha256": storage.sha256(mx["table"])}
    tokenizer = None
    train_cfg = c.train.load()
    if train_cfg.data.tokenizer == "local":
        tok_dir = storage.join(c.output, "tokenizer")
        tokenizer = part(c.output, "tokenizer",
                         {"pool": _fingerprint(_embeddings(run)), "mix": mx["sha256"],
                          "vocab": train_cfg.data.tokenizer_vocab_size},
                         lambda stale: {"path": shared_tokenizer(run, mx["table"], tok_dir,
                                                                 train_cfg.data.tokenizer_vocab_size)},
                         log)["path"]
    data = bench_data(c.eval, c.output, log)
    rc = runners.RunnerConfig(**c.runner)
    parallel = rc.max_workers or max(1, min(len(c.arms), (os.cpu_count() or 1) // 2))
    if not rc.uses_dask:
        rc = runners.RunnerConfig(**{**c.runner, "max_workers": parallel})
    arms, natural, size = arms_flow.with_options(task_runner=runners.make(rc))(
        cfg, run, mx, tokenizer, data, parallel)
    got = credits(c, arms, data)
    info = {a.name: {"size": arms[a.name]["rows"], "benchmarks": got[a.name],
                     "selection": {"random": True, "seed": c.seed} if a.random
                     else {"select": a.select, "seed": c.seed}} for a in c.arms}
    rows = ablation.compare(info, c.baseline, c.bootstrap.n, c.bootstrap.seed)
    ablation.write_table(rows, storage.join(c.output, "ablation.parquet"))
    meta = {"config": os.path.abspath(config), "source": run, "size": size,
            "natural sizes": json.dumps(natural), "train": c.train.config,
            "benchmarks": ", ".join(c.eval.benchmarks), "data": data,
            "code": manifest.code_version()}
    ablation.write_html(rows, storage.join(c.output, "ablation.html"), meta)
    record = {"config": os.path.abspath(config), "resolved": cfg, "source": run, "size": size,
              "natural_sizes": natural, "baseline": c.baseline, "tokenizer": tokenizer,
              "runner": runners.describe(rc), "parallel_arms": parallel,
              "arms": {a: {k: v for k, v in r.items() if k != "eval_key"} for a, r in arms.items()},
              "rows": rows, "seconds": round(time.perf_counter() - t0, 2),
              "outputs": {"parquet": storage.join(c.output, "ablation.parquet"),
                          "html": storage.join(c.output, "ablation.html")}}
    storage.write_json(storage.join(c.output, "ablation.json"), record)
    create_table_artifact([{k: r[k] for k in ("arm", "benchmark", "size", "n", "score", "diff",
                                              "ci_low", "ci_high")} for r in rows],
                          key="ablation", description=f"arms vs {c.baseline}")
    create_markdown_artifact(f"# Ablation `{config}`\n\n{len(c.arms)} arms of {size} rows; "
                             f"`{c.output}/ablation.html`", key="ablation-summary")
    for r in rows:
        if r["arm"] != c.baseline:
            log(f"{r['benchmark']}: {r['arm']} - {c.baseline} = {r['diff']:+.2f} points "
                f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]")
    return record

