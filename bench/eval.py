"""Questions/s of `warren eval` against a plain per-question HF `generate` loop, same
model, same questions, same run; and the peak memory of each.

    python bench/eval.py                                  # tiny random model, CPU
    python bench/eval.py --device cuda --preset phi2-siglip-random --dtype bfloat16 \\
        --questions 512 --batch-size 32                   # Phi-2-sized, on a GPU

Arms, each in its own process (so each one's peak memory is its own):
- eval: `mllm.eval.run.evaluate` (what `warren eval` runs): batches of `--batch-size`
  left-padded prompts, greedy with a KV cache, images decoded in `--workers` DataLoader
  processes, answers appended to answers.jsonl per batch;
- loop: for each question, `mllm.generate.answer` (HF `generate`, batch 1, the image
  decoded in the same process): what a first eval script does.
Both answer every question greedily with the same budget, so their answers agree: in
float32 all of them (the bench fails otherwise); in bfloat16/float16 the batched and the
one-question kernels round differently and a near-tie may go the other way (it prints
how many agree). The model has random weights (a random
model rarely emits its end token: nearly every answer runs to --max-new-tokens, the
same work for both arms). Target: eval >= 3x the loop's questions/s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

NAME = "bench-shapes"
PROMPTS = ["What color is the largest shape?\nAnswer the question using a single word or phrase.",
           "Is there a circle in the image?\nAnswer the question using a single word or phrase.",
           "How many shapes are there?\nAnswer the question using a single word or phrase."]


class BenchShapes:
    """Questions about procedural images; scored by exact match (the score is not the
    point here, the throughput is)."""

    name = NAME
    headline = "accuracy"

    def questions(self, data_dir):
        from mllm.eval.types import Question
        with open(os.path.join(data_dir, "questions.jsonl"), encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                yield Question(r["question_id"], r["text"], r["image"], {"answer": r["answer"]},
                               r["max_new_tokens"])

    def per_question(self, data_dir, answers):
        return {a["question_id"]: float(a["text"].lower() == a["metadata"]["answer"]) for a in answers}

    def score(self, data_dir, answers):
        c = self.per_question(data_dir, answers)
        return {"accuracy": 100.0 * sum(c.values()) / len(answers)}


def write_questions(root: str, n: int, max_new_tokens: int, size: int, seed: int = 0) -> str:
    import numpy as np

    from pipelines.synth import demo_pool
    d = os.path.join(root, NAME)
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(os.path.join(d, "questions.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n):
            scene = demo_pool._scene(rng)
            name = f"images/{i:05d}.jpg"
            demo_pool.draw(scene, size).save(os.path.join(d, name), quality=90)
            kind = i % 3
            answer = (scene["shapes"][0]["color"] if kind == 0 else
                      "yes" if any(s["shape"] == "circle" for s in scene["shapes"]) else "no"
                      if kind == 1 else str(len(scene["shapes"])))
            f.write(json.dumps({"question_id": i, "image": name, "text": PROMPTS[kind],
                                "answer": answer, "max_new_tokens": max_new_tokens}) + "\n")
    return root


def write_model(folder: str, preset: str, device: str, dtype: str) -> str:
    """The preset with random weights and a tokenizer built here, exported."""
    import dataclasses

    import torch

    from mllm import export, presets
    from mllm import tokenizer as tok_mod
    from mllm.config import Config
    from mllm.model import build_vlm
    from mllm.templates import BUNNY_SYSTEM
    texts = [BUNNY_SYSTEM, "USER: ASSISTANT:"] * 8 + PROMPTS * 8 + \
        ["a red circle", "a blue square", "yes", "no", "two", "three"] * 8
    tok = tok_mod.build_local(texts, vocab_size=400)
    mcfg = dataclasses.replace(presets.model_config(preset), dtype=dtype)
    torch.manual_seed(0)
    # build where it will run: a 2.7B random init is minutes on a CPU, seconds on a GPU
    with torch.device("cuda" if device.startswith("cuda") else "cpu"):
        vlm = build_vlm(mcfg, tok.convert_tokens_to_ids(tok_mod.IMAGE_TOKEN), len(tok))
    export.save(vlm, tok, Config(model=mcfg), "bunny", folder, model_cfg=mcfg)
    return folder


def _peaks(device: str) -> dict:
    import torch
    # The arm's own process. (Its children are no measure here: importing torch starts a
    # ~430 MB helper process in either arm, and forked DataLoader workers share their
    # pages with the parent.)
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def arm(args) -> dict:
    """One arm in this process; prints its JSON result."""
    import torch

    from mllm.eval import engine
    from mllm.eval.types import REGISTRY
    if args.threads:
        torch.set_num_threads(args.threads)
    REGISTRY[NAME] = BenchShapes
    device = str(engine.resolve_device(args.device))
    if args.arm == "eval":
        from mllm.eval import run
        t0 = time.perf_counter()
        res = run.evaluate(args.model, [NAME], args.data, args.out, batch_size=args.batch_size,
                           workers=args.workers, device=device, progress=False, restart=True,
                           update_lineage=False)
        r = res["benchmarks"][NAME]
        answers = [a["text"] for a in run.read_answers(r["answers"])]
        seconds = r["seconds"]
        total = time.perf_counter() - t0
    else:
        from mllm import export, generate
        loaded = export.load(args.model, device=device)
        qs = list(BenchShapes().questions(os.path.join(args.data, NAME)))
        t0 = time.perf_counter()
        answers = []
        for q in qs:
            answers.append(generate.answer(loaded, os.path.join(args.data, NAME, q.image), q.prompt,
                                           max_new_tokens=q.max_new_tokens))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        total = seconds
    with open(os.path.join(args.out, f"{args.arm}-answers.json"), "w") as f:
        json.dump(answers, f)
    out = {"arm": args.arm, "questions": len(answers), "seconds": round(seconds, 3),
           "questions_per_s": round(len(answers) / seconds, 2), "wall_s": round(total, 2),
           **_peaks(device)}
    print(json.dumps(out))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=384)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each arm (median)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--preset", default="tiny", help="mllm.presets model (phi2-siglip-random on a GPU)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per arm (0: torch's default; 1 keeps a shared CPU from "
                        "being oversubscribed, which slows both arms several-fold)")
    p.add_argument("--work", default=None, help="folder for the model and questions (default: temporary)")
    p.add_argument("--arm", choices=["eval", "loop"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.arm:
        arm(args)
        return 0
    work = args.work or tempfile.mkdtemp(prefix="bench-eval-")
    model = os.path.join(work, "model")
    data = os.path.join(work, "data")
    t = time.perf_counter()
    if not os.path.exists(os.path.join(model, "warren_vlm.json")):
        write_model(model, args.preset, args.device, args.dtype)
    if not os.path.exists(os.path.join(data, NAME, "questions.jsonl")):
        write_questions(data, args.questions, args.max_new_tokens, args.image_size)
    print(f"model {args.preset} ({args.dtype}) and {args.questions} questions in {work} "
          f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    # Rounds alternate the arms, so a busy spell of a shared machine hits both; the
    # medians are compared.
    runs: dict[str, list[dict]] = {"loop": [], "eval": []}
    answers: dict[str, list] = {}
    for _ in range(args.rounds):
        for name in ("loop", "eval"):
            out = os.path.join(work, name)
            os.makedirs(out, exist_ok=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--arm", name, "--model", model,
                   "--data", data, "--out", out, "--device", args.device,
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                   "--threads", str(args.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if r.returncode:
                print(r.stderr[-4000:], file=sys.stderr)
                return 1
            runs[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
            with open(os.path.join(out, f"{name}-answers.json")) as f:
                answers[name] = json.load(f)
    results = {}
    for name, rs in runs.items():
        qps = sorted(x["questions_per_s"] for x in rs)
        results[name] = {**{k: max(x[k] for x in rs) for k in rs[0] if k.endswith("_mb")},
                         "questions_per_s": statistics.median(qps), "rounds": qps}
    a, b = results["eval"], results["loop"]
    agree = sum(x == y for x, y in zip(answers["eval"], answers["loop"]))
    ratio = a["questions_per_s"] / b["questions_per_s"]
    print(f"\n{args.questions} questions, {args.preset} ({args.dtype}) on {args.device}, "
          f"batch {args.batch_size}, {args.workers} workers, max_new_tokens {args.max_new_tokens}, "
          f"median of {args.rounds} alternating rounds")
    print(f"| | warren eval | per-question generate | ratio |\n|---|---:|---:|---:|")
    print(f"| questions/s (median) | {a['questions_per_s']:.2f} | {b['questions_per_s']:.2f} | {ratio:.2f}x |")
    print(f"| questions/s (rounds) | {', '.join(f'{x:.1f}' for x in a['rounds'])} | "
          f"{', '.join(f'{x:.1f}' for x in b['rounds'])} | |")
    for k in ("peak_rss_mb", "gpu_peak_mb"):
        if k in a:
            print(f"| {k} | {a[k]:,.0f} | {b[k]:,.0f} | |")
    print(f"| identical answers | {agree} / {args.questions} | | |")
    if args.dtype != "float32" and agree < args.questions:
        print(f"({args.dtype}: batched and one-question kernels round differently, so a greedy "
              "near-tie can go the other way; float32 answers must all agree)")
    print(json.dumps({"eval": a, "loop": b, "ratio": round(ratio, 2), "agree": agree}))
    return 0 if agree == args.questions or args.dtype != "float32" else 1


if __name__ == "__main__":
    sys.exit(main())
