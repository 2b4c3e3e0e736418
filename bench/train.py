"""Stage-2 training throughput: Warren's trainer against HF `Trainer` + peft, on the
identical model, data, batches and optimizer, in one run, reported three ways:

  (a) warren / hf          Warren as shipped against HF Trainer as shipped      target >= 1.5x
  (b) warren / hf-sup      HF Trainer given Warren's supervised-positions-only
                           head: what is left is the loop                       target >= 1.05x
  (c) warren-full / hf     Warren with the full output head (the loop alone,
                           seen from the other side)

    python bench/train.py                                   # CPU, a small Phi/SigLIP model
    python bench/train.py --threads 1 --clock cpu --repeat 2   # on a busy shared machine
    python bench/train.py --device cuda --preset phi2-siglip-random --micro-batch 8 --steps 20

Contenders, each in its own child process (so peak memory is its own: ru_maxrss on
CPU, torch.cuda.max_memory_allocated on CUDA):
  warren         mllm.train.train (stage 2): what `warren train` runs
  warren-full    the same, with the output head over every position
  warren-nocast  the same as warren, but frozen weights cast by autocast in every
                 forward (what the once-per-run cast of mllm.frozen_cast is worth)
  hf             transformers.Trainer on the same peft-wrapped VLM: same DataLoader batches
                 (Warren's sampler), same AdamW param groups and cosine schedule, same
                 precision; its default loss path (logits at every position)
  hf-sup         the same Trainer, its compute_loss asking the model for the
                 supervised-positions-only head
All start from the same stage-1 export (built once here, random weights). With
`--repeat N` the contenders run in N interleaved rounds and each reports its fastest
round: on a shared machine other work only ever slows a run down. tokens/s = non-pad
tokens (image tokens included) of the timed steps / time between the end of the first
`--warmup` steps and the end of the last step: wall time (`--clock wall`, the default),
or the process's CPU time (`--clock cpu`, CPU only: with `--threads 1` it is what the
work costs, whatever else the machine runs). MFU (CUDA only) counts 2N forward +
2N input-gradient FLOPs per token for the LM (frozen weights get no weight gradient) and
2N per patch for the vision tower's forward, divided by --peak-tflops (H100/H200 dense
bf16: 989).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A small model with Phi-2's vocabulary (the output head's share of the work is real).
SMALL = {
    "vision": {"arch": "siglip", "hidden_size": 192, "intermediate_size": 768, "num_layers": 4,
               "num_heads": 3, "image_size": 96, "patch_size": 12},
    "lm": {"arch": "phi", "hidden_size": 512, "intermediate_size": 2048, "num_layers": 4,
           "num_heads": 8, "vocab_size": 51200, "max_position_embeddings": 2048},
}
WORDS = ("the a shape image color red green blue small large left right top bottom of in on with "
         "and is are there picture shows object background bright dark near far round square "
         "line edge center corner light shadow texture pattern").split()


def make_data(root: str, n: int, answer_words: int, seed: int = 0) -> str:
    """A LLaVA-like mix: one image + question + a long answer, some multi-turn, 10% text-only."""
    import io

    import pyarrow as pa
    from PIL import Image

    from pipelines import manifest, schemas, storage
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    uids, jpgs, rows = [], [], []
    for k in range(n):
        text = lambda m: " ".join(rng.choice(WORDS) for _ in range(m))  # noqa: E731
        has_image = k % 10 != 9
        conv = [{"from": "human", "value": ("<image>\n" if has_image else "") + text(12) + "?"},
                {"from": "gpt", "value": text(answer_words) + "."}]
        if k % 3 == 0:
            conv += [{"from": "human", "value": text(8) + "?"},
                     {"from": "gpt", "value": text(answer_words // 2) + "."}]
        uid = f"u{k:06d}"
        rows.append({"id": uid, "source": "bench", "image": uid if has_image else None,
                     "conversations": conv, "n_turns": len(conv), "has_image": has_image})
        if has_image:
            img = Image.new("RGB", (120, 100), tuple(rng.randrange(256) for _ in range(3)))
            buf = io.BytesIO()
            img.save(buf, format="JPEG")
            uids.append(uid)
            jpgs.append(buf.getvalue())
    storage.write_table(pa.Table.from_pylist(rows, schema=schemas.MIX), f"{root}/mix.parquet", schemas.MIX)
    storage.write_table(pa.table({"uid": uids, "jpg": jpgs, "width": [120] * len(uids),
                                  "height": [100] * len(uids)}), f"{root}/images.parquet", schemas.IMAGES)
    # stage 1 reads the same rows (its 'plain' template keeps image + answer)
    manifest.write(f"{root}/manifest.json", {"mix": f"{root}/mix.parquet", "stage1": f"{root}/mix.parquet"},
                   images={"mix": {"kind": "parquet", "path": "images.parquet"},
                           "stage1": {"kind": "parquet", "path": "images.parquet"}})
    return f"{root}/manifest.json"


def overrides(args) -> dict:
    from mllm import presets
    o = {"data.tokenizer": "local", "data.tokenizer_vocab_size": 2000, "data.max_length": args.max_length,
         "data.num_workers": args.workers, "data.megabatch": 4,
         "lora.r": args.lora_r, "lora.alpha": 2 * args.lora_r, "lora.dropout": 0.05,
         "stage2.max_steps": args.steps, "stage2.micro_batch_size": args.micro_batch,
         "stage2.global_batch_size": args.micro_batch * args.accum, "stage2.lr": 2e-4,
         "stage2.projector_lr": 2e-5, "stage2.warmup_ratio": 0.03, "stage2.precision": args.precision,
         "stage2.gradient_checkpointing": args.gradient_checkpointing, "stage2.save_every": 10**6,
         "stage1.max_steps": 1, "stage1.micro_batch_size": 1, "stage1.global_batch_size": 1,
         "stage1.precision": "fp32", "run.seed": 0, "model.dtype": args.dtype}
    if args.preset == "small":
        o["model.vision"], o["model.lm"] = SMALL["vision"], SMALL["lm"]
    else:
        import dataclasses
        m = presets.model_config(args.preset)
        o["model.vision"] = dataclasses.asdict(m.vision)
        o["model.lm"] = dataclasses.asdict(m.lm)
    return o


def model_flops_per_step(setup, tokens: int, images: int) -> float:
    """Forward + input-gradient matmul FLOPs (2N + 2N per token) of the LM and the
    vision forward (2N per patch); LoRA and attention-score FLOPs are left out."""
    vlm = setup.vlm
    n_lm = sum(p.numel() for n, p in vlm.language_model.named_parameters()
               if "embed_tokens" not in n and "lora_" not in n)
    n_vis = sum(p.numel() for p in vlm.vision.parameters())
    return 4 * n_lm * tokens + 2 * n_vis * images * vlm.vision.num_patches


def peak_mb(device) -> float:
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_tokens(setup, steps: int) -> tuple[list[int], list[int]]:
    """Non-pad tokens and images of every step (the same for both contenders)."""
    from mllm.sampler import RankBatches
    toks, imgs = [], []
    for step in range(steps):
        batches = list(RankBatches(setup.sampler, setup.scfg.micro_batch_size, 1, 0, step, step + 1))
        samples = [setup.dataset.encode(i)[0] for b in batches for i in b]
        toks.append(sum(len(s) for s in samples))
        imgs.append(sum(int(setup.dataset.has_image[i]) for b in batches for i in b))
    return toks, imgs


def worker(args) -> dict:
    import torch

    from mllm import presets, train
    from mllm.sampler import RankBatches
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = presets.tiny(overrides(args))
    run = os.path.join(args.workdir, args.worker)
    shutil.rmtree(os.path.join(run, "stage2"), ignore_errors=True)  # an earlier round's
    os.makedirs(run, exist_ok=True)
    if not os.path.exists(os.path.join(run, "stage1")):
        os.symlink(os.path.join(args.workdir, "base", "stage1"), os.path.join(run, "stage1"))
    setup = train.prepare(cfg, args.manifest, run, stage=2)
    toks, imgs = step_tokens(setup, args.steps)
    if args.worker.startswith("warren"):
        del setup
        gc.collect()  # the throwaway model must not count towards this contender's peak
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train.train(cfg, args.manifest, run, stage=2, progress=False, device=args.device,
                    supervised_logits_only=args.worker != "warren-full",
                    cast_frozen=args.worker != "warren-nocast")
        key = "cpu_time" if args.clock == "cpu" else "time"
        with open(os.path.join(run, "stage2", "metrics.jsonl")) as f:
            ends = [json.loads(line)[key] for line in f]
    else:
        ends = run_hf(args, cfg, setup, run)
    w = args.warmup
    seconds = ends[-1] - ends[w - 1]
    tokens = sum(toks[w:])
    result = {"contender": args.worker, "steps_timed": args.steps - w, "seconds": seconds,
              "tokens_per_s": tokens / seconds, "peak_memory_mb": peak_mb(args.device),
              "tokens_per_step": tokens / (args.steps - w)}
    if args.device == "cuda":
        setup2 = setup if args.worker.startswith("hf") else train.prepare(cfg, args.manifest, run, stage=2)
        flops = sum(model_flops_per_step(setup2, t, i) for t, i in zip(toks[w:], imgs[w:]))
        result["mfu"] = flops / seconds / (args.peak_tflops * 1e12)
    return result


def run_hf(args, cfg, setup, run) -> list[float]:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from mllm.sampler import RankBatches
    from mllm.train import cosine_with_warmup, optimizer_for, warmup_steps
    device = torch.device(args.device)
    setup.model.to(device)
    if setup.scfg.gradient_checkpointing:
        setup.vlm.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = optimizer_for(setup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(args.steps, warmup_steps(args.steps, setup.scfg.warmup_ratio)))
    loader = torch.utils.data.DataLoader(
        setup.dataset, collate_fn=setup.collator, num_workers=args.workers,
        batch_sampler=RankBatches(setup.sampler, setup.scfg.micro_batch_size, 1, 0, 0, args.steps))

    supervised_only = args.worker == "hf-sup"

    class SameBatches(Trainer):
        def get_train_dataloader(self):
            return loader

        def compute_loss(self, model, inputs, *a, **k):
            # (b): HF's loop as shipped, the model asked for the same head Warren uses.
            if supervised_only:
                inputs = {**inputs, "supervised_logits_only": True}
            return super().compute_loss(model, inputs, *a, **k)

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            ends.append(time.process_time() if args.clock == "cpu" else time.time())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    targs = TrainingArguments(
        output_dir=os.path.join(run, "hf"), per_device_train_batch_size=setup.scfg.micro_batch_size,
        gradient_accumulation_steps=setup.accum, max_steps=args.steps, learning_rate=setup.scfg.lr,
        max_grad_norm=setup.scfg.max_grad_norm, bf16=setup.scfg.precision == "bf16",
        use_cpu=device.type == "cpu", logging_steps=10**6, save_strategy="no", report_to=[],
        disable_tqdm=True, remove_unused_columns=False, seed=0, dataloader_num_workers=args.workers)
    trainer = SameBatches(model=setup.model, args=targs, train_dataset=setup.dataset,
                          data_collator=setup.collator, optimizers=(optimizer, scheduler),
                          callbacks=[Clock()])
    trainer.train()
    return ends


RATIOS = [("(a)", "warren", "hf", "Warren as shipped / HF Trainer as shipped", 1.5),
          ("(b)", "warren", "hf-sup", "Warren / HF Trainer with the same head (the loop)", 1.05),
          ("(c)", "warren-full", "hf", "Warren with the full head / HF Trainer as shipped", None),
          ("", "warren", "warren-nocast", "the frozen-weight cast, alone", None)]


def table(results: dict) -> str:
    """The (a)(b)(c) ratios of tokens/s (and peak memory) as a Markdown table."""
    lines = ["| | contenders | tokens/s | ratio | peak memory | target |", "|---|---|---|---|---|---|"]
    for tag, num, den, what, target in RATIOS:
        if num not in results or den not in results:
            continue
        a, b = results[num], results[den]
        ratio = a["tokens_per_s"] / b["tokens_per_s"]
        mem = a["peak_memory_mb"] / b["peak_memory_mb"]
        goal = "" if target is None else f">= {target}x: {'met' if ratio >= target else 'NOT met'}"
        lines.append(f"| {tag} {what} | {num} / {den} | {a['tokens_per_s']:.0f} / {b['tokens_per_s']:.0f} "
                     f"| {ratio:.2f}x | {mem:.2f}x | {goal} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="small", help="small (default), phi2-siglip-random, tiny")
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--answer-words", type=int, default=60)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="storage dtype of the frozen weights")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--contenders", default="warren,hf,hf-sup,warren-full,warren-nocast")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="time the steps by wall clock or by the process's CPU time (CPU runs)")
    p.add_argument("--repeat", type=int, default=1,
                   help="interleaved rounds; each contender reports its fastest")
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu times CPU work; on a GPU use the wall clock")
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    workdir = args.workdir or tempfile.mkdtemp(prefix="warren-bench-train-")
    t0 = time.perf_counter()
    manifest_path = make_data(os.path.join(workdir, "data"), args.samples, args.answer_words)
    # The shared starting point: a stage-1 export with random weights (1 tiny step).
    from mllm import presets, train
    shutil.rmtree(os.path.join(workdir, "base"), ignore_errors=True)  # a reused --workdir
    train.train(presets.tiny(overrides(args)), manifest_path, os.path.join(workdir, "base"), stage=1,
                progress=False, device=args.device)
    print(f"data + base model: {time.perf_counter() - t0:.0f} s in {workdir}", file=sys.stderr)
    results = {}
    passthrough, skip = [], False
    for a in sys.argv[1:]:  # the same flags, minus --workdir (given explicitly below)
        if skip or a.startswith("--workdir"):
            skip = a == "--workdir"
            continue
        passthrough.append(a)
    for _ in range(args.repeat):
        for name in args.contenders.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--workdir", workdir,
                   "--worker", name, "--manifest", manifest_path]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:12s} {r['tokens_per_s']:9.0f} tokens/s  peak {r['peak_memory_mb']:7.0f} MiB"
                  + (f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""), file=sys.stderr)
            if name not in results or r["tokens_per_s"] > results[name]["tokens_per_s"]:
                results[name] = r
    print(table(results))
    print(json.dumps({"config": {k: v for k, v in vars(args).items() if k not in ("worker", "manifest")},
                      "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
