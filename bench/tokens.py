"""Benchmark of the checks every row gets before step 1 (mllm.data.ConversationDataset).

    python bench/tokens.py              # 50K LLaVA-shaped rows, 2K images (about a minute)
    python bench/tokens.py --quick      # 5K rows, 300 images: a smoke test
    python bench/tokens.py --rows 200000 --images 10000

Rows are LLaVA-665K-shaped (short VQA, long descriptions, multi-turn, text-only) made
of random words; the tokenizer is a byte-level BPE (Phi-2's split rule) learnt on them
with an 8K vocabulary, so tokens per word are close to a real one's. Printed, each
measured in this run:
  lengths    the word-count estimate the trainer used for batching (baseline) against
             exact lengths from batched tokenization with the max_length checks
  per row    one `Template.encode` (what each sample costs in the DataLoader)
  images     the header-level check (header parse + JPEG end marker) on threads,
             against the same check serially and against a full decode of every image
One JSON line with every figure goes to stdout.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = [f"{rng.choice('bcdfghklmnprstvw')}{rng.choice('aeiou')}{rng.choice('nrstlm')}"
             f"{rng.choice(['', 'e', 'ing', 's', 'er'])}" for _ in range(3000)]

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."

    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.45:    # short VQA
            conv = ["<image>\n" + text(8) + "\nAnswer the question using a single word or phrase.", text(2)]
        elif kind < 0.75:  # multi-turn about an image
            conv = ["<image>\n" + text(10)] + [text(rng.randint(5, 40)) for _ in range(2 * rng.randint(1, 4) - 1)]
        elif kind < 0.94:  # long description
            conv = ["<image>\nDescribe the image in detail.", text(rng.randint(60, 160))]
        else:              # text-only
            conv = [text(20), text(rng.randint(40, 200))]
        out.append({"id": str(i), "has_image": conv[0].startswith("<image>"),
                    "conversations": [{"from": "human" if k % 2 == 0 else "gpt", "value": v}
                                      for k, v in enumerate(conv)]})
    return out


def tokenizer(sample: list[dict]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mllm import tokenizer as tok_mod
    from mllm.templates import BUNNY_SYSTEM
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [BUNNY_SYSTEM + " USER: ASSISTANT:"] * 50 + [t["value"] for r in sample for t in r["conversations"]]
    tok.train_from_iterator(texts, trainer=trainer)
    return tok_mod.prepare(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>"))


def bench_lengths(data: list[dict], tok, n_img: int, max_length: int) -> dict:
    from mllm.data import ENCODE_BATCH
    from mllm.templates import IGNORE_INDEX, get
    template = get("bunny")
    convs = [r["conversations"] for r in data]
    t = time.perf_counter()
    estimate = [sum(len(x["value"].split()) for x in c) + (n_img if r["has_image"] else 0)
                for c, r in zip(convs, data)]
    t_words = time.perf_counter() - t
    image_id = tok.convert_tokens_to_ids("<image>")
    t = time.perf_counter()
    exact = []
    for start in range(0, len(convs), ENCODE_BATCH):
        for ids, labels in template.encode_many(convs[start:start + ENCODE_BATCH], tok, n_img):
            if image_id in ids and ids.index(image_id) + n_img > max_length:
                exact.append(-1)
            elif all(lab == IGNORE_INDEX for lab in labels[1:max_length]):
                exact.append(-2)
            else:
                exact.append(min(len(ids), max_length))
    t_exact = time.perf_counter() - t
    k = min(len(convs), 3000)
    t = time.perf_counter()
    for c in convs[:k]:
        template.encode(c, tok, n_img)
    t_one = time.perf_counter() - t
    ok = [(e, w) for e, w in zip(exact, estimate) if e > 0]
    return {"rows": len(data), "words_rows_per_s": len(data) / t_words,
            "exact_rows_per_s": len(data) / t_exact, "exact_s": t_exact,
            "encode_us_per_row": 1e6 * t_one / k,
            "mean_exact_len": sum(e for e, _ in ok) / len(ok),
            "mean_word_estimate": sum(w for _, w in ok) / len(ok)}


def bench_images(n: int, folder: str) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from mllm.data import CHECK_THREADS, FileImages
    rng = random.Random(1)
    for i in range(n):
        img = Image.effect_noise((640, 480), 40).convert("RGB") if i < 8 else None
        if img is None:  # reuse a few noisy bodies: encoding 640x480 JPEGs dominates otherwise
            img = Image.open(os.path.join(folder, f"{i % 8}.jpg"))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(80, 95))
        with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
            f.write(buf.getvalue())
    store = FileImages(folder)
    refs = [f"{i}.jpg" for i in range(n)]
    t = time.perf_counter()
    bad_serial = [p for p in map(store.probe, refs) if p]  # first: it also warms the page cache
    t_serial = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        bad = [p for p in pool.map(store.probe, refs) if p]
    t_threads = time.perf_counter() - t
    t = time.perf_counter()
    for ref in refs:
        with Image.open(os.path.join(folder, ref)) as im:
            im.load()
    t_decode = time.perf_counter() - t
    assert not bad and not bad_serial
    return {"images": n, "threads_img_per_s": n / t_threads, "serial_img_per_s": n / t_serial,
            "full_decode_img_per_s": n / t_decode, "threads": CHECK_THREADS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--images", type=int, default=2_000)
    p.add_argument("--image-tokens", type=int, default=729, help="SigLIP-SO400M/14@384: 729")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.rows, a.images = 5_000, 300
    data = rows(a.rows)
    tok = tokenizer(data[:20_000])
    lengths = bench_lengths(data, tok, a.image_tokens, a.max_length)
    with tempfile.TemporaryDirectory() as d:
        images = bench_images(a.images, d)
    print(f"lengths: word estimate {lengths['words_rows_per_s']:,.0f} rows/s (baseline), exact "
          f"{lengths['exact_rows_per_s']:,.0f} rows/s ({lengths['exact_rows_per_s'] / lengths['words_rows_per_s']:.3f}x); "
          f"665K rows would take {665_298 / lengths['exact_rows_per_s']:.0f} s", file=sys.stderr)
    print(f"per row: one encode {lengths['encode_us_per_row']:.0f} us; mean length exact "
          f"{lengths['mean_exact_len']:.0f} vs word estimate {lengths['mean_word_estimate']:.0f}", file=sys.stderr)
    print(f"images: threads {images['threads_img_per_s']:,.0f}/s, serial {images['serial_img_per_s']:,.0f}/s "
          f"({images['threads_img_per_s'] / images['serial_img_per_s']:.2f}x), full decode "
          f"{images['full_decode_img_per_s']:,.0f}/s (header check "
          f"{images['serial_img_per_s'] / images['full_decode_img_per_s']:.1f}x faster serially)", file=sys.stderr)
    print(json.dumps({"lengths": lengths, "images": images}))


if __name__ == "__main__":
    main()
