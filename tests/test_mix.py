"""The instruction mix on synthetic sources written in the real release formats."""
import glob
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter

import polars as pl
import pyarrow.parquet as pq
import pytest

from mllm.templates import check_conversation
from pipelines import manifest, schemas
from pipelines.errors import ConfigError, InputError
from pipelines.mix import build, export, readers, recipe
from pipelines.synth import mix as synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 0.001                   # 625 image + 40 ShareGPT per 665K file, 70 WizardLM
C = synth.counts(SCALE)
SVIT, WIZ, LLAVA = "svit-mix-665k", "wizardlm-evol-instruct-70k", "llava-665k"
POLICY = {"excluded", "duplicate", "duplicate_id", "sampled_out"}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return synth.write_sources(str(tmp_path_factory.mktemp("mixsrc")), scale=SCALE, seed=3)


@pytest.fixture(scope="module")
def truth(src):
    return json.load(open(src["truth"]))


@pytest.fixture(scope="module")
def run695(src, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mix695"))
    r = recipe.load(os.path.join(ROOT, "configs", "mix", "bunny-695k.yaml"), data_root=src["root"])
    stats = build.run(r, out)
    return out, stats


def tables(out):
    return pl.read_parquet(os.path.join(out, "mix.parquet")), pl.read_parquet(os.path.join(out, "rejects.parquet"))


def planted(truth, fname):
    return {t["row"]: t for t in truth["planted"] if t["file"] == fname}


def clean_ids(path, fname, truth, fmt_id):
    """Ids of the clean (not planted) records of a source file, by part."""
    bad = planted(truth, fname)
    image, text = set(), set()
    for row, obj in enumerate(json.load(open(path))):
        if row in bad:
            continue
        rid = fmt_id(row, obj)
        (image if "image" in obj else text).add(rid)
    return image, text


def code(reason):
    return reason.split(":", 1)[0]


# ----------------------------------------------------------------- Bunny-695K

def test_bunny_695k_counts_are_665_minus_40_plus_70_scaled(run695, src, truth):
    out, stats = run695
    mix, _ = tables(out)
    assert (C["image"], C["sharegpt"], C["wizardlm"]) == (625, 40, 70)
    assert mix.height == stats["kept"] == 625 + 70 == 695
    assert dict(Counter(mix["source"].to_list())) == {SVIT: 625, WIZ: 70}
    svit_img, svit_text = clean_ids(src["svit"], synth.SVIT, truth, lambda r, o: o["id"])
    _, wiz = clean_ids(src["wizardlm"], synth.WIZARD, truth, lambda r, o: f"{WIZ}-{r}")
    assert len(svit_text) == 40 and all(re.fullmatch(r"[A-Za-z0-9]{7}_\d", i) for i in svit_text)
    assert set(mix["id"].to_list()) == svit_img | wiz


def test_text_only_records_carry_no_image(run695):
    out, stats = run695
    mix, _ = tables(out)
    text = mix.filter(~pl.col("has_image"))
    assert text["image"].null_count() == text.height == 70
    assert set(text["source"].to_list()) == {WIZ}
    img = mix.filter(pl.col("has_image"))
    assert img["image"].null_count() == 0
    assert all(not ("<image>" in t["value"]) for conv in text["conversations"].to_list() for t in conv)
    assert stats["text_only"] == 70 and stats["text_only_share"] == pytest.approx(70 / 695, abs=1e-6)


def test_every_planted_record_is_rejected_with_its_reason(run695, truth):
    out, stats = run695
    _, rej = tables(out)
    bad = rej.filter(~pl.col("reason").map_elements(code, return_dtype=pl.String).is_in(list(POLICY - {"duplicate", "duplicate_id"})))
    got = Counter((r["source"], r["id"], code(r["reason"])) for r in bad.iter_rows(named=True))
    names = {synth.SVIT: SVIT, synth.WIZARD: WIZ}
    want = Counter((names[t["file"]], t["id"], t["reason"]) for t in truth["planted"] if t["file"] in names)
    assert got == want
    assert len(want) >= 20 and {"malformed_json"} - {c for _, _, c in want} == {"malformed_json"}
    # the ShareGPT part is dropped by the recipe's rule, with the rule named, and nothing else is
    excl = rej.filter(pl.col("reason") == "excluded: sharegpt")
    assert excl.height == 40 and set(excl["source"].to_list()) == {SVIT}
    # bad records keep their raw text for inspection; policy drops do not repeat it
    policy = bad["reason"].map_elements(code, return_dtype=pl.String).is_in(list(POLICY))
    assert bad.filter(~policy)["record"].null_count() == 0 and bad.filter(policy)["record"].null_count() == 2
    assert excl["record"].null_count() == 40


def test_input_equals_kept_plus_rejected_per_source(run695, src):
    out, stats = run695
    mix, rej = tables(out)
    for name, path in ((SVIT, src["svit"]), (WIZ, src["wizardlm"])):
        n_input = len(json.load(open(path)))
        kept = mix.filter(pl.col("source") == name).height
        rejected = rej.filter(pl.col("source") == name).height
        assert n_input == kept + rejected
        assert stats["sources"][name] == {"input": n_input, "kept": kept, "rejected": rejected,
                                          "reasons": dict(sorted(Counter(code(r) for r in rej.filter(
                                              pl.col("source") == name)["reason"].to_list()).items()))}


def test_outputs_have_the_explicit_schemas_and_a_verified_manifest(run695, src):
    out, stats = run695
    assert pq.read_schema(os.path.join(out, "mix.parquet")).remove_metadata() == schemas.MIX
    assert pq.read_schema(os.path.join(out, "rejects.parquet")).remove_metadata() == schemas.MIX_REJECTS
    m = manifest.load(os.path.join(out, "manifest.json"), verify=True)
    assert m.entry("mix")["rows"] == 695
    assert m.images("mix") == {"kind": "files", "path": os.path.abspath(src["image_root"])}
    assert m.doc["config"]["mix"]["name"] == "bunny-695k"
    saved = json.load(open(os.path.join(out, "stats.json")))
    assert saved["kept"] == 695 and sum(saved["length_histogram"]["bins"].values()) == 695
    assert sum(saved["turns_histogram"].values()) == 695


def test_every_kept_record_is_trainable_and_its_image_exists(run695, src):
    out, _ = run695
    mix, _ = tables(out)
    for row in mix.iter_rows(named=True):
        assert check_conversation(row["conversations"], row["has_image"]) is None, row["id"]
        assert row["n_turns"] == len(row["conversations"])
        if row["has_image"]:
            assert os.path.isfile(os.path.join(src["image_root"], row["image"]))


def test_rerun_skips_prepared_sources_and_gives_the_same_mix(run695, src):
    out, stats = run695
    before = open(os.path.join(out, "mix.parquet"), "rb").read()
    r = recipe.load(os.path.join(ROOT, "configs", "mix", "bunny-695k.yaml"), data_root=src["root"])
    again = build.run(r, out)
    assert again["seconds"]["prepare"] == stats["seconds"]["prepare"]      # read from the markers
    assert open(os.path.join(out, "mix.parquet"), "rb").read() == before
    assert not [p for p in glob.glob(os.path.join(out, "**", ".*tmp*"), recursive=True)]


# ----------------------------------------------------------------- other recipes

def test_bunny_llava_1_4m_is_the_concatenation(src, truth, tmp_path):
    r = recipe.load(os.path.join(ROOT, "configs", "mix", "bunny-llava-1.4m.yaml"), data_root=src["root"])
    stats = build.run(r, str(tmp_path))
    mix, rej = tables(str(tmp_path))
    # dedup off: SVIT's planted exact duplicate stays; LLaVA-665K comes in whole, ShareGPT included
    assert dict(Counter(mix["source"].to_list())) == {SVIT: 626, WIZ: 70, LLAVA: 625 + 40}
    assert mix.height == 695 + 1 + 665
    llava = mix.filter(pl.col("source") == LLAVA)
    assert all(i.startswith("llava665k/") for i in llava["id"].to_list())
    assert llava.filter(~pl.col("has_image")).height == 40
    got = Counter((r["id"], code(r["reason"])) for r in rej.filter(pl.col("source") == LLAVA).iter_rows(named=True))
    assert got == Counter((t["id"], t["reason"]) for t in truth["planted"] if t["file"] == synth.LLAVA)
    assert mix["id"].is_unique().all()
    n = len(json.load(open(src["llava"])))
    assert stats["sources"][LLAVA]["input"] == n == stats["sources"][LLAVA]["kept"] + stats["sources"][LLAVA]["rejected"]


def test_exact_dedup_across_sources_drops_the_shared_vqa_part(src, tmp_path):
    doc = synth.RECIPES["bunny-llava-1.4m"] | {"dedup": "exact"}
    r = recipe.from_dict(doc, data_root=src["root"])
    stats = build.run(r, str(tmp_path))
    mix, rej = tables(str(tmp_path))
    # LLaVA keeps LLaVA-Instruct (its own part) and the ShareGPT part (SVIT's was excluded
    # before dedup); its VQA part repeats SVIT's and goes, each naming the id it repeats
    assert dict(Counter(mix["source"].to_list())) == {SVIT: 625, WIZ: 70, LLAVA: C["svit_core"] + 40}
    dups = rej.filter((pl.col("source") == LLAVA) & pl.col("reason").str.starts_with("duplicate:"))
    assert dups.height == 625 - C["svit_core"]
    kept_svit = set(mix.filter(pl.col("source") == SVIT)["id"].to_list())
    for rid, reason in dups.select("id", "reason").iter_rows():
        assert rid.removeprefix("llava665k/") in kept_svit and reason.endswith(rid.removeprefix("llava665k/"))
    assert stats["reasons"]["duplicate"] == dups.height + 1     # + SVIT's planted duplicate


def test_jsonl_source_with_malformed_lines(src, truth, tmp_path):
    r = recipe.from_dict({"name": "own", "image_root": None, "sources": [
        {"name": "own", "path": src["own"], "format": "wizardlm"}]})
    stats = build.run(r, str(tmp_path))
    mix, rej = tables(str(tmp_path))
    want = Counter((t["id"], t["reason"]) for t in truth["planted"] if t["file"] == synth.OWN)
    assert Counter((i, code(x)) for i, x in rej.select("id", "reason").iter_rows()) == want
    assert want[(None, "malformed_json")] == 2
    n_lines = len(open(src["own"]).read().splitlines())
    assert stats["sources"]["own"]["input"] == n_lines == mix.height + rej.height
    assert mix.height == C["own"] and not stats["images_checked"]
    assert mix["id"].to_list()[:2] == ["own_0", "own_1"]


def test_count_and_fraction_are_exact_seeded_and_order_free(src, tmp_path):
    wiz = json.load(open(src["wizardlm"]))
    clean = [o for o in wiz if isinstance(o, dict) and o.get("output") and isinstance(o.get("instruction"), str)
             and "<image>" not in o["instruction"]]
    assert len(clean) == 70
    for o in clean:
        o["idx"] = f"w{hash(o['instruction']) & 0xffffff}-{len(o['output'])}-{o['output'][:12]}"
    shuffled = clean[:]
    random.Random(1).shuffle(shuffled)
    for name, items in (("a.json", clean), ("b.json", shuffled)):
        (tmp_path / name).write_text(json.dumps(items))

    def build_ids(path, seed, **take):
        out = tmp_path / ("out-" + "-".join([os.path.basename(path), str(seed)] + [f"{k}{v}" for k, v in take.items()]))
        r = recipe.from_dict({"name": "t", "seed": seed, "sources": [
            {"name": "w", "path": str(path), "format": "wizardlm", **take}]})
        stats = build.run(r, str(out))
        mix, rej = tables(str(out))
        assert stats["sources"]["w"]["input"] == 70 == mix.height + rej.height
        assert set(code(x) for x in rej["reason"].to_list()) <= {"sampled_out"}
        return set(mix["id"].to_list())

    a0 = build_ids(tmp_path / "a.json", 0, count=25)
    assert len(a0) == 25
    assert build_ids(tmp_path / "b.json", 0, count=25) == a0                 # file order does not matter
    assert build_ids(tmp_path / "a.json", 1, count=25) != a0                 # the seed does
    half = build_ids(tmp_path / "a.json", 0, fraction=0.5)
    assert len(half) == 35 and a0 <= half                                    # nested: smallest keys first
    with pytest.raises(InputError, match="count 71 .* only 70"):
        build_ids(tmp_path / "a.json", 0, count=71)


def test_include_and_exclude_rules(src, tmp_path):
    r = recipe.from_dict({"name": "t", "image_root": "images", "sources": [
        {"name": "s", "path": synth.SVIT, "format": "llava",
         "include": [{"image": r"^coco/"}, {"id": r"[A-Za-z0-9]{7}_\d"}],
         "exclude": [{"name": "no-long-chats", "has_image": False, "id": r".*_[12]"}]}]}, data_root=src["root"])
    build.run(r, str(tmp_path))
    mix, rej = tables(str(tmp_path))
    ids = mix["id"].to_list()
    assert all(i.endswith("_0") for i in mix.filter(~pl.col("has_image"))["id"].to_list())
    assert mix.filter(pl.col("has_image"))["image"].str.starts_with("coco/").all()
    reasons = set(rej["reason"].to_list())
    assert "excluded: matches no include rule" in reasons and "excluded: no-long-chats" in reasons
    assert len(ids) > 0


# ----------------------------------------------------------------- readers

def test_json_list_parser_matches_json_load_at_any_chunk_size(tmp_path):
    items = [{"id": "a", "v": "[not] {a} \"list\" , ]"}, 12345678901234, -0.5e-3, "x", None, True,
             [1, [2, {"k": "]"}]], {"id": "é☃", "n": 1.0}]
    p = tmp_path / "l.json"
    p.write_text("  [\n" + " ,\n".join(json.dumps(i, ensure_ascii=False) for i in items) + "\n]\n")
    for chunk in (1, 2, 3, 7, 64, 1 << 20):
        got = [obj for _, obj, _ in readers.iter_json_list(str(p), chunk_chars=chunk)]
        assert got == items, chunk
    (tmp_path / "e.json").write_text("[]")
    assert list(readers.iter_json_list(str(tmp_path / "e.json"))) == []


@pytest.mark.parametrize("text, match", [
    ('[{"id": 1}, {"id": 2}', "ends without"),
    ('[{"id": 1}, {"id": 2,}]', "record 1 is not valid JSON"),
    ('[{"id": 1} {"id": 2}]', "expected ','"),
    ('[{"id": 1},, {"id": 2}]', "unexpected ','"),
    ('[{"id": 1}] [', "extra data"),
])
def test_broken_json_list_is_one_clear_error_naming_the_file(tmp_path, text, match):
    p = tmp_path / "broken.json"
    p.write_text(text)
    with pytest.raises(InputError, match=match) as e:
        list(readers.iter_json_list(str(p), chunk_chars=4))
    assert "broken.json" in str(e.value)


def test_sharegpt_roles_and_messages_form(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(json.dumps(o) for o in [
        {"id": "m1", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"id": "m2", "conversations": [{"from": "human", "value": "Q"}, {"from": "chatgpt", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    ]) + "\n\n")
    got = list(readers.read(str(p), "sharegpt", "s"))
    assert [g.conversations for g in got[:2]] == [
        [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]]
    assert isinstance(got[2], readers.Bad) and got[2].reason == "missing_field" and len(got) == 3


# ----------------------------------------------------------------- recipes

def test_every_mix_recipe_in_the_repo_loads_and_names_its_command():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "mix", "**", "*.yaml"), recursive=True))
    assert len(files) >= 2
    for f in files:
        first = open(f).readline()
        assert first.startswith("# warren mix --recipe configs/mix/") and "--output" in first, f
        r = recipe.load(f)
        assert r.sources and all(os.path.isabs(s.path) for s in r.sources)


@pytest.mark.parametrize("name", sorted(synth.RECIPES))
def test_synth_recipes_match_the_configs(name, tmp_path):
    cfg = recipe.load(os.path.join(ROOT, "configs", "mix", f"{name}.yaml"), data_root=str(tmp_path))
    path = synth.write_recipe(str(tmp_path), name)
    mine = recipe.load(path)
    assert dataclasses_equal(cfg, mine)


def dataclasses_equal(a, b):
    da, db = a.to_dict(), b.to_dict()
    da.pop("path"), db.pop("path")
    return da == db


def test_recipe_problems_are_collected_and_unknown_keys_named():
    with pytest.raises(ConfigError) as e:
        recipe.from_dict({"name": "x", "sead": 1, "dedup": "fuzzy", "sources": [
            {"name": "a", "path": "a.json", "format": "alpaca", "count": 3, "fraction": 0.5, "colour": 1},
            {"name": "a", "path": "b.json", "exclude": [{"idd": "x"}, {"id": "("}]}]})
    msg = str(e.value)
    for part in ("unknown key 'sead'", "unknown key 'colour'", "format must be one of",
                 "count or fraction, not both", "unknown key 'idd'", "not a valid regular expression"):
        assert part in msg, part
    with pytest.raises(ConfigError, match="unique"):
        recipe.from_dict({"name": "x", "sources": [{"name": "a", "path": "a"}, {"name": "a", "path": "b"}]})
    with pytest.raises(ConfigError, match="dedup must be"):
        recipe.from_dict({"name": "x", "dedup": "fuzzy", "sources": [{"name": "a", "path": "a"}]})


# ----------------------------------------------------------------- export, docs, CLI

def test_export_llava_round_trips(run695, tmp_path):
    out, _ = run695
    mix, _ = tables(out)
    for name in ("mix.json", "mix.jsonl"):
        n = export.to_llava(os.path.join(out, "mix.parquet"), str(tmp_path / name))
        assert n == 695
        back = list(readers.read(str(tmp_path / name), "llava", "x"))
        assert [(b.id, b.image, b.conversations) for b in back] == list(
            zip(mix["id"].to_list(), mix["image"].to_list(), mix["conversations"].to_list()))
    first = json.load(open(tmp_path / "mix.json"))
    assert sum("image" in o for o in first) == 625


def test_docs_polars_snippet_runs(run695, tmp_path, monkeypatch, capsys):
    out, _ = run695
    text = open(os.path.join(ROOT, "docs", "mix.md")).read()
    m = re.search(r"<!-- snippet: mix-polars -->\s*```python\n(.*?)```", text, re.S)
    assert m, "snippet mix-polars missing from docs/mix.md"
    os.makedirs(tmp_path / "runs")
    os.symlink(out, tmp_path / "runs" / "mix-695k")
    monkeypatch.chdir(tmp_path)
    exec(compile(m.group(1), "docs/mix.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "List(Struct" in printed and "svit-mix-665k" in printed and "excluded" in printed


def test_cli_builds_and_bad_input_is_one_line(src, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "flows.cli", "mix", "--recipe", "configs/mix/bunny-695k.yaml",
           "--data-root", src["root"], "--output", str(tmp_path / "o"), "--quiet",
           "--export-llava", str(tmp_path / "o" / "llava.json")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["kept"] == 695 and summary["exported"] == 695
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsources:\n  - {name: a, path: nowhere.json}\n")
    p = subprocess.run([sys.executable, "-m", "flows.cli", "mix", "--recipe", str(bad), "--output",
                        str(tmp_path / "o2")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("warren mix: error:") and "nowhere.json" in p.stderr
    assert "Traceback" not in p.stderr


def test_pipelines_mix_never_imports_prefect():
    code_ = ("import sys; sys.modules['prefect'] = None\n"
             "import pipelines.mix.build, pipelines.mix.export, pipelines.mix.stage1, pipelines.synth.mix\n"
             "print('ok')")
    p = subprocess.run([sys.executable, "-c", code_], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_fields_rule_and_byte_order_mark(tmp_path):
    # a file that marks its parts with a field (as some SVIT-mix copies do), with a BOM
    items = [{"id": f"r{i}", "source": "sharegpt" if i % 3 == 0 else "svit",
              "conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]}
             for i in range(12)]
    (tmp_path / "m.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(items).encode())
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(o) for o in items).encode())
    for name in ("m.json", "m.jsonl"):
        r = recipe.from_dict({"name": "t", "sources": [{"name": "m", "path": str(tmp_path / name),
                                                         "exclude": [{"fields": {"source": "sharegpt"}}]}]})
        stats = build.run(r, str(tmp_path / f"o-{name}"))
        mix, rej = tables(str(tmp_path / f"o-{name}"))
        assert mix["id"].to_list() == [f"r{i}" for i in range(12) if i % 3]
        assert rej["reason"].to_list() == ["excluded: source='sharegpt'"] * 4 and stats["kept"] == 8


def test_changing_the_seed_redoes_the_prepared_sources(tmp_path):
    items = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": "A"}]}
             for i in range(40)]
    (tmp_path / "s.json").write_text(json.dumps(items))
    picks = []
    for seed in (0, 1, 0):
        r = recipe.from_dict({"name": "t", "seed": seed, "sources": [
            {"name": "s", "path": str(tmp_path / "s.json"), "count": 10}]})
        build.run(r, str(tmp_path / "out"))                 # the same folder each time
        picks.append(set(tables(str(tmp_path / "out"))[0]["id"].to_list()))
    assert picks[0] == picks[2] != picks[1] and all(len(p) == 10 for p in picks)
