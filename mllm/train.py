"""The trainer: stage 1 (projector only) and stage 2 (LoRA on the LM + projector).

    train(cfg, manifest_path, output_dir, stage=1)   # -> summary dict

Output of one stage, under `<output_dir>/stage{n}/`:
    config.yaml, tokenizer/, metrics.jsonl (one line per optimizer step: loss, lr,
    grad_norm, tokens, tokens_per_s, ...), loss.png, checkpoints/step-*/ (see
    mllm.checkpoint), final/ (an export: mllm.export.load(final) gives the model; for
    stage 2 with LoRA merged), summary.json.

One optimizer step = `global_batch_size` samples over all processes, split into
`accum = global / (micro x world)` micro-batches per process. The loss is the mean
over every supervised token of the whole global batch: each micro-batch's summed
token loss is divided by the step's total token count (all-reduced), so gradient
accumulation and DDP give the same gradient as one big batch.

Run under `torchrun --nproc_per_node N` for DDP (gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass

import torch
import yaml

from mllm import checkpoint, distributed, export, frozen_cast, lora
from mllm import data as data_mod
from mllm import tokenizer as tok_mod
from mllm.config import Config, ModelConfig, StageConfig
from mllm.model import VLM, from_config, trainable_set
from mllm.sampler import GlobalBatchSampler, RankBatches
from mllm.templates import BUNNY_SYSTEM
from mllm.templates import REGISTRY as TEMPLATES
from mllm.templates import get as get_template
from pipelines import manifest as manifest_mod
from pipelines import schemas, storage
from pipelines.errors import ConfigError, InputError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------- schedule

def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float = 0.0,
                       warmup_start: float = 0.0):
    """Multiplier of the base lr at step s: linear `warmup_start` -> 1 over warmup, then
    a cosine from 1 to `min_ratio` at `total_steps` (with the defaults, the schedule of
    transformers' get_cosine_schedule_with_warmup)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_start + (1.0 - warmup_start) * step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return factor


def linear_warmup_cosine(total_steps: int, warmup_steps: int, lr: float, min_lr: float,
                         warmup_lr: float):
    """TinyGPT-V's (LAVIS') LinearWarmupCosineLRScheduler as a multiplier of `lr`: the lr
    of optimizer step s (0-based; LAVIS sets it before the step) is

        s < warmup:  min(lr, warmup_lr + (lr - warmup_lr) * s / warmup)
        otherwise:   min_lr + (lr - min_lr) * (1 + cos(pi * s / total)) / 2

    The cosine is over the whole run (max_epoch x iters_per_epoch steps) and does not
    restart after warmup, so the first step after warmup is already below lr; with
    min_lr > lr (TinyGPT-V's stage 4 as released) it rises towards min_lr."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            value = min(lr, warmup_lr + (lr - warmup_lr) * step / max(warmup_steps, 1))
        else:
            value = (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1))) + min_lr
        return value / lr
    return factor


def schedule_for(s: StageConfig, total_steps: int):
    """The lr multiplier of a stage (see StageConfig.schedule)."""
    warm = s.warmup_steps if s.warmup_steps is not None else warmup_steps(total_steps, s.warmup_ratio)
    if s.schedule == "linear_warmup_cosine":
        return linear_warmup_cosine(total_steps, warm, s.lr, s.min_lr, s.warmup_lr)
    return cosine_with_warmup(total_steps, warm, s.min_lr / s.lr, s.warmup_lr / s.lr)


def warmup_steps(total_steps: int, ratio: float) -> int:
    return math.ceil(total_steps * ratio)


# ------------------------------------------------------------------ preparation

@dataclass
class Setup:
    """Everything a stage needs before its loop: used by `train` and by bench/train.py
    (which hands the identical model and data to HF Trainer)."""

    cfg: Config
    stage: int
    scfg: StageConfig
    out: str
    tokenizer: object
    vlm: VLM
    model: torch.nn.Module  # the VLM, or its peft wrapper in stage 2
    dataset: data_mod.ConversationDataset
    sampler: GlobalBatchSampler
    collator: data_mod.Collator
    accum: int
    total_steps: int
    table_sha256: str
    model_cfg: ModelConfig
    """Describes `vlm` (stage 2: the stage-1 export's, not cfg.model)."""
    lora: bool = False
    """Whether `model` is `vlm` wrapped in LoRA (merged into the final export)."""


def stage_dir(output_dir: str, stage: int) -> str:
    return os.path.join(output_dir, f"stage{stage}")


def _tokenizer(cfg: Config, manifest, stage: int, out: str, init_from: str | None):
    saved = os.path.join(out, "tokenizer")
    if os.path.isdir(saved):  # a resumed run keeps its own tokenizer
        return tok_mod.load(saved)
    if init_from is not None:
        return tok_mod.load(export.tokenizer_dir(init_from))
    if cfg.data.tokenizer != "local":
        return tok_mod.load(cfg.data.tokenizer)
    # The templates' fixed text (system prompt, role names) is in every sample.
    texts = [t.format(system=BUNNY_SYSTEM, content="", end="") for tpl in TEMPLATES.values()
             for t in (tpl.prefix, tpl.user, tpl.assistant)] * 8
    for name in sorted(manifest.doc["tables"]):
        if name in ("stage1", "mix"):
            texts += data_mod.texts(manifest.table_path(name))
    return tok_mod.build_local(texts, cfg.data.tokenizer_vocab_size)


def _init_from(cfg: Config, stage: int, output_dir: str) -> str | None:
    s = cfg.stage(stage)
    if s.init_from is not None:
        if export.kind(s.init_from) is None:
            raise ConfigError(f"stage{stage}.init_from: {s.init_from} is not an exported model folder "
                              "(Warren's final/ or a llava-hf folder)")
        return s.init_from
    if stage == 1:
        return None
    default = os.path.join(stage_dir(output_dir, 1), "final")
    if not os.path.exists(os.path.join(default, export.META)):
        raise ConfigError(f"stage 2 starts from the stage-1 model, but {default} does not exist: "
                          "run stage 1 first or set stage2.init_from")
    return default


def prepare(cfg: Config, manifest_path: str, output_dir: str, stage: int,
            world_size: int = 1, progress: bool = False) -> Setup:
    """Load the manifest (verifying its hashes), tokenizer, model and data of a stage.
    Every row of the stage's table is checked here, before step 1: `setup.dataset.rejects`
    holds the rows refused (see mllm.data), and `check_rejects` writes them."""
    s = cfg.stage(stage)
    out = stage_dir(output_dir, stage)
    man = manifest_mod.load(manifest_path, verify=True)
    table = man.table_path(s.table)  # raises ManifestError naming the table if absent
    init_from = _init_from(cfg, stage, output_dir)
    tokenizer = _tokenizer(cfg, man, stage, out, init_from)
    template = get_template(s.template)
    template.check_tokenizer(tokenizer)

    torch.manual_seed(cfg.run.seed)  # random-init weights are a function of the seed
    if init_from is None:
        vlm, model_cfg = from_config(cfg, tokenizer), cfg.model
    else:
        loaded = export.load(init_from, dtype=cfg.model.dtype)
        vlm, model_cfg = loaded.model, loaded.model_cfg
        if vlm.image_token_id != tokenizer.convert_tokens_to_ids(tok_mod.IMAGE_TOKEN):
            raise InputError("tokenizer and model disagree on the <image> id", path=init_from)
    if s.image_size is not None and s.image_size != vlm.vision.image_size:
        model_cfg = _resize_tower(vlm, model_cfg, s.image_size)
    # What trains: LoRA where the stage uses it, the connector (less its frozen parts),
    # and the LM parameters the model transforms name (e.g. TinyGPT-V's norms).
    vlm.requires_grad_(False)
    use_lora = s.lora if s.lora is not None else stage == 2
    if use_lora:
        torch.manual_seed(cfg.run.seed + 1)  # LoRA A init
        model = lora.apply(vlm, cfg.lora)
    else:
        model = vlm
    trainable_set(model, vlm, model_cfg)

    mean, std = vlm.vision.normalisation
    processor = data_mod.ImageProcessor(vlm.vision.image_size, mean, std, cfg.data.image_aspect)
    # Stage 1 trains only the projector: a text-only row would give it no gradient.
    dataset = data_mod.ConversationDataset(
        table, data_mod.image_store(man.images(s.table)), tokenizer, template,
        vlm.num_image_tokens, processor, cfg.data.max_length, require_image=stage == 1,
        progress=progress)
    if len(dataset) == 0:  # every rank gets here; the write is atomic and the same for all
        path = _write_rejects(dataset, s.table, out)
        raise InputError(f"every one of its {len(dataset.rejects):,} rows was refused before step 1 "
                         f"({_reasons(dataset)}; listed in {path}): nothing to train on", path=table)
    if s.global_batch_size % (s.micro_batch_size * world_size):
        raise ConfigError(f"stage{stage}.global_batch_size {s.global_batch_size} is not a multiple "
                          f"of micro_batch_size {s.micro_batch_size} x {world_size} processes")
    accum = s.global_batch_size // (s.micro_batch_size * world_size)
    sampler = GlobalBatchSampler(dataset.lengths, dataset.has_image, s.global_batch_size,
                                 seed=cfg.run.seed, megabatch=cfg.data.megabatch,
                                 group_by_modality_length=cfg.data.group_by_modality_length)
    total = s.max_steps or math.ceil(s.epochs * sampler.steps_per_epoch)
    return Setup(cfg, stage, s, out, tokenizer, vlm, model, dataset, sampler,
                 data_mod.Collator(tokenizer.pad_token_id), accum, total,
                 man.entry(s.table)["sha256"], model_cfg, use_lora)


def _resize_tower(vlm: VLM, model_cfg: ModelConfig, image_size: int) -> ModelConfig:
    """The stage's image size (TinyGPT-V stage 4: 448): position embeddings interpolated,
    and the model config (hence the export) saying so."""
    import dataclasses

    from mllm import eva
    eva.resize(vlm.vision, image_size)
    return dataclasses.replace(model_cfg, vision=dataclasses.replace(model_cfg.vision, image_size=image_size))


def _reasons(dataset: data_mod.ConversationDataset) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in dataset.reject_counts().items())


def _write_rejects(dataset: data_mod.ConversationDataset, table: str, out: str) -> str:
    path = os.path.join(out, "rejects.parquet")
    storage.write_table(dataset.reject_table(table), path, schemas.TRAIN_REJECTS)
    return path


def check_rejects(setup: Setup, is_main: bool = True) -> dict:
    """Write `<stage>/rejects.parquet` (main process) and return the counts for
    summary.json; with data.strict, stop here (before step 1) if any row was refused."""
    ds = setup.dataset
    path = os.path.join(setup.out, "rejects.parquet")
    if is_main:
        _write_rejects(ds, setup.scfg.table, setup.out)
    counts = {"input_rows": len(ds.ids), "trained_rows": len(ds), "rejected_rows": len(ds.rejects),
              "rejects": ds.reject_counts(), "rejects_path": path}
    if ds.rejects:
        first = ds.rejects[0]
        where = f"first: row {first.row} (id {first.id!r}) {first.reason}: {first.detail}"
        if setup.cfg.data.strict:
            raise InputError(f"{len(ds.rejects):,} of {len(ds.ids):,} rows refused before step 1 "
                             f"({_reasons(ds)}; {where}); data.strict is true: fix them or drop "
                             f"them (all listed in {path})", path=ds.path)
        log.warning("stage %d: %d of %d rows refused before step 1 (%s), listed in %s; %s",
                    setup.stage, len(ds.rejects), len(ds.ids), _reasons(ds), path, where)
    return counts


def optimizer_for(setup: Setup) -> torch.optim.Optimizer:
    """AdamW: LoRA (and anything else trainable) at lr, the projector at projector_lr
    (stage 2; stage 1 trains only the projector, at lr). No decay on biases/norms."""
    s = setup.scfg
    proj = {id(p) for p in setup.vlm.projector.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for _, p in setup.model.named_parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in proj, p.ndim >= 2), []).append(p)
    proj_lr = s.lr if setup.stage == 1 else (s.projector_lr or s.lr)
    param_groups = [{"params": ps, "lr": proj_lr if is_proj else s.lr,
                     "weight_decay": s.weight_decay if decay else 0.0}
                    for (is_proj, decay), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, betas=tuple(s.betas))


# ------------------------------------------------------------------------ loop

def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint a resume starts at)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)


def plot_loss(metrics_path: str, png_path: str) -> str:
    """Loss (and lr) against step, from metrics.jsonl, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path, encoding="utf-8") if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", alpha=0.5)
    ax2.set_ylabel("lr", color="tab:orange")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))) or "loss")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def train(cfg: Config, manifest_path: str, output_dir: str | None = None, stage: int | None = None,
          resume: bool = False, progress: bool = True, device: str = "auto",
          supervised_logits_only: bool = True, cast_frozen: bool = True) -> dict:
    """Run one stage end to end; returns a summary (also written to summary.json).
    `supervised_logits_only` and `cast_frozen` (bf16: frozen linear weights cast once,
    mllm.frozen_cast) are on in every real run; bench/train.py turns them off to show
    what each is worth."""
    stage = int(stage or cfg.run.stage)
    output_dir = output_dir or cfg.run.output_dir
    d = distributed.setup(device)
    try:
        return _train(cfg, manifest_path, output_dir, stage, resume, progress, d,
                      supervised_logits_only, cast_frozen)
    finally:
        distributed.teardown()


def _train(cfg, manifest_path, output_dir, stage, resume, progress, d: distributed.Dist,
           supervised_logits_only: bool, cast_frozen: bool = True) -> dict:
    t_start = time.perf_counter()
    out = stage_dir(output_dir, stage)
    ck = checkpoint.latest(out)
    if ck is not None and not resume:
        raise InputError("already holds checkpoints: pass --resume to continue that run, or "
                         "choose another output folder", path=out)
    setup = prepare(cfg, manifest_path, output_dir, stage, d.world_size, progress=progress and d.is_main)
    row_counts = check_rejects(setup, d.is_main)  # data.strict stops here, before step 1
    s, model, vlm = setup.scfg, setup.model, setup.vlm
    model.to(d.device)
    if s.gradient_checkpointing:
        lm = vlm.language_model
        kwargs = {"use_reentrant": False}  # the input embeddings need no requires_grad hack
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    optimizer = optimizer_for(setup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_for(s, setup.total_steps))
    resolved = cfg.to_dict()
    sampler_state = {**setup.sampler.state_dict(), "table_sha256": setup.table_sha256}

    metrics_path = os.path.join(out, "metrics.jsonl")
    start_step = 0
    if d.is_main:
        os.makedirs(out, exist_ok=True)
        if not os.path.isdir(os.path.join(out, "tokenizer")):
            setup.tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
        with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(f"# warren train --manifest {manifest_path} --config <this file> --stage {stage}\n")
            yaml.safe_dump(resolved, f, sort_keys=False)
    if resume and ck is not None:
        state = checkpoint.load(ck, model, optimizer, scheduler, rank=d.rank)
        ck = state["loaded_from"]          # an older one when the newest was damaged
        if state["sampler"] != sampler_state:
            raise InputError("the data or batch settings changed since this checkpoint "
                             f"({state['sampler']} vs {sampler_state}); start a new run", path=ck)
        start_step = state["step"]
        log.info("resuming stage %d from %s (step %d)", stage, ck, start_step)
    if d.is_main:
        _truncate_metrics(metrics_path, start_step)
    if start_step == 0 and d.is_main and os.path.exists(metrics_path):
        os.remove(metrics_path)

    ddp_model = model
    if d.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            # Text-only batches leave the projector without a gradient.
            find_unused_parameters=bool((~setup.dataset.has_image).any()))

    loader = torch.utils.data.DataLoader(
        setup.dataset, collate_fn=setup.collator, num_workers=cfg.data.num_workers,
        batch_sampler=RankBatches(setup.sampler, s.micro_batch_size, d.world_size, d.rank,
                                  start_step, setup.total_steps),
        pin_memory=d.device.type == "cuda",
        # A private generator: creating the iterator must not advance the global RNG,
        # or a resumed run would see different dropout masks.
        generator=torch.Generator())
    batches = iter(loader)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    # Frozen weights: one bf16 copy per run instead of one per forward (bit-identical;
    # the float32 originals wait on the CPU for the export).
    restore_frozen = (frozen_cast.cast(model) if s.precision == "bf16" and cast_frozen
                      else (lambda: None))
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = None
    if progress and d.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=setup.total_steps, initial=start_step, desc=f"stage {stage}", unit="step")

    metrics_file = open(metrics_path, "a", encoding="utf-8") if d.is_main else None
    losses, rates = [], []
    last_saved = start_step
    try:
        for step in range(start_step, setup.total_steps):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(setup.accum)]
            counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
                                   sum(int(b["attention_mask"].sum()) for b in micro)],
                                  dtype=torch.float64, device=d.device)
            n_tokens, n_seen = d.all_reduce_sum(counts).tolist()
            loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
            for k, batch in enumerate(micro):
                batch = {key: v.to(d.device, non_blocking=True) for key, v in batch.items()}
                sync = (not d.enabled) or k == len(micro) - 1
                ctx = contextlib.nullcontext() if sync else ddp_model.no_sync()
                with ctx:
                    with autocast:
                        outputs = ddp_model(**batch, supervised_logits_only=supervised_logits_only)
                    # Sum over tokens / tokens in the whole global step; x world because
                    # DDP averages gradients over processes.
                    (outputs.loss_sum * (d.world_size / max(n_tokens, 1.0))).backward()
                loss_sum += outputs.loss_sum.detach().double()
            grad_norm = None
            if s.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, s.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(d.all_reduce_sum(loss_sum)) / max(n_tokens, 1.0)
            dt = time.perf_counter() - t0
            losses.append(loss)
            rates.append(n_seen / dt)
            done = step + 1
            if d.is_main and (done % s.log_every == 0 or done == setup.total_steps):
                metrics_file.write(json.dumps({
                    "step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": int(n_seen), "supervised_tokens": int(n_tokens),
                    "tokens_per_s": n_seen / dt, "step_s": dt, "time": time.time(),
                    "cpu_time": time.process_time(),
                    "epoch": step / setup.sampler.steps_per_epoch}) + "\n")
                metrics_file.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if done % s.save_every == 0 or done == setup.total_steps:
                checkpoint.save(out, done, model, optimizer, scheduler, sampler_state, resolved,
                                rank=d.rank, world_size=d.world_size, keep_last=s.keep_last,
                                barrier=d.barrier)
                last_saved = done
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if bar is not None:
            bar.close()

    restore_frozen()
    summary = {"stage": stage, "steps": setup.total_steps, "resumed_from": start_step or None,
               "last_checkpoint": last_saved, "output_dir": out,
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "tokens_per_s": (sum(rates[1:]) / len(rates[1:])) if len(rates) > 1 else
               (rates[0] if rates else None),
               "peak_memory_mb": _peak_memory_mb(d.device), "world_size": d.world_size,
               "samples": len(setup.dataset), "accum": setup.accum, **row_counts}
    if d.is_main:
        final = os.path.join(out, "final")
        final_model = lora.merge(model) if setup.lora else vlm
        export.save(final_model, setup.tokenizer, cfg, s.template, final, cfg.data.image_aspect,
                    model_cfg=setup.model_cfg)
        summary["final"] = final
        summary["metrics"] = metrics_path
        summary["plot"] = plot_loss(metrics_path, os.path.join(out, "loss.png"))
        summary["seconds"] = time.perf_counter() - t_start
        summary["code_version"] = manifest_mod.code_version()
        _finish_export(cfg, setup, manifest_path, summary, final_model)
        with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    d.barrier()
    return summary


def _finish_export(cfg: Config, setup: Setup, manifest_path: str, summary: dict, final_model) -> None:
    """The model card of `final/` (lineage: base models, recipe, data, metrics; a stage-2
    card carries stage 1's too) and, after stage 2, `hf/`: the same model as a
    transformers Llava folder (mllm.llava_hf), or the one-line reason it cannot be."""
    from mllm import lineage, llava_hf
    stage, final = setup.stage, summary["final"]
    init_from = _init_from(cfg, stage, os.path.dirname(setup.out))
    before = lineage.read(init_from) if init_from else {}
    data = lineage.data_section(manifest_path, setup.scfg.table, stage)
    if "input_rows" in summary:  # rows checked before step 1, and those set aside
        data[f"stage{stage}"]["trainer"] = {k: summary.get(k) for k in
                                            ("input_rows", "trained_rows", "rejected_rows", "rejects")}
    base = before.get("base") or lineage.base_section(setup.model_cfg, cfg.data.tokenizer, len(setup.tokenizer))
    lineage.update(final, **{k: v for k, v in before.items() if k not in ("export", "eval")})
    lineage.update(final, name=before.get("name") or f"Warren VLM ({os.path.basename(os.path.dirname(setup.out))})",
                   base=base, recipe=lineage.recipe_section(cfg, stage, init_from), data=data,
                   training=lineage.training_section(summary))
    if stage != 2:
        return
    hf = os.path.join(setup.out, "hf")
    try:
        llava_hf.save(final_model, setup.tokenizer, get_template(setup.scfg.template), hf,
                      cfg.data.image_aspect, setup.model_cfg, lineage_doc=lineage.read(final), source=final)
        summary["hf"] = hf
    except llava_hf.NotExportable as e:
        log.warning("no %s folder: %s", hf, e)
        summary["hf_skipped"] = str(e)


def completed(output_dir: str, stage: int) -> dict | None:
    """The summary of a finished stage (its export and summary.json exist), else None."""
    out = stage_dir(output_dir, stage)
    path = os.path.join(out, "summary.json")
    if os.path.exists(path) and os.path.exists(os.path.join(out, "final", export.META)):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None


def run_stages(cfg: Config, manifest_path: str, output_dir: str, stages=(1, 2),
               progress: bool = True) -> dict[int, dict]:
    """Stage 1 then stage 2 (stage 2 starts from stage 1's final model)."""
    return {n: train(cfg, manifest_path, output_dir, stage=n, progress=progress) for n in stages}


def main(argv: list[str] | None = None) -> int:
    """`python -m mllm.train` (what torchrun launches): same flags as `warren train`."""
    import argparse
    import sys

    from pipelines.errors import WarrenError
    from mllm import config as config_mod
    from mllm.cli_args import add_train_arguments
    parser = argparse.ArgumentParser(prog="python -m mllm.train")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_mod.load(args.config, dict(config_mod.parse_override(o) for o in args.set))
        summary = train(cfg, args.manifest, args.output, args.stage, args.resume,
                        progress=not args.no_progress, device=args.device)
    except WarrenError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
