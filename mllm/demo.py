"""What `warren demo` calls once curation and the mix are done: train the tiny model
(stage 1 then stage 2) on a manifest and ask it one question about an image.

    mllm.demo.train_tiny("runs/demo/manifest.json", "runs/demo/train", steps=30)

The model is the 2-layer preset (mllm.presets.TINY): random weights, a tokenizer built
from the manifest's text. On 2 CPU cores it runs in well under a minute; its answer
shows the pipeline works end to end, not that a 2-layer model is smart.
"""
from __future__ import annotations

import os
import shutil
import time

from mllm import export, generate, presets, train
from mllm.data import image_store
from pipelines import manifest as manifest_mod


def _first_image(manifest_path: str, table: str):
    """(id, image bytes) of the first image row of `table`, or (None, None)."""
    from pipelines import schemas, storage
    man = manifest_mod.load(manifest_path, verify=False)
    store = image_store(man.images(table))
    if store is None:
        return None, None
    rows = storage.read_table(man.table_path(table), columns=["id", "image", "has_image"],
                              schema=schemas.MIX).to_pylist()
    for row in rows:
        if row["has_image"]:
            return row["id"], store.read(row["image"])
    return None, None


def train_tiny(manifest_path: str, out_dir: str, steps: int = 30,
               question: str = "What color is the shape?", progress: bool = False,
               overrides: dict | None = None) -> dict:
    """Train stage 1 and stage 2 for `steps` optimizer steps each, export the merged
    model to `<out_dir>/stage2/final`, and answer `question` about the first image of
    the mix. Starts afresh (an earlier run in `out_dir` is replaced).

    Returns {"stage1": summary, "stage2": summary, "model": export folder,
    "question", "image_id", "answer", "seconds"}; each summary has first_loss,
    final_loss, tokens_per_s, metrics (JSONL) and plot (PNG) paths.
    """
    t0 = time.perf_counter()
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    man = manifest_mod.load(manifest_path, verify=False)
    tables = man.doc["tables"]
    cfg = presets.tiny({"stage1.max_steps": steps, "stage2.max_steps": steps,
                        "stage1.save_every": steps, "stage2.save_every": steps,
                        "run.output_dir": out_dir,
                        # Without a caption table, stage 1 aligns the projector on the mix.
                        **({} if "stage1" in tables else {"stage1.table": "mix",
                                                          "stage1.template": "plain"}),
                        **(overrides or {})})
    summaries = train.run_stages(cfg, manifest_path, out_dir, progress=progress)
    final = summaries[2]["final"]
    image_id, image = _first_image(manifest_path, cfg.stage2.table)
    loaded = export.load(final)
    reply = generate.answer(loaded, image, question, max_new_tokens=16)
    return {"stage1": summaries[1], "stage2": summaries[2], "model": final, "question": question,
            "image_id": image_id, "answer": reply, "seconds": time.perf_counter() - t0}
