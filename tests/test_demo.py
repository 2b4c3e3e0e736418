"""`warren demo` end to end (smaller pool), and the planted kinds' fates."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_warren_demo_command(prefect_api, tmp_path):
    out = str(tmp_path / "demo")
    r = subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--output", out, "--n", "400",
                        "--set", "source.shard_rows=200", "--set", "select.k=6"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    paths = json.loads(r.stdout.strip().splitlines()[-1])
    assert "tiny randomly initialised open_clip model" in r.stderr
    for k in ("coreset", "rejects", "manifest", "images", "report"):
        assert os.path.exists(paths[k]), k
    truth = pl.read_parquet(f"{out}/source/truth.parquet")
    rej = pl.read_parquet(paths["rejects"])
    core = pl.read_parquet(paths["coreset"])
    assert len(core) + len(rej) == len(truth) == 400
    fate = dict(rej.select("uid", "reason").iter_rows())
    for kind, reason in (("dead_link", "dead_link"), ("corrupt", "corrupt_image")):
        assert {fate[u] for u in truth.filter(pl.col("kind") == kind)["uid"]} == {reason}
    # the planted near-duplicate copies: most are dropped as duplicates even by the random model
    copies = truth.filter(pl.col("kind") == "near_duplicate")["uid"]
    dropped = sum(fate.get(u) == "duplicate" for u in copies)
    assert dropped >= 0.5 * len(copies), (dropped, len(copies))
    assert "planted groups collapsed to one member" in r.stderr
    # the console: per-stage progress with rows, rate and ETA; no third-party chatter
    import re
    assert re.search(r"^download: 400/400 rows \(2/2 shards\), [\d.,]+ rows/s, ", r.stderr, re.M)
    assert re.search(r"^embed: [\d,]+/[\d,]+ rows \(2/2 shards\), [\d.,]+ rows/s, ", r.stderr, re.M)
    for noise in ("INFO root", "WARNING root", "HTTP Request", "Finished in state", "Traceback"):
        assert noise not in r.stderr, noise

    # stage 1 = the coreset's captions; the mix = Bunny-695K at 1/500 on synthetic sources
    from pipelines import manifest
    man = manifest.load(paths["train_manifest"])          # verifies every sha256
    assert set(man.doc["tables"]) == {"stage1", "mix"}
    s1 = pl.read_parquet(paths["stage1"])
    assert sorted(s1["id"]) == sorted(core["uid"])
    assert man.images("stage1")["kind"] == "parquet" and man.images("mix")["kind"] == "files"
    stats = json.load(open(f"{out}/mix/stats.json"))
    assert stats["sources"]["svit-mix-665k"]["kept"] == 1250            # 625K x 0.002
    assert stats["sources"]["svit-mix-665k"]["reasons"]["excluded"] == 80   # its ShareGPT part
    assert stats["sources"]["wizardlm-evol-instruct-70k"]["kept"] == 140    # 70K x 0.002
    mix = pl.read_parquet(paths["mix"])
    mix_rej = pl.read_parquet(paths["mix_rejects"])
    assert len(mix) == 1390 and len(mix) + len(mix_rej) == stats["input"]
    assert mix.filter(~pl.col("has_image"))["image"].null_count() == int((~mix["has_image"]).sum())

    # the trainer ran both stages on that manifest and answered a question
    for stage in ("stage1", "stage2"):
        rows = [json.loads(x) for x in open(f"{out}/train/{stage}/metrics.jsonl")]
        assert [x["step"] for x in rows] == list(range(1, 31))
        assert os.path.exists(f"{out}/train/{stage}/loss.png")
    loss = [json.loads(x)["loss"] for x in open(paths["metrics"])]
    assert sum(loss[-5:]) < sum(loss[:5])
    assert {"warren_vlm.json", "projector.safetensors", "language_model"} <= set(os.listdir(paths["model"]))
    assert isinstance(paths["answer"], str) and "Q: Describe the image concisely." in r.stderr
    # it ends by evaluating the model on a held-out benchmark in POPE's and GQA's layouts
    from mllm import lineage
    from mllm.eval import run
    res = json.load(open(os.path.join(paths["eval"], "results.json")))
    assert set(res["benchmarks"]) == {"pope", "gqa"} and res["model"] == paths["model"]
    for b in ("pope", "gqa"):
        n = res["benchmarks"][b]["n"]
        lines = run.read_answers(os.path.join(paths["eval"], b, "answers.jsonl"))
        assert len(lines) == n > 0 and f"{b} (n={n})" in r.stderr
    qfile = [json.loads(x) for x in open(os.path.join(paths["eval_data"], "pope", "llava_pope_test.jsonl"))]
    assert [x["question_id"] for x in run.read_answers(os.path.join(paths["eval"], "pope", "answers.jsonl"))] \
        == [q["question_id"] for q in qfile]
    assert {q["category"] for q in qfile} == {"adversarial", "popular", "random"}
    assert set(pl.read_parquet(os.path.join(paths["eval"], "scores.parquet"))["benchmark"]) == {"pope", "gqa"}
    assert set(lineage.read(paths["model"])["eval"]) == {"pope", "gqa"}
    # the command the demo prints to ask the model again works as printed
    g = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--checkpoint", paths["model"],
                        "--image", paths["question_image"], "--prompt", "Describe the image concisely.",
                        "--max-new-tokens", "16"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr[-2000:]
    assert g.stdout.strip() == paths["answer"]


def test_serve_pool_serves_a_finished_demo_pool_again(tmp_path):
    """`warren demo --serve-pool DIR`: the pool answers on 127.0.0.1 again, its metadata
    names this address, and the printed command is the one configs/curate/demo.yaml names."""
    import signal
    import urllib.request

    from pipelines.synth import demo_pool
    root = tmp_path / "demo" / "source"
    demo_pool.build(str(root), demo_pool.DemoDataConfig(n=40, seed=2))
    with open(os.path.join(REPO, "configs", "curate", "demo.yaml")) as f:
        assert f.readline().startswith("# warren demo --serve-pool runs/demo/source ")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "demo", "--serve-pool", str(root)],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline().rstrip("\n") for _ in range(3)]
        assert lines[0].startswith(f"serving the demo pool {root} at http://127.0.0.1:")
        meta = lines[1].removeprefix("metadata: ")
        assert meta == str(root / "metadata.parquet")
        assert lines[2] == (f"curate it: warren curate --config configs/curate/demo.yaml "
                            f"--set source.path={meta} --output {tmp_path / 'demo' / 'curate-again'}")
        t = pl.read_parquet(meta)
        truth = pl.read_parquet(root / "truth.parquet")
        good = t.join(truth, on="uid").filter(pl.col("kind") == "original")["url"][0]
        assert good.startswith(lines[0].rsplit(" at ", 1)[1].split(" ")[0])
        with urllib.request.urlopen(good, timeout=30) as r:
            assert r.status == 200 and r.read()[:2] == b"\xff\xd8"     # a JPEG
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert proc.stderr.read().strip() == "stopped"
    # a folder that is not a demo pool: one line
    r = subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--serve-pool", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"warren demo: error: {tmp_path}: not a demo pool (no truth.parquet; a demo's pool is "
        "<output>/source)"]
