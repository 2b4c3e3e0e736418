"""The model card (mllm.lineage) on real pipeline outputs: a select run's coreset, the
stage-1 caption table built from it, and a Bunny-695K mix built from synthetic sources
in the real formats. Every sha256, row count and reject tally in the card is checked
against the files themselves (hashlib, pyarrow, the rejects tables), not against the
stats the card was made from."""
from __future__ import annotations

import collections
import hashlib
import os

import pyarrow.parquet as pq
import pytest

from mllm import lineage
from pipelines.mix import build, recipe, stage1
from pipelines.synth import embeddings as synth_emb
from pipelines.synth import mix as synth_mix
from pipelines import manifest, select


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def reason_codes(path: str) -> dict[str, int]:
    return dict(collections.Counter(r.split(":", 1)[0] for r in pq.read_table(path).column("reason").to_pylist()))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    synth_emb.generate(synth_emb.SynthConfig(n=3000, dim=64, shards=2, avg_cluster=600), str(root / "emb"),
                       progress=False)
    select.run(select.SelectConfig(k=3), str(root / "emb"), str(root / "select"), progress=False)
    man = str(root / "manifest.json")
    stage1.run(stage1.Stage1Config(manifest=man), str(root / "select" / "coreset.parquet"), str(root / "stage1"))
    src = str(root / "mix-source")
    synth_mix.write_sources(src, scale=0.0005, max_images=8)
    r = recipe.load(synth_mix.write_recipe(src, "bunny-695k"))
    build.run(r, str(root / "mix"))
    built = manifest.load(str(root / "mix" / "manifest.json"))
    stage1.add_to_manifest(man, "mix", built.table_path("mix"), built.images("mix"),
                           config={"recipe": r.to_dict()})
    return root, man


def test_card_carries_manifest_table_and_coreset_hashes_and_counts(pipeline, tmp_path):
    root, man = pipeline
    data = {**lineage.data_section(man, "stage1", 1), **lineage.data_section(man, "mix", 2)}
    folder = str(tmp_path / "model")
    os.makedirs(folder)
    doc = lineage.update(folder, data=data)
    card = open(os.path.join(folder, "README.md")).read()
    assert lineage.read(folder) == doc

    s1, mx = data["stage1"], data["stage2"]
    assert s1["manifest"]["sha256"] == mx["manifest"]["sha256"] == sha(man)
    stage1_table = str(root / "stage1" / "stage1.parquet")
    mix_table = str(root / "mix" / "mix.parquet")
    assert s1["table"]["sha256"] == sha(stage1_table)
    assert s1["table"]["rows"] == pq.ParquetFile(stage1_table).metadata.num_rows
    assert mx["table"]["sha256"] == sha(mix_table)
    assert mx["table"]["rows"] == pq.ParquetFile(mix_table).metadata.num_rows
    for digest in (sha(man), sha(stage1_table), sha(mix_table)):
        assert digest in card

    coreset = str(root / "select" / "coreset.parquet")
    c = s1["coreset"]
    assert c["sha256"] == sha(coreset) and c["sha256"] in card
    assert c["rows"] == pq.ParquetFile(coreset).metadata.num_rows > 0
    assert f"({c['rows']} rows, sha256 `{c['sha256']}`)" in card
    # Rejects by stage and reason: those of the select run's rejects table.
    rejects = pq.read_table(str(root / "select" / "rejects.parquet")).to_pylist()
    tally = collections.defaultdict(collections.Counter)
    for r in rejects:
        tally[r["stage"]][r["reason"]] += 1
    assert c["rejects_by_stage"] == {k: dict(v) for k, v in tally.items()}
    assert c["funnel"]["input"] == c["rows"] + len(rejects) == 3000
    for where, reasons in tally.items():
        line = f"| coreset rejects, {where} | " + ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items()))
        assert line in card


def test_card_carries_caption_table_and_mix_counts_and_reject_tallies(pipeline, tmp_path):
    root, man = pipeline
    data = {**lineage.data_section(man, "stage1", 1), **lineage.data_section(man, "mix", 2)}
    folder = str(tmp_path / "model")
    os.makedirs(folder)
    lineage.update(folder, data=data)
    card = open(os.path.join(folder, "README.md")).read()

    cap = data["stage1"]["stage1_table"]
    rows = pq.ParquetFile(str(root / "stage1" / "stage1.parquet")).metadata.num_rows
    cap_rejects = pq.read_table(str(root / "stage1" / "stage1_rejects.parquet")).num_rows
    assert (cap["kept"], cap["rejected"], cap["input"]) == (rows, cap_rejects, rows + cap_rejects)
    assert f"| caption table | input {cap['input']}, kept {rows}, rejected {cap_rejects} |" in card

    m = data["stage2"]["mix"]
    kept = pq.ParquetFile(str(root / "mix" / "mix.parquet")).metadata.num_rows
    codes = reason_codes(str(root / "mix" / "rejects.parquet"))
    assert m["kept"] == kept and m["rejected"] == sum(codes.values()) > 0
    assert m["reasons"] == codes  # every reject counted under its reason code
    assert m["input"] == kept + m["rejected"]
    text_only = sum(1 for h in pq.read_table(str(root / "mix" / "mix.parquet")).column("has_image").to_pylist()
                    if not h)
    assert m["text_only"] == text_only > 0
    assert (f"| mix (recipe bunny-695k) | input {m['input']}, kept {kept}, rejected {m['rejected']}, "
            f"text-only {text_only} |") in card
    assert "| mix rejects | " + ", ".join(f"{k} {v:,}" for k, v in sorted(codes.items())) + " |" in card
    by_source = collections.Counter(pq.read_table(str(root / "mix" / "mix.parquet")).column("source").to_pylist())
    for name, src in m["sources"].items():
        assert src["kept"] == by_source[name]
        assert f"| mix source {name} | input {src['input']}, kept {src['kept']}, rejected {src['rejected']} |" in card


def test_update_merges_sections_and_keeps_eval_rendering(tmp_path):
    folder = str(tmp_path)
    lineage.update(folder, training={"stage1": {"final_loss": 1.5}})
    lineage.update(folder, training={"stage2": {"final_loss": 0.5}},
                   eval={"pope": {"scores": {"f1": 0.8, "by_split": {"random": 0.9}}, "data": "x"}})
    doc = lineage.read(folder)
    assert doc["training"] == {"stage1": {"final_loss": 1.5}, "stage2": {"final_loss": 0.5}}
    card = open(os.path.join(folder, "README.md")).read()
    assert "| pope | f1 | 0.8 |" in card and "| pope | by_split.random | 0.9 |" in card
    assert "### stage1" in card and "### stage2" in card
