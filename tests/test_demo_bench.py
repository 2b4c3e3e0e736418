"""The demo's held-out benchmark: POPE's three categories and GQA-style questions derived
from the scenes drawn (checked against the scenes, not against the writer), in the
layouts the POPE and GQA loaders read, on images the demo pool does not hold; and a
tiny model evaluated on it by `warren eval`, whose answers `warren eval score` scores
to the same numbers."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

import engine_fixtures as ef
from pipelines.synth import demo_bench, demo_pool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = demo_bench.DemoBenchConfig(images=8, seed=2)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo-bench"))
    return root, demo_bench.build(root, CFG)


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f]


def test_pope_questions_follow_the_scenes(bench):
    root, info = bench
    scenes = demo_bench.scenes(CFG)
    qs = _jsonl(os.path.join(root, "pope", "llava_pope_test.jsonl"))
    assert [q["question_id"] for q in qs] == list(range(1, len(qs) + 1)) and len(qs) == info["pope"]
    names = sorted({q["image"] for q in qs})
    assert len(names) == 8
    shapes = [{s["shape"] for s in sc["shapes"]} for sc in scenes]
    freq = Counter(s for have in shapes for s in have)
    for cat in ("adversarial", "popular", "random"):
        labels = _jsonl(os.path.join(root, "pope", "coco", f"coco_pope_{cat}.json"))
        mine = [q for q in qs if q["category"] == cat]
        assert len(labels) == len(mine)
        for i, (name, have) in enumerate(zip(names, shapes)):
            rows = [lab for q, lab in zip(mine, labels) if q["image"] == name]
            asked = {lab["text"].split("a ", 1)[1].split(" in")[0]: lab["label"] for lab in rows}
            # yes for every shape drawn, as many no's about shapes not drawn
            assert {s for s, v in asked.items() if v == "yes"} == have
            no = {s for s, v in asked.items() if v == "no"}
            assert len(no) == len(have) and not no & have
            if cat == "popular":       # the most frequent absent shapes of the whole set
                absent = [s for s in demo_pool.SHAPES if s not in have]
                best = sorted(absent, key=lambda s: (-freq[s], demo_pool.SHAPES.index(s)))[:len(have)]
                assert no == set(best)
    assert info["pope_yes"] * 2 == info["pope"]


def test_gqa_answers_follow_the_scenes(bench):
    root, info = bench
    scenes = demo_bench.scenes(CFG)
    qs = _jsonl(os.path.join(root, "gqa", "llava_gqa_testdev_balanced.jsonl"))
    release = json.load(open(os.path.join(root, "gqa", "data", "testdev_balanced_questions.json")))
    assert len(qs) == len(release) == info["gqa"] > 0
    names = sorted({q["image"] for q in qs})
    for q in qs:
        sc = scenes[int(q["image"][1:-4]) - 9000000]
        ref = release[q["question_id"]]
        text = ref["question"]
        if text.startswith("What color is the background"):
            assert sc["background"] == "plain" and ref["answer"] == sc["bg"]
        elif text.startswith("What color is the "):
            shape = text[len("What color is the "):-1]
            assert [s["color"] for s in sc["shapes"] if s["shape"] == shape] == [ref["answer"]]
        else:
            color = text[len("What shape is "):-1]
            assert [s["shape"] for s in sc["shapes"] if s["color"] == color] == [ref["answer"]]
    assert len(names) <= 8


def test_loaders_read_it_and_images_are_held_out(bench, tmp_path):
    import mllm.eval.benchmarks  # noqa: F401
    from mllm.eval.types import REGISTRY
    root, info = bench
    pope = list(REGISTRY["pope"]().questions(root))
    gqa = list(REGISTRY["gqa"]().questions(root))
    assert len(pope) == info["pope"] and len(gqa) == info["gqa"]
    assert all(os.path.isfile(q.image) for q in pope + gqa)
    # the demo pool (same generator, its own stream) holds none of these pictures
    pool = str(tmp_path / "pool")
    demo_pool.build(pool, demo_pool.DemoDataConfig(n=200, seed=0))
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    ours = {digest(q.image) for q in pope}
    theirs = {digest(os.path.join(pool, "images", f)) for f in os.listdir(os.path.join(pool, "images"))}
    assert len(ours) == 8 and not ours & theirs


def test_same_config_same_files(bench, tmp_path):
    root, _ = bench
    again = str(tmp_path / "again")
    demo_bench.build(again, CFG)
    for rel in ("pope/llava_pope_test.jsonl", "pope/coco/coco_pope_random.json",
                "gqa/data/testdev_balanced_questions.json", "pope/val2014"):
        a, b = os.path.join(root, rel), os.path.join(again, rel)
        if os.path.isdir(a):
            assert sorted(os.listdir(a)) == sorted(os.listdir(b))
            assert all(open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read()
                       for f in os.listdir(a))
        else:
            assert open(a, "rb").read() == open(b, "rb").read()


@pytest.mark.slow
def test_warren_eval_on_it_and_warren_eval_score_agree(bench, tmp_path):
    root, info = bench
    model = ef.write_model(str(tmp_path / "model"))
    out = tmp_path / "eval"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "--model", model, "--benchmark",
                        "pope,gqa", "--data", root, "--output", str(out), "--batch-size", "8",
                        "--workers", "1", "--max-new-tokens", "6"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    for b in ("pope", "gqa"):
        answers = _jsonl(out / b / "answers.jsonl")
        folder = os.path.join(root, b)
        qfile = _jsonl(os.path.join(folder, "llava_pope_test.jsonl" if b == "pope"
                                    else "llava_gqa_testdev_balanced.jsonl"))
        assert [a["question_id"] for a in answers] == [q["question_id"] for q in qfile]
        assert [a["prompt"] for a in answers] == [q["text"] for q in qfile]
        s = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "score", "--benchmark", b,
                            "--data", root, "--answers", str(out / b / "answers.jsonl")],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert s.returncode == 0, s.stderr[-2000:]
        scored = json.loads(s.stdout)
        assert scored["scores"] == res["benchmarks"][b]["scores"]
        assert scored["n"] == res["benchmarks"][b]["n"] == len(qfile)
    # a second run asks nothing again and scores the same
    r2 = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "--model", model, "--benchmark",
                         "pope,gqa", "--data", root, "--output", str(out), "--workers", "0",
                         "--max-new-tokens", "6"], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=env)
    again = json.loads(r2.stdout)
    assert [again["benchmarks"][b]["asked"] for b in ("pope", "gqa")] == [0, 0]
    assert all(again["benchmarks"][b]["scores"] == res["benchmarks"][b]["scores"] for b in ("pope", "gqa"))


def test_library_side_never_imports_prefect(tmp_path):
    code = ("import sys; from pipelines.synth import demo_bench; "
            f"demo_bench.build({str(tmp_path)!r}, demo_bench.DemoBenchConfig(images=3)); "
            "import mllm.eval.run, mllm.eval.engine, mllm.eval.ablation; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'prefect'], 'prefect'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
