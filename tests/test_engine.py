"""The eval engine and `evaluate`: batched greedy answers equal one-question-at-a-time HF
`generate` for every batch size; answers.jsonl is in question-file order and LLaVA's
form; a killed eval (SIGKILL) resumes without asking answered questions again and ends
with the same file as an uninterrupted run; bad input is one clear error."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

import engine_fixtures as ef
import mllm_fixtures as fx
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ef.write_model(str(tmp_path_factory.mktemp("eval-model") / "model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ef.write_benchmark(str(tmp_path_factory.mktemp("eval-data")))


@pytest.fixture
def bench():
    with ef.registered() as name:
        yield name


def _questions(data):
    return list(ef.ShapesTest().questions(os.path.join(data, ef.NAME)))


@pytest.fixture(scope="module")
def reference(model, data):
    """Each question asked alone through mllm.generate.answer (HF generate, no padding)."""
    from mllm import export, generate
    loaded = export.load(model)
    ddir = os.path.join(data, ef.NAME)
    out = []
    with fx.single_thread():
        for q in _questions(data):
            image = q.image if not isinstance(q.image, str) else os.path.join(ddir, q.image)
            out.append(generate.answer(loaded, image, q.prompt, max_new_tokens=q.max_new_tokens))
    return out


@pytest.fixture(scope="module")
def full_run(model, data, tmp_path_factory):
    """An uninterrupted evaluate() of the whole benchmark."""
    from mllm.eval import run
    out = str(tmp_path_factory.mktemp("eval-full"))
    with ef.registered(), fx.single_thread():
        res = run.evaluate(model, [ef.NAME], data, out, batch_size=4, workers=2, progress=False)
    return out, res


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f]


@pytest.mark.parametrize("batch_size", [1, 3, 8, 40])
def test_batched_answers_equal_one_at_a_time_generate(model, data, reference, batch_size):
    from mllm import export
    from mllm.eval import engine
    qs = _questions(data)
    loaded = export.load(model)
    got = [a for b in engine.answer_batches(loaded, qs, os.path.join(data, ef.NAME), batch_size,
                                            workers=0 if batch_size == 1 else 2, progress=False)
           for a in b]
    assert [a.question for a in got] == qs
    assert [a.text for a in got] == reference
    # the greedy answers are not all alike (a test that compares empty strings proves nothing)
    assert len(set(reference)) > 5
    # the budgets hold: no answer is longer than its question's max_new_tokens
    assert all(a.tokens <= a.question.max_new_tokens for a in got)
    assert any(a.tokens == a.question.max_new_tokens for a in got)


def test_answers_file_is_llava_form_in_question_order(full_run, data, reference, model):
    out, res = full_run
    qs = _questions(data)
    lines = _lines(os.path.join(out, ef.NAME, "answers.jsonl"))
    assert [x["question_id"] for x in lines] == [q.question_id for q in qs]   # 6 repeats, in place
    assert [x["prompt"] for x in lines] == [q.prompt for q in qs]
    assert [x["text"] for x in lines] == reference
    assert all(set(x) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
               for x in lines)
    assert [x["metadata"] for x in lines] == [q.metadata for q in qs]
    assert {x["model_id"] for x in lines} == {"model"}
    assert len({x["answer_id"] for x in lines}) == len(lines)
    # scored by the benchmark's own scorer, recorded in results.json and scores.parquet
    exact = 100.0 * sum(x["text"].lower() == q.metadata["answer"] for x, q in zip(lines, qs)) / 40
    overlap = 100.0 * sum(len(set(q.metadata["answer"]) & set(x["text"].lower())) / len(set(q.metadata["answer"]))
                          for x, q in zip(lines, qs)) / 40
    want = {"accuracy": exact, "overlap": overlap}
    r = res["benchmarks"][ef.NAME]
    assert r["n"] == len(qs) == 40 and r["scores"] == pytest.approx(want)
    assert 0 < overlap < 100
    assert r["asked"] == 40 and r["resumed_from"] == 0
    assert r["headline"] == {"key": "overlap", "value": r["scores"]["overlap"]}
    assert json.load(open(os.path.join(out, "results.json"))) == json.loads(json.dumps(res))
    table = pl.read_parquet(os.path.join(out, "scores.parquet"))
    assert table.columns == ["benchmark", "key", "value", "n"]
    assert table.to_dicts() == [{"benchmark": ef.NAME, "key": k, "value": r["scores"][k], "n": 40}
                                for k in ("accuracy", "overlap")]
    # and in the model's lineage and card
    from mllm import lineage
    doc = lineage.read(model)
    assert doc["eval"][ef.NAME] == {"scores": r["scores"], "n": 40,
                                    "data": os.path.join(data, ef.NAME), "limit": None}
    card = open(os.path.join(model, "README.md")).read()
    assert f"| {ef.NAME} | overlap | {r['scores']['overlap']} |" in card


_CHILD = r"""
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import engine_fixtures as ef
from mllm.eval import engine, run
real = engine.greedy
calls = []
def greedy(*a, **k):
    calls.append(1)
    if len(calls) > {batches}:     # hang inside the next batch: the parent kills us here
        time.sleep(3600)
    return real(*a, **k)
engine.greedy = greedy
with ef.registered():
    run.evaluate({model!r}, [ef.NAME], {data!r}, {out!r}, batch_size=4, workers=2, progress=False)
"""


def test_killed_eval_resumes_without_asking_again(full_run, model, data, tmp_path, bench, monkeypatch):
    from mllm.eval import engine, run
    out = str(tmp_path / "killed")
    answers = os.path.join(out, ef.NAME, "answers.jsonl")
    code = _CHILD.format(tests=HERE, model=model, data=data, out=out, batches=3)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (os.path.exists(answers) and len(open(answers).read().splitlines()) >= 12):
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never answered 3 batches"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert len(_lines(answers)) == 12           # three batches of 4, then the kill

    asked = []
    real = engine.greedy

    def counting(vlm, prompts, *a, **k):
        asked.append(len(prompts))
        return real(vlm, prompts, *a, **k)

    monkeypatch.setattr(engine, "greedy", counting)
    res = run.evaluate(model, [ef.NAME], data, out, batch_size=4, workers=2, progress=False)
    assert sum(asked) == 40 - 12                 # the 12 answered questions were not asked again
    assert res["benchmarks"][ef.NAME]["resumed_from"] == 12
    full = os.path.join(full_run[0], ef.NAME, "answers.jsonl")
    assert open(answers, "rb").read() == open(full, "rb").read()
    assert res["benchmarks"][ef.NAME]["scores"] == full_run[1]["benchmarks"][ef.NAME]["scores"]


def test_partial_last_line_is_dropped_and_asked_again(full_run, model, data, tmp_path, bench):
    from mllm.eval import run
    full = open(os.path.join(full_run[0], ef.NAME, "answers.jsonl"), "rb").read()
    cut = [i for i, c in enumerate(full) if c == ord("\n")][4] + 1     # 5 whole lines
    out = tmp_path / "torn"
    (out / ef.NAME).mkdir(parents=True)
    (out / ef.NAME / "answers.jsonl").write_bytes(full[:cut + 30])     # + 30 bytes of line 6
    res = run.evaluate(model, [ef.NAME], data, str(out), batch_size=7, workers=0, progress=False)
    assert res["benchmarks"][ef.NAME]["resumed_from"] == 5
    assert res["benchmarks"][ef.NAME]["asked"] == 35
    assert (out / ef.NAME / "answers.jsonl").read_bytes() == full


def test_limit_then_full_run_continues(full_run, model, data, tmp_path, bench):
    from mllm.eval import run
    out = str(tmp_path / "limited")
    res = run.evaluate(model, ef.NAME, data, out, batch_size=4, workers=0, limit=6, progress=False)
    r = res["benchmarks"][ef.NAME]
    assert r["n"] == 6 and r["limit"] == 6 and len(_lines(os.path.join(out, ef.NAME, "answers.jsonl"))) == 6
    res = run.evaluate(model, ef.NAME, data, out, batch_size=4, workers=0, progress=False)
    assert res["benchmarks"][ef.NAME]["resumed_from"] == 6 and res["benchmarks"][ef.NAME]["asked"] == 34
    assert open(os.path.join(out, ef.NAME, "answers.jsonl"), "rb").read() == \
        open(os.path.join(full_run[0], ef.NAME, "answers.jsonl"), "rb").read()


def test_another_model_into_the_same_output_refuses(full_run, data, tmp_path, bench):
    from mllm.eval import run
    from pipelines.runkey import StaleRunError
    other = ef.write_model(str(tmp_path / "other"), seed=1)
    out = str(tmp_path / "o")
    import shutil
    shutil.copytree(full_run[0], out)
    with pytest.raises(StaleRunError, match="different input"):
        run.evaluate(other, ef.NAME, data, out, workers=0, progress=False)
    res = run.evaluate(other, ef.NAME, data, out, workers=0, progress=False, restart=True)
    assert res["benchmarks"][ef.NAME]["asked"] == 40
    assert res["model"] == os.path.abspath(other) and list(res["benchmarks"]) == [ef.NAME]


def test_answers_of_other_questions_refuse(model, data, tmp_path, bench):
    from mllm.eval import run
    from pipelines.runkey import StaleRunError
    out = tmp_path / "x"
    (out / ef.NAME).mkdir(parents=True)
    (out / ef.NAME / "answers.jsonl").write_text(json.dumps(
        {"question_id": 99, "prompt": "?", "text": "a", "answer_id": "1", "model_id": "m",
         "metadata": {}}) + "\n")
    with pytest.raises(StaleRunError, match="line 1 answers question 99"):
        run.evaluate(model, ef.NAME, data, str(out), workers=0, progress=False)


def test_bad_inputs_are_one_clear_error(model, data, tmp_path, bench):
    from mllm.eval import run
    from pipelines.errors import ConfigError, InputError
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        run.evaluate(model, "nope", data, str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        run.evaluate(model, ef.NAME, data, str(tmp_path / "a"), batch_size=0)
    with pytest.raises(InputError, match="model folder not found"):
        run.evaluate(str(tmp_path / "none"), ef.NAME, data, str(tmp_path / "a"))
    # a corrupt image names the question and the file
    bad = ef.write_benchmark(str(tmp_path / "bad"), n=6)
    with open(os.path.join(bad, ef.NAME, "images", "img0004.jpg"), "wb") as f:
        f.write(b"<html>not an image</html>")
    with pytest.raises(InputError, match=r"img0004\.jpg: question 4: image not readable"):
        run.evaluate(model, ef.NAME, bad, str(tmp_path / "b"), batch_size=2, workers=2, progress=False)
    # the questions before it were kept: a rerun after fixing the file resumes
    assert len(_lines(str(tmp_path / "b" / ef.NAME / "answers.jsonl"))) == 4
