"""The ablation flow on the demo pool (a finished curation run of it): two arms, the
Bunny coreset and a seeded random sample of the same size, trained alike and evaluated
on the same questions; ablation.parquet holds exactly those arms and benchmarks with
the paired bootstrap intervals, recomputed here from the answers files."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re

import numpy as np
import polars as pl
import pytest
import yaml

import engine_fixtures as ef
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _config(tmp, run, data, **extra) -> str:
    doc = {"output": str(tmp / "ablate"),
           "source": {"run": run},
           "arms": [{"name": "coreset", "select": {}}, {"name": "random", "random": True}],
           "seed": 3,
           "mix": {"synthetic": {"scale": 0.0005, "max_images": 16}},
           "train": {"config": os.path.join(REPO, "configs", "train", "tiny.yaml"),
                     "set": {"stage1.max_steps": 2, "stage2.max_steps": 2,
                             "stage1.save_every": 2, "stage2.save_every": 2}},
           "eval": {"benchmarks": ["pope", "gqa", ef.NAME], "data": data, "batch_size": 16,
                    "workers": 0, "max_new_tokens": 6},
           "runner": {"max_workers": 2},
           "bootstrap": {"n": 400, "seed": 5}, **extra}
    path = tmp / "ablate.yaml"
    path.write_text("# warren ablate --config ablate.yaml\n" + yaml.safe_dump(doc))
    return str(path)


@pytest.fixture(scope="module")
def ablated(curate_small, tmp_path_factory):
    from flows import ablate
    tmp = tmp_path_factory.mktemp("ablate")
    from pipelines.synth import demo_bench
    data = ef.write_benchmark(str(tmp / "bench"), n=24)       # bench/shapes-test/
    demo_bench.build(data, demo_bench.DemoBenchConfig(images=4))   # bench/pope/, bench/gqa/
    cfg = _config(tmp, curate_small[0], data)
    with ef.registered():
        first = ablate.ablate(cfg)
        again = ablate.ablate(cfg)
    return first, again, curate_small[0], data, tmp


def test_arms_have_the_same_size_and_the_expected_rows(ablated):
    from pipelines import bands
    first, _, run, _, tmp = ablated
    out = tmp / "ablate"
    core = pl.read_parquet(os.path.join(run, "coreset.parquet"))
    # the coreset arm re-ran the source's own selection: the curated coreset, exactly
    arm = pl.read_parquet(out / "arms" / "coreset" / "coreset" / "coreset.parquet")
    assert sorted(arm["uid"]) == sorted(core["uid"]) and len(arm) > 0
    assert first["size"] == len(core) == first["natural_sizes"]["coreset"]
    # the random arm: the seeded uniform sample of every embedded row, same size
    emb = os.path.join(run, "embeddings")
    pool = pl.concat([pl.read_parquet(os.path.join(emb, f), columns=["uid"])
                      for f in sorted(os.listdir(emb))])
    uids = pool["uid"].to_list()
    keep = bands.sample(bands.uid_hash(uids), uids, len(core), 3)
    rnd = pl.read_parquet(out / "arms" / "random" / "coreset" / "coreset.parquet")
    assert sorted(rnd["uid"]) == sorted(u for u, k in zip(uids, keep) if k)
    assert len(rnd) == len(arm)
    assert first["arms"]["coreset"]["rows"] == first["arms"]["random"]["rows"] == len(core)
    assert first["parallel_arms"] == 2 and first["runner"] == "local threads (2)"
    # their stage-1 tables are their captions; both images came from the pool
    for name, t in (("coreset", arm), ("random", rnd)):
        s1 = pl.read_parquet(out / "arms" / name / "stage1" / "stage1.parquet")
        assert sorted(s1["id"]) == sorted(t["uid"])
        assert first["arms"][name]["images"] == len(t)


def test_arms_share_recipe_tokenizer_and_questions(ablated):
    first, _, _, _, tmp = ablated
    out = tmp / "ablate"

    def digest(p):
        return hashlib.sha256(open(p, "rb").read()).hexdigest()

    tok = [digest(out / "arms" / a / "train" / "stage2" / "final" / "tokenizer" / "tokenizer.json")
           for a in ("coreset", "random")]
    assert tok[0] == tok[1] == digest(out / "tokenizer" / "tokenizer.json")
    cfgs = [yaml.safe_load(open(out / "arms" / a / "train" / "stage2" / "config.yaml"))
            for a in ("coreset", "random")]
    for c in cfgs:
        c["run"].pop("output_dir", None)
    assert cfgs[0] == cfgs[1] and cfgs[0]["run"]["seed"] == 0
    for a in ("coreset", "random"):
        assert first["arms"][a]["train"]["stage2"]["steps"] == 2
    # the same mix table in both manifests
    mans = [json.load(open(out / "arms" / a / "manifest.json")) for a in ("coreset", "random")]
    assert mans[0]["tables"]["mix"]["sha256"] == mans[1]["tables"]["mix"]["sha256"]
    assert mans[0]["tables"]["stage1"]["sha256"] != mans[1]["tables"]["stage1"]["sha256"]


def test_ablation_parquet_rows_and_intervals(ablated):
    from mllm.eval import ablation, run
    from mllm.eval.types import REGISTRY
    first, _, _, data, tmp = ablated
    out = tmp / "ablate"
    t = pl.read_parquet(out / "ablation.parquet")
    assert t.columns == ablation.ABLATION.names
    assert sorted(zip(t["arm"], t["benchmark"])) == sorted(
        (a, b) for a in ("coreset", "random") for b in ("gqa", "pope", ef.NAME))
    assert set(t["baseline"]) == {"random"}
    assert all(math.isfinite(x) for c in ("diff", "ci_low", "ci_high") for x in t[c])
    assert (t["ci_low"] <= t["diff"]).all() and (t["diff"] <= t["ci_high"]).all()
    # every arm answered the same questions: all of each benchmark's
    for b in ("pope", "gqa"):
        n = len(list(REGISTRY[b]().questions(data)))
        assert set(t.filter(pl.col("benchmark") == b)["n"]) == {n}
    # the test benchmark's credit (share of the answer's characters) recomputed by hand
    rows = {r["arm"]: r for r in t.filter(pl.col("benchmark") == ef.NAME).to_dicts()}
    qs = list(ef.ShapesTest().questions(os.path.join(data, ef.NAME)))
    cred = {}
    for a in ("coreset", "random"):
        ans = run.read_answers(str(out / "arms" / a / "eval" / ef.NAME / "answers.jsonl"))
        assert [x["question_id"] for x in ans] == [q.question_id for q in qs]
        cred[a] = np.array([len(set(q.metadata["answer"]) & set(x["text"].lower()))
                            / len(set(q.metadata["answer"])) for x, q in zip(ans, qs)])
        assert rows[a]["credit"] == pytest.approx(100 * cred[a].mean())
        assert rows[a]["score"] == pytest.approx(100 * cred[a].mean()) and rows[a]["key"] == "overlap"
        assert rows[a]["n"] == 24
    d, lo, hi = ablation.paired_bootstrap(cred["coreset"], cred["random"], 400, 5)
    r = rows["coreset"]
    assert r["diff"] == pytest.approx(100 * d)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((100 * lo, 100 * hi))
    assert r["ci_low"] < r["ci_high"]
    assert r["score_diff"] == pytest.approx(rows["coreset"]["score"] - rows["random"]["score"])
    b = rows["random"]
    assert (b["diff"], b["ci_low"], b["ci_high"]) == (0.0, 0.0, 0.0)
    assert r["size"] == b["size"] == first["size"]
    assert json.loads(r["selection"]) == {"select": {}, "seed": 3}
    # POPE's headline is its average F1, as its scorer reports it for each arm
    for a in ("coreset", "random"):
        res = json.load(open(out / "arms" / a / "eval" / "results.json"))
        p = t.filter((pl.col("benchmark") == "pope") & (pl.col("arm") == a)).to_dicts()[0]
        assert p["key"] == "average_f1" and p["score"] == res["benchmarks"]["pope"]["scores"]["average_f1"]


def test_ablation_html_is_self_contained(ablated):
    _, _, _, _, tmp = ablated
    page = (tmp / "ablate" / "ablation.html").read_text()
    assert "<svg" in page and "How to read this" in page
    assert "coreset" in page and "random" in page and ef.NAME in page and "pope" in page
    # nothing is fetched: no scripts, stylesheets or images from elsewhere
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page) and "<link" not in page


def test_rerun_skips_every_finished_arm(ablated):
    first, again, _, _, tmp = ablated
    assert all(a["skipped"] for a in again["arms"].values())
    assert again["rows"] == first["rows"]


def test_bad_ablate_configs_are_one_error(curate_small, tmp_path):
    from flows import ablate
    from pipelines.errors import ConfigError
    data = ef.write_benchmark(str(tmp_path / "bench"), n=4)
    bad = _config(tmp_path, curate_small[0], data,
                  arms=[{"name": "a b", "select": {}}, {"name": "coreset", "select": {}}])
    with pytest.raises(ConfigError) as e:
        ablate.load_config(bad)
    msg = str(e.value)
    assert "plain folder name" in msg and "exactly one random arm" in msg
    with pytest.raises(ConfigError, match="arms must all have size 100000"):
        with ef.registered():
            ablate.ablate(_config(tmp_path, curate_small[0], data, size=100000))
