"""`warren eval score` end to end (a real subprocess per benchmark: one JSON object on
stdout with the hand-computed scores), its one-line errors (exit 2), and the run form's
wiring to mllm.eval.run.evaluate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from flows import cli
from mllm.eval import scoring
from mllm.eval.benchmarks import fixtures as fx
from mllm.eval.types import REGISTRY
from test_eval_scorers import CASES

WARREN = os.path.join(os.path.dirname(sys.executable), "warren")


def warren(*args):
    return subprocess.run([WARREN, *args], capture_output=True, text=True, timeout=300)


def write_case(name, root):
    texts, expected = CASES[name](str(root))
    b = REGISTRY[name]()
    questions = [it.question for it in b.items(b.root(str(root)))]
    answers = fx.write_answers(str(root / "answers.jsonl"), questions, texts)
    return answers, expected, b.result(str(root), scoring.read_answers(answers)).n


@pytest.mark.parametrize("name", sorted(CASES))
def test_score_prints_one_json_object(tmp_path, name):
    answers, expected, n = write_case(name, tmp_path)
    proc = warren("eval", "score", "--benchmark", name, "--data", str(tmp_path), "--answers", answers)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {"benchmark": name, "n": n, "scores": expected}


def test_score_errors_are_one_line_exit_2(tmp_path):
    answers, _, _ = write_case("gqa", tmp_path)
    good = open(answers).read().splitlines()

    def fails(lines, pattern, *extra):
        path = tmp_path / "bad.jsonl"
        path.write_text("".join(line + "\n" for line in lines))
        proc = warren("eval", "score", "--benchmark", "gqa", "--data", str(tmp_path), "--answers",
                      str(path), *extra)
        assert proc.returncode == 2 and proc.stdout == ""
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert pattern in proc.stderr, proc.stderr

    fails(good[:2] + ['{"question_id": "203", "text": "le'] + good[3:], "bad.jsonl: line 3: not valid JSON")
    fails(good + ['{"question_id": "999", "text": "x"}'], "line 7: question_id '999' is not a question of gqa")
    fails(good[1:], "no answer for 1 of 5 gqa questions (first: '201')")
    fails(good + [good[0]], "line 7: a second answer for question '201' (first at line 1)")
    fails(good[:1] + [json.dumps({"question_id": "202", "text": 7})] + good[2:],
          "line 2: 'text' is int, expected str")
    proc = warren("eval", "score", "--benchmark", "gqa", "--data", str(tmp_path), "--answers",
                  str(tmp_path / "none.jsonl"))
    assert proc.returncode == 2 and "none.jsonl: answers file not found" in proc.stderr
    proc = warren("eval", "score", "--benchmark", "nope", "--data", str(tmp_path), "--answers", answers)
    assert proc.returncode == 2 and "unknown benchmark 'nope' (known: gqa, hateful_memes" in proc.stderr
    # --limit: the first two questions only; answers past them are not an error
    proc = warren("eval", "score", "--benchmark", "gqa", "--data", str(tmp_path), "--answers", answers,
                  "--limit", "2")
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"benchmark": "gqa", "n": 2,
                                                                 "scores": {"accuracy": 100.0}}


def test_run_form_needs_its_flags_and_an_engine(tmp_path, capsys, monkeypatch):
    assert cli.main(["eval", "--benchmark", "pope"]) == 2
    assert "missing --model, --data, --output" in capsys.readouterr().err
    assert cli.main(["eval", "--model", "m", "--benchmark", "pope,popx", "--data", str(tmp_path),
                     "--output", str(tmp_path / "o")]) == 2
    assert "no pope files: expected pope/llava_pope_test.jsonl" in capsys.readouterr().err
    fx.write_pope(str(tmp_path), [{"image": "a.jpg", "question": "Is there a cat in the image?",
                                   "label": "no", "category": "random"}])
    assert cli.main(["eval", "--model", "m", "--benchmark", "pope,popx", "--data", str(tmp_path),
                     "--output", str(tmp_path / "o")]) == 2
    assert "unknown benchmark 'popx'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "mllm.eval.run", None)          # an install without the engine
    assert cli.main(["eval", "--model", "m", "--benchmark", "pope", "--data", str(tmp_path),
                     "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no evaluation engine (mllm.eval.run)" in err


def test_run_form_passes_every_flag_to_evaluate(tmp_path, capsys, monkeypatch):
    calls = []
    engine = types.ModuleType("mllm.eval.run")
    engine.evaluate = lambda **kw: calls.append(kw) or {"pope": {"average_f1": 0.5}}
    monkeypatch.setitem(sys.modules, "mllm.eval.run", engine)
    case_root = str(tmp_path / "eval")
    CASES["pope"](case_root)
    CASES["gqa"](case_root)
    assert cli.main(["eval", "--model", "m", "--benchmark", "pope, gqa", "--data", case_root, "--output",
                     "o", "--batch-size", "4", "--workers", "0", "--limit", "10", "--device", "cpu"]) == 0
    assert calls == [dict(model="m", benchmarks=["pope", "gqa"], data=case_root, output="o", batch_size=4,
                          workers=0, limit=10, device="cpu", progress=True, restart=False,
                          max_new_tokens=None)]
    assert json.loads(capsys.readouterr().out) == {"pope": {"average_f1": 0.5}}
