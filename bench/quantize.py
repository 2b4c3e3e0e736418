"""Quantised inference report: weight memory, peak memory, tokens/s and agreement of
greedy outputs with full precision, for VLMs of TinyGPT-V's architecture (EVA tower,
BLIP-2 Q-Former connector, LM with TinyGPT-V's norms).

    python bench/quantize.py                           # tiny and small models, CPU rows
    python bench/quantize.py --models small --tokens 32 --prompts 4
    python bench/quantize.py --models phi2             # TinyGPT-V-sized random init (GPU rows)

`phi2` is TinyGPT-V's size: EVA ViT-g (1.0B, 224 px), BLIP-2's Q-Former (BERT-base, 32
queries), 768 -> 4096 -> 2560 and Phi-2 (2.7B), random weights, exported in bfloat16.
Without CUDA the command runs the CPU rows it can and prints which rows need a GPU.

Each model is built with random weights (seeded), exported once with mllm.export, and
every row loads that export in a fresh child process through mllm.quantize.load, so
the peak-memory figure is that row's alone:

  CPU rows   fp32 (reference), int8-dynamic (the default engine: torch.ao
             quantize_dynamic) and int8-dynamic-warren (Warren's Int8DynamicLinear,
             int32 accumulation via torch._int_mm)
  GPU rows   bf16 (reference for the GPU rows' agreement too), 8bit and 4bit
             (bitsandbytes through transformers' BitsAndBytesConfig), when CUDA is
             available; 8bit/4bit are reported as skipped without bitsandbytes

Columns:
  weights MB   bytes of every parameter/buffer of the whole VLM (int8 packed weights
               included); LM MB is the language model alone
  peak MB      CPU: the child's peak RSS from loading to the end of decoding, imports
               excluded (Linux: the high-water mark is reset after imports through
               /proc/self/clear_refs); it includes the float32 weights a quantised
               row loads before converting them. GPU: torch.cuda.max_memory_allocated
  end MB       CPU: RSS after decoding minus RSS after imports (what the loaded model
               keeps); GPU: torch.cuda.memory_allocated
  tok/s        greedy tokens per second over all prompts (exactly --tokens new tokens
               each; a first prompt is run once beforehand as a warm-up)
  seq match    fraction of prompts whose greedy continuation equals the reference's
  prefix       mean fraction of the reference continuation reproduced before the
               first differing token
  TF top-1     teacher-forced: feeding the reference continuation, the fraction of
               positions where this row's top-1 token is the reference's token (free
               of the cascade after a first divergence)

Random weights make greedy decoding fragile (near-uniform logits), so agreement here
is a lower bound of what a trained model shows; compare rows with each other.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TEXTS = ["What color is the shape?", "Describe the image briefly.", "Where is the red square?",
         "a red square", "a blue circle", "a green square on a white background",
         "give me the location of the yellow circle", "what object is in this location"]


def model_config(name: str):
    """The VLM of each size, all of TinyGPT-V's architecture."""
    from mllm import presets
    from mllm.config import LMConfig, QFormerConfig, VisionConfig
    base = dataclasses.replace(presets.MODELS["tiny"], projector="qformer", transforms=["tinygptv_norms"])
    if name == "tiny":
        return dataclasses.replace(
            base, vision=VisionConfig(arch="eva", hidden_size=32, intermediate_size=64, num_layers=2,
                                      num_heads=2, image_size=28, patch_size=14, select_layer=-1),
            qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                  proj_hidden_size=64, num_query_tokens=32))
    if name == "small":
        return dataclasses.replace(
            base, vision=VisionConfig(arch="eva", hidden_size=256, intermediate_size=1024, num_layers=4,
                                      num_heads=4, image_size=56, patch_size=14, select_layer=-1),
            lm=LMConfig(arch="phi", hidden_size=1024, intermediate_size=4096, num_layers=8,
                        num_heads=16, vocab_size=8192, max_position_embeddings=1024),
            qformer=QFormerConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                                  proj_hidden_size=1024, num_query_tokens=32))
    if name == "phi2":
        return dataclasses.replace(
            base, vision=VisionConfig(arch="eva", hidden_size=1408, intermediate_size=6144, num_layers=39,
                                      num_heads=16, image_size=224, patch_size=14, select_layer=-1),
            lm=dataclasses.replace(presets.PHI2, name_or_path=None), qformer=QFormerConfig(),
            dtype="bfloat16")
    raise SystemExit(f"unknown model {name!r} (tiny, small, phi2)")


def export_model(name: str, folder: str, seed: int = 0) -> str:
    import torch

    from mllm import export, presets, tokenizer
    from mllm.model import build_vlm
    tok = tokenizer.build_local(TEXTS * 4, vocab_size=300)
    cfg = model_config(name)
    torch.manual_seed(seed)
    vlm = build_vlm(cfg, tok.convert_tokens_to_ids(tokenizer.IMAGE_TOKEN), len(tok))
    return export.save(vlm, tok, presets.tiny(), "tinygptv", folder, model_cfg=cfg)


def images(n: int, size: int):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ----------------------------------------------------------------------- child

def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """Reset the RSS high-water mark (Linux) and return the baseline to subtract, MB:
    the RSS now after a reset, else the lifetime peak so far (ru_maxrss)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        rss = _status_kb("VmRSS")
        return rss / 1024 if rss is not None else _maxrss_mb()
    except OSError:
        return _maxrss_mb()


def peak_rss() -> float:
    hwm = _status_kb("VmHWM")
    return hwm / 1024 if hwm is not None else _maxrss_mb()


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    import torch

    from mllm import generate, quantize, registry
    torch.set_num_threads(args.threads)
    # import now what loading would import lazily, so the baseline excludes code
    registry.load_builtins()
    import transformers.models.blip_2.modeling_blip_2  # noqa: F401
    import transformers.models.phi.modeling_phi  # noqa: F401
    base_rss = reset_peak_rss()
    mode, engine = args.mode, "auto"
    if mode == "int8-dynamic-warren":
        mode, engine = "int8-dynamic", "warren"
    dtype = "bfloat16" if args.device.startswith("cuda") else None  # GPU rows: bf16 compute
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    loaded = quantize.load(args.folder, mode, dtype=dtype, device=args.device, engine=engine)
    vlm, tok = loaded.model, loaded.tokenizer
    device = torch.device(args.device)
    prompts = []
    for k, img in enumerate(images(args.prompts, loaded.processor.size)):
        ids = generate.prompt_ids(loaded, f"[vqa] {TEXTS[k % len(TEXTS)]}", True)
        prompts.append((torch.tensor([ids], device=device),
                        loaded.processor(img).unsqueeze(0).to(device)))

    @torch.no_grad()
    def greedy(ids, pixels, n):
        embeds = vlm.embed(ids, pixels)
        out = vlm.language_model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=n,
            min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id)
        return out[0, -n:].tolist()

    greedy(*prompts[0], 2)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    outputs = [greedy(ids, px, args.tokens) for ids, px in prompts]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t

    tf = None
    if args.reference:
        with open(args.reference, encoding="utf-8") as f:
            ref = json.load(f)["outputs"]
        hits = total = 0
        with torch.no_grad():
            for (ids, px), want in zip(prompts, ref):
                lm = vlm.language_model
                cont = torch.tensor([want], device=device)
                embeds = torch.cat([vlm.embed(ids, px), lm.get_input_embeddings()(cont)], dim=1)
                logits = lm(inputs_embeds=embeds).logits[0]
                pred = logits[ids.shape[1] - 1:-1].argmax(-1).tolist()
                hits += sum(int(a == b) for a, b in zip(pred, want))
                total += len(want)
        tf = hits / total
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else peak_rss() - base_rss)
    rss = _status_kb("VmRSS")
    end = (torch.cuda.memory_allocated() / 2**20 if device.type == "cuda"
           else (rss / 1024 - base_rss if rss is not None else float("nan")))
    result = {"mode": args.mode, "device": args.device,
              "weights_mb": quantize.weight_bytes(vlm) / 2**20,
              "lm_mb": quantize.weight_bytes(vlm.language_model) / 2**20,
              "peak_mb": peak, "end_mb": end, "tokens_per_s": args.tokens * len(prompts) / seconds,
              "outputs": outputs, "teacher_forced_top1": tf}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------- parent

def run_row(folder: str, mode: str, device: str, args, reference: str | None, work: str) -> dict:
    out = os.path.join(work, f"{mode}-{device}.json".replace(":", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--folder", folder, "--mode", mode,
           "--device", device, "--tokens", str(args.tokens), "--prompts", str(args.prompts),
           "--threads", str(args.threads), "--out", out]
    if reference:
        cmd += ["--reference", reference]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"mode": mode, "device": device, "skipped": last}
    with open(out, encoding="utf-8") as f:
        row = json.load(f)
    row["path"] = out
    return row


def agreement(row: dict, ref: dict) -> None:
    pairs = list(zip(row["outputs"], ref["outputs"]))
    row["seq_match"] = sum(a == b for a, b in pairs) / len(pairs)
    prefix = []
    for a, b in pairs:
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        prefix.append(n / len(b))
    row["prefix"] = sum(prefix) / len(prefix)


def table(rows: list[dict]) -> str:
    head = ("| model | device | mode | weights MB | LM MB | peak MB | end MB | tok/s | seq match | prefix "
            "| TF top-1 |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['device']} | {r['mode']} | skipped: {r['skipped']} |"
                         " | | | | | | |")
            continue
        tf = "-" if r.get("teacher_forced_top1") is None else f"{r['teacher_forced_top1']:.3f}"
        lines.append(f"| {r['model']} | {r['device']} | {r['mode']} | {r['weights_mb']:.1f} | "
                     f"{r['lm_mb']:.1f} | {r['peak_mb']:.0f} | {r['end_mb']:.0f} | {r['tokens_per_s']:.1f} | "
                     f"{r.get('seq_match', 1.0):.2f} | {r.get('prefix', 1.0):.3f} | {tf} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,small", help="comma list of tiny, small, phi2")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per prompt")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per row")
    p.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU rows (default: on, except for phi2 when a GPU is there)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import torch
    cuda = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            t = time.perf_counter()
            folder = export_model(name, os.path.join(work, name))
            print(f"{name}: exported in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            plans = []
            if args.cpu if args.cpu is not None else (name != "phi2" or not cuda):
                plans.append(("cpu", ["none", "int8-dynamic", "int8-dynamic-warren"]))
            if cuda:
                plans.append(("cuda", ["none", "8bit", "4bit"]))
            else:
                print(f"  {name}: rows bf16, 8bit, 4bit need a CUDA GPU (none here); run this command "
                      "on a GPU machine for them", file=sys.stderr)
                rows += [{"model": name, "device": "cuda", "mode": m, "skipped": "needs a CUDA GPU"}
                         for m in ("bf16", "8bit", "4bit")]
            for device, modes in plans:
                ref = None
                for mode in modes:
                    row = run_row(folder, mode, device, args, ref["path"] if ref else None, work)
                    row["model"] = name
                    if mode == "none" and device == "cuda":
                        row["mode"] = "bf16"
                    elif mode == "none":
                        row["mode"] = "fp32"
                    if ref is None and "skipped" not in row:
                        ref = row
                    elif "skipped" not in row:
                        agreement(row, ref)
                    rows.append(row)
                    print(f"  {name} {device} {row['mode']}: "
                          f"{row.get('skipped') or round(row['tokens_per_s'], 1)}", file=sys.stderr)
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{k: v for k, v in r.items() if k not in ("outputs", "path")} for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
