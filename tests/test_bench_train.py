"""bench/train.py runs end to end on the tiny model and reports the (a)(b)(c) table from
the contenders' own measurements."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_reports_a_b_c(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "train.py"), "--preset", "tiny", "--samples", "40",
           "--answer-words", "8", "--max-length", "128", "--steps", "3", "--warmup", "1", "--lora-r", "4",
           "--threads", "1", "--clock", "cpu", "--workdir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    doc = json.loads(text[text.index("\n{") + 1:])
    results = doc["results"]
    assert set(results) == {"warren", "hf", "hf-sup", "warren-full", "warren-nocast"}
    tokens = {r["tokens_per_step"] for r in results.values()}
    assert len(tokens) == 1 and tokens.pop() > 0  # every contender timed the same batches
    for tag, num, den in (("(a)", "warren", "hf"), ("(b)", "warren", "hf-sup"), ("(c)", "warren-full", "hf")):
        ratio = results[num]["tokens_per_s"] / results[den]["tokens_per_s"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {tag}"))
        assert re.search(rf"\| {ratio:.2f}x \|", row), row
    assert doc["config"]["clock"] == "cpu"
