"""The README's polars snippet runs as written against a real select run."""
import os
import re

from pipelines import select
from pipelines.synth import embeddings as synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snippet(name: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"snippet {name} missing from README.md"
    return m.group(1)


def test_readme_select_snippet_runs(tmp_path, capsys, monkeypatch):
    synth.generate(synth.SynthConfig(n=3000, dim=64, shards=2, avg_cluster=600), str(tmp_path / "src"),
                   progress=False)
    select.run(select.SelectConfig(k=3), str(tmp_path / "src"), str(tmp_path / "runs" / "select"),
               progress=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet("select-polars"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "dedup" in out and "duplicate" in out and "kept_uid" in out
