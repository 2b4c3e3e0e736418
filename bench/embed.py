"""Images/s of Warren's embed step against a plain single-process open_clip loop.

    python bench/embed.py                       # tiny random model, 2,000 demo images
    python bench/embed.py --model ViT-B-32 --n 1000 --image-size 224

Both sides embed the same images (JPEG bytes in memory, from the demo pool) and their
captions with the same model, batch size and torch threads, in the same process:
- plain: for each batch, PIL-decode + open_clip's preprocess in a Python loop, then
  encode_image and encode_text (what a script would do);
- warren: `pipelines.embed.embed_table` (decoding in worker processes, a bounded number
  of batches ahead of the model), for each --workers value.
Each side runs once untimed (warm-up: model build, oneDNN kernels, worker start), then
--repeat times; the best time counts. A ViT-B-32 without pretrained weights is a fine
stand-in for speed: random weights cost the same FLOPs.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plain_loop(m, blobs, caps, bs):
    import torch
    from PIL import Image
    n = 0
    with torch.inference_mode():
        for s in range(0, len(blobs), bs):
            x = torch.stack([m.preprocess(Image.open(io.BytesIO(b))) for b in blobs[s:s + bs]])
            fi = m.model.encode_image(x)
            ft = m.model.encode_text(m.tokenizer(caps[s:s + bs]))
            torch.nn.functional.normalize(fi, dim=-1)
            torch.nn.functional.normalize(ft, dim=-1)
            n += len(x)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="warren-tiny-random")
    ap.add_argument("--n", type=int, default=2000, help="images")
    ap.add_argument("--image-size", type=int, default=96, help="side of the generated images")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", default="1,2", help="decoding workers to try, comma-separated")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipelines import embed
from pipelines.synth import demo_pool

    with tempfile.TemporaryDirectory() as tmp:
        demo_pool.build(tmp, demo_pool.DemoDataConfig(n=a.n, size=a.image_size, dead_share=0,
                                                      corrupt_share=0))
        truth = pq.read_table(os.path.join(tmp, "truth.parquet"))
        blobs = [open(os.path.join(tmp, "images", f), "rb").read()
                 for f in truth.column("file").to_pylist()]
        caps = truth.column("caption").to_pylist()
    table = pa.table({"uid": truth.column("uid"), "jpg": blobs, "caption": caps})
    m = embed.load(embed.EmbedConfig(model=a.model))
    res = {"model": a.model, "images": len(blobs), "image_size": a.image_size,
           "model_input": m.image["size"], "batch_size": a.batch_size,
           "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "results": {}}

    def best(fn):
        fn()                                  # warm-up
        times = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return len(blobs) / min(times)

    res["results"]["plain"] = round(best(lambda: plain_loop(m, blobs, caps, a.batch_size)), 1)
    for w in [int(x) for x in a.workers.split(",")]:
        cfg = embed.EmbedConfig(model=a.model, batch_size=a.batch_size, workers=w)
        res["results"][f"warren_workers{w}"] = round(best(lambda: embed.embed_table(cfg, table)), 1)
    embed.shutdown()
    base = res["results"]["plain"]
    res["speedup"] = {k: round(v / base, 2) for k, v in res["results"].items() if k != "plain"}
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
