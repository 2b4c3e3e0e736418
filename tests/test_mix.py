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
from pipelines import manifest, runkey, schemas
from pipelines.errors import ConfigError, InputError
from pipelines.mix import build, export, readers, recipe
from pipelines.synth import mix as synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 0.001                   # 625 image + 40 ShareGPT per 665K file, 70 WizardLM
C = synth.counts(SCALE)
SVIT, WIZ, LLAVA = "svit-mix-665k", "wizardlm-evol-instruct-70k", "llava-665k"


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


def elements(path):
    """The elements of a source file, parsed by the standard library (bytes that are not
    UTF-8 kept as escapes, as a reader that does not give up on one record must)."""
    text = open(path, "rb").read().decode("utf-8", "surrogateescape")
    if text.lstrip().startswith("["):
        return json.loads(text)
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append(line)
    return out


def outcomes(path, fname, name, truth, text_only="kept"):
    """uid -> "kept" or the expected reason code, for every element of a source file:
    planted records as the truth says, clean ones kept (text-only ones `text_only`)."""
    bad = planted(truth, fname)
    out = {}
    for row, obj in enumerate(elements(path)):
        if row in bad:
            t = bad[row]
            out[f"{name}:{row}"] = "excluded" if (t["reason"] == "kept" and text_only == "excluded"
                                                   and not t["has_image"]) else t["reason"]
        else:
            out[f"{name}:{row}"] = "kept" if (text_only == "kept" or "image" in obj) else text_only
    return out


def code(reason):
    return reason.split(":", 1)[0]


def got_outcomes(mix, rej, name):
    got = {u: "kept" for u in mix.filter(pl.col("source") == name)["uid"].to_list()}
    for u, r in rej.filter(pl.col("source") == name).select("uid", "reason").iter_rows():
        assert u not in got, u                                  # in exactly one of the two
        got[u] = code(r)
    return got


# ----------------------------------------------------------------- Bunny-695K

def test_bunny_695k_counts_are_665_minus_40_plus_70_scaled(run695, src, truth):
    out, stats = run695
    mix, _ = tables(out)
    assert (C["image"], C["sharegpt"], C["wizardlm"]) == (625, 40, 70)
    assert mix.height == stats["kept"] == 625 + 70 == 695
    assert dict(Counter(mix["source"].to_list())) == {SVIT: 625, WIZ: 70}
    want = outcomes(src["svit"], synth.SVIT, SVIT, truth, text_only="excluded")
    want |= outcomes(src["wizardlm"], synth.WIZARD, WIZ, truth)
    assert set(mix["uid"].to_list()) == {u for u, o in want.items() if o == "kept"}
    assert mix["uid"].is_unique().all()


def test_records_sharing_an_id_are_all_kept(run695, src, truth):
    # as in LLaVA-665K, an image record's id is its image's stem: ids repeat, with other
    # conversations; every one of them stays, under its own uid
    out, _ = run695
    mix, _ = tables(out)
    svit = mix.filter(pl.col("source") == SVIT)
    bad = planted(truth, synth.SVIT)
    file_ids = Counter(o["id"] for row, o in enumerate(elements(src["svit"])) if row not in bad and "image" in o)
    assert Counter(svit["id"].to_list()) == file_ids
    assert max(file_ids.values()) > 1 and len(file_ids) < svit.height
    for row in svit.filter(pl.col("id") == file_ids.most_common(1)[0][0]).iter_rows(named=True):
        assert synth.stem(row["image"]) == row["id"]
    assert stats_reason_codes(out) >= {"duplicate"} and "duplicate_id" not in stats_reason_codes(out)


def stats_reason_codes(out):
    return set(json.load(open(os.path.join(out, "stats.json")))["reasons"])


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


def test_every_record_is_kept_or_rejected_with_its_reason(run695, src, truth):
    out, stats = run695
    mix, rej = tables(out)
    for name, path, fname, text_only in ((SVIT, src["svit"], synth.SVIT, "excluded"),
                                         (WIZ, src["wizardlm"], synth.WIZARD, "kept")):
        want = outcomes(path, fname, name, truth, text_only)
        assert got_outcomes(mix, rej, name) == want
    # the ShareGPT part is dropped by the recipe's rule, with the rule named, and nothing else is
    excl = rej.filter(pl.col("reason") == "excluded: sharegpt")
    assert excl.height == 40 and set(excl["source"].to_list()) == {SVIT}
    assert len(truth["planted"]) >= 40
    assert {"image_unreadable", "bad_text", "bad_role", "duplicate"} <= set(stats["reasons"])


def test_every_reject_row_names_file_row_and_raw_record(run695, src):
    out, _ = run695
    _, rej = tables(out)
    assert rej["record"].null_count() == 0 and rej["row"].null_count() == 0
    files = {SVIT: src["svit"], WIZ: src["wizardlm"]}
    raws = {name: open(p, "rb").read().decode("utf-8", "surrogateescape") for name, p in files.items()}
    parsed = {name: elements(p) for name, p in files.items()}
    for r in rej.iter_rows(named=True):
        assert r["file"] == files[r["source"]] and r["uid"] == f"{r['source']}:{r['row']}"
        want = parsed[r["source"]][r["row"]]
        if r["record"] in raws[r["source"]] and len(r["record"]) < readers.RECORD_TEXT_LIMIT:
            # the raw text is the element exactly as the file has it
            assert json.loads(r["record"]) == want, r
        elif len(r["record"]) == readers.RECORD_TEXT_LIMIT:
            assert r["record"] in raws[r["source"]] and r["id"] == "bad-too-long"     # cut short
        else:
            assert r["reason"].startswith("bad_text") and "\ufffd" in r["record"]    # see below
    # bad text is kept readable: undecodable bytes as U+FFFD, escapes as written
    latin = rej.filter(pl.col("id") == "bad-latin1").row(0, named=True)
    assert latin["reason"].startswith("bad_text: turn 0 holds a byte that is not UTF-8 (0xe9)")
    assert "Caf\ufffd?" in latin["record"]
    surr = rej.filter(pl.col("id") == "bad-lone-surrogate").row(0, named=True)
    assert surr["reason"] == "bad_text: turn 1 holds a lone surrogate (\\ud83d) at character 6"
    assert '"Smile \\ud83d"' in surr["record"]
    # duplicates and excluded records carry their text too, and name what they repeat
    dup = rej.filter(pl.col("reason").str.starts_with("duplicate:")).row(0, named=True)
    first = elements(src["svit"])[0]
    assert dup["reason"] == f"duplicate: same image and conversations as {SVIT}:0 (id {first['id']})"
    assert json.loads(dup["record"])["id"] == "bad-same-content"


def test_image_files_are_checked_at_header_level(run695, truth):
    out, stats = run695
    _, rej = tables(out)
    unreadable = rej.filter(pl.col("reason").str.starts_with("image_unreadable"))
    assert sorted(unreadable["id"].to_list()) == sorted(synth.stem(p) for p in synth.BAD_IMAGES)
    by_id = dict(unreadable.select("id", "reason").iter_rows())
    assert by_id["000000999990"] == "image_unreadable: coco/train2017/000000999990.jpg is empty (0 bytes)"
    assert "truncated" in by_id["000000999991"] and "truncated" in by_id["2999990"]
    assert by_id["7199999990"].startswith("image_unreadable: ocr_vqa/images/7199999990.jpg is not an image")
    # each distinct file was read once, however many records share it
    images = stats["images"]
    assert images["unreadable"] == 4 and images["checked"] < stats["sources"][SVIT]["kept"]


def test_input_equals_kept_plus_rejected_per_source(run695, src):
    out, stats = run695
    mix, rej = tables(out)
    for name, path in ((SVIT, src["svit"]), (WIZ, src["wizardlm"])):
        n_input = len(elements(path))
        kept = mix.filter(pl.col("source") == name).height
        rejected = rej.filter(pl.col("source") == name).height
        assert n_input == kept + rejected
        s = stats["sources"][name]
        assert (s["input"], s["kept"], s["rejected"]) == (n_input, kept, rejected)
        assert s["reasons"] == dict(sorted(Counter(code(r) for r in rej.filter(
            pl.col("source") == name)["reason"].to_list()).items()))


def test_outputs_have_the_explicit_schemas_and_a_verified_manifest(run695, src):
    out, stats = run695
    assert pq.read_schema(os.path.join(out, "mix.parquet")).remove_metadata() == schemas.MIX
    assert pq.read_schema(os.path.join(out, "rejects.parquet")).remove_metadata() == schemas.MIX_REJECTS
    m = manifest.load(os.path.join(out, "manifest.json"), verify=True)
    assert m.entry("mix")["rows"] == 695
    assert m.images("mix") == {"kind": "files", "path": os.path.abspath(src["image_root"])}
    assert m.doc["config"]["mix"]["name"] == "bunny-695k"
    # what the run was made from: every source file and the image root
    assert set(m.doc["inputs"]) == {src["svit"], src["wizardlm"], src["image_root"]}
    assert m.doc["inputs"][src["image_root"]]["files"] == len(glob.glob(os.path.join(src["image_root"], "**", "*.jpg"),
                                                                          recursive=True))
    saved = json.load(open(os.path.join(out, "stats.json")))
    assert saved["kept"] == 695 and sum(saved["length_histogram"]["bins"].values()) == 695
    assert sum(saved["turns_histogram"].values()) == 695 and saved["inputs"] == m.doc["inputs"]


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


# ----------------------------------------------------------------- the quirk files

def test_llava_665k_keeps_shared_ids_and_normalised_records(src, truth, tmp_path):
    r = recipe.from_dict({"name": "llava", "image_root": "images", "sources": [
        {"name": LLAVA, "path": synth.LLAVA}]}, data_root=src["root"])
    stats = build.run(r, str(tmp_path))
    mix, rej = tables(str(tmp_path))
    want = outcomes(src["llava"], synth.LLAVA, LLAVA, truth)
    assert got_outcomes(mix, rej, LLAVA) == want
    n_kept_quirks = sum(t["reason"] == "kept" for t in planted(truth, synth.LLAVA).values())
    assert mix.height == C["svit_core"] + (625 - C["svit_core"]) + 40 + n_kept_quirks == 678
    assert mix["uid"].is_unique().all() and mix["id"].n_unique() < mix.height
    rows = {r["uid"]: r for r in mix.iter_rows(named=True)}
    norm = Counter()
    for row, t in planted(truth, synth.LLAVA).items():
        if t["reason"] != "kept":
            continue
        got, exp = rows[f"{LLAVA}:{row}"], t["expect"]
        assert (got["id"], got["image"], got["system"], got["n_turns"]) == (
            t["id"], exp["image"], exp["system"], exp["n_turns"]), t["quirk"]
        assert got["has_image"] == (exp["image"] is not None)
        assert check_conversation(got["conversations"], got["has_image"]) is None
        norm.update(exp["normalised"])
    # the clean records need no normalisation: the counts are the planted quirks'
    assert stats["sources"][LLAVA]["normalised"] == {n: norm[n] for n in readers.NORM_NAMES.values()}
    assert stats["normalised"]["image_path_normalised"] == 3 and stats["normalised"]["system_kept"] == 2
    lead = rows[next(f"{LLAVA}:{row}" for row, t in planted(truth, synth.LLAVA).items()
                     if t["quirk"] == "ShareGPT: leading gpt and trailing human")]
    assert lead["conversations"] == [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."},
                                     {"from": "human", "value": "Q2?"}, {"from": "gpt", "value": "A2."}]


def test_sharegpt_messages_form(src, truth, tmp_path):
    r = recipe.from_dict({"name": "m", "sources": [
        {"name": "msgs", "path": src["sharegpt"], "format": "sharegpt"}]})
    stats = build.run(r, str(tmp_path))
    mix, rej = tables(str(tmp_path))
    assert got_outcomes(mix, rej, "msgs") == outcomes(src["sharegpt"], synth.SHAREGPT_FILE, "msgs", truth)
    rows = {r["id"]: r for r in mix.iter_rows(named=True)}
    assert rows["m-system"]["system"] == "Be brief." and rows["m-top-system"]["system"] == "Speak French."
    assert rows["m-lead"]["conversations"] == [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]
    assert rows["m-trail"]["n_turns"] == 2 and rows["m-from-value"]["n_turns"] == 2
    n_clean = len(elements(src["sharegpt"])) - len(planted(truth, synth.SHAREGPT_FILE))
    clean_system = sum(1 for n in range(n_clean) if n % 4 in (1, 2))       # see synth: msg_<n>
    assert stats["normalised"]["system_kept"] == clean_system + 2
    reasons = dict(rej.select("id", "reason").iter_rows())
    assert reasons["m-bing"].startswith("bad_role: turn 1 is from 'bing'")
    assert reasons["m-system-inside"] == ("bad_role: turn 2 is a system turn inside the conversation "
                                          "(only a leading system turn is kept)")
    assert reasons["m-latin1"].startswith("bad_text: turn 0 holds a byte that is not UTF-8 (0xff)")


# ----------------------------------------------------------------- other recipes

# ----------------------------------------------------------------- other recipes

def test_bunny_llava_1_4m_is_the_concatenation(src, truth, tmp_path):
    r = recipe.load(os.path.join(ROOT, "configs", "mix", "bunny-llava-1.4m.yaml"), data_root=src["root"])
    stats = build.run(r, str(tmp_path))
    mix, rej = tables(str(tmp_path))
    # dedup off: SVIT's planted exact duplicate stays; LLaVA-665K comes in whole, ShareGPT
    # part and kept quirks included
    assert dict(Counter(mix["source"].to_list())) == {SVIT: 626, WIZ: 70, LLAVA: 625 + 40 + 13}
    llava = mix.filter(pl.col("source") == LLAVA)
    assert all(i.startswith("llava665k/") for i in llava["id"].to_list())
    assert llava.filter(~pl.col("has_image")).height == 40 + 4
    want = {u: o for u, o in outcomes(src["llava"], synth.LLAVA, LLAVA, truth).items()}
    assert got_outcomes(mix, rej, LLAVA) == want
    assert mix["uid"].is_unique().all()
    n = len(elements(src["llava"]))
    assert stats["sources"][LLAVA]["input"] == n == stats["sources"][LLAVA]["kept"] + stats["sources"][LLAVA]["rejected"]


def test_exact_dedup_across_sources_drops_the_shared_vqa_part(src, tmp_path):
    doc = synth.RECIPES["bunny-llava-1.4m"] | {"dedup": "exact"}
    r = recipe.from_dict(doc, data_root=src["root"])
    stats = build.run(r, str(tmp_path))
    mix, rej = tables(str(tmp_path))
    # LLaVA keeps LLaVA-Instruct (its own part), the ShareGPT part (SVIT's was excluded
    # before dedup) and its quirks; its VQA part repeats SVIT's and goes, each naming the
    # uid it repeats
    assert dict(Counter(mix["source"].to_list())) == {SVIT: 625, WIZ: 70, LLAVA: C["svit_core"] + 40 + 13}
    dups = rej.filter((pl.col("source") == LLAVA) & pl.col("reason").str.starts_with("duplicate:"))
    assert dups.height == 625 - C["svit_core"]
    svit = elements(src["svit"])
    llava = elements(src["llava"])
    for uid_, reason in dups.select("uid", "reason").iter_rows():
        kept = re.fullmatch(r"duplicate: same image and conversations as (\S+) \(id .*\)", reason).group(1)
        assert kept.startswith(f"{SVIT}:") and kept in set(mix["uid"].to_list())
        a, b = llava[int(uid_.split(":")[1])], svit[int(kept.split(":")[1])]
        assert (a["id"], a["image"], a["conversations"]) == (b["id"], b["image"], b["conversations"])
    assert stats["reasons"]["duplicate"] == dups.height + 1     # + SVIT's planted duplicate


def test_jsonl_source_with_malformed_lines(src, truth, tmp_path):
    r = recipe.from_dict({"name": "own", "image_root": None, "sources": [
        {"name": "own", "path": src["own"], "format": "wizardlm"}]})
    stats = build.run(r, str(tmp_path))
    mix, rej = tables(str(tmp_path))
    assert got_outcomes(mix, rej, "own") == outcomes(src["own"], synth.OWN, "own", truth)
    assert Counter(code(x) for x in rej["reason"].to_list()) == {
        "malformed_json": 2, "not_an_object": 1, "missing_field": 1, "too_few_turns": 1, "bad_text": 1}
    n_lines = len(open(src["own"], "rb").read().splitlines())
    assert stats["sources"]["own"]["input"] == n_lines == mix.height + rej.height
    assert mix.height == C["own"] and not stats["images_checked"]
    assert mix["id"].to_list()[:2] == ["own_0", "own_1"]
    assert rej.filter(pl.col("id") == "own_gpt_first")["reason"].to_list() == [
        "too_few_turns: 0 turns (after dropping a leading gpt turn and a trailing human turn) "
        "(need at least 2)"]


def test_count_and_fraction_are_exact_seeded_and_order_free(src, tmp_path):
    wiz = json.load(open(src["wizardlm"]))
    clean = [o for o in wiz if isinstance(o, dict) and o.get("output") and isinstance(o.get("instruction"), str)
             and "<image>" not in o["instruction"] and readers.bad_string(o["instruction"]) is None]
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
        got = list(readers.iter_json_list(str(p), chunk_chars=chunk))
        assert [obj for _, obj, _, _, _ in got] == items, chunk
        assert [json.loads(text) for _, _, text, _, _ in got] == items         # the raw slices
        data = p.read_bytes()
        assert [data[o:o + n].decode() for _, _, _, _, (o, n) in got] == [t for _, _, t, _, _ in got]
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
        {"id": "m4", "conversations": [{"from": "Human", "value": "Q"}, {"from": "GPT", "value": "A"}]},
    ]) + "\n\n")
    got = list(readers.read(str(p), "sharegpt", "s"))
    assert got[0].conversations == [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    # LLaVA/Bunny read only human/gpt (KeyError on anything else) and FastChat's ShareGPT
    # cleaning drops other roles: a reject, named
    assert isinstance(got[1], readers.Bad) and got[1].reason == "bad_role" and "'chatgpt'" in got[1].detail
    assert isinstance(got[2], readers.Bad) and got[2].reason == "missing_field" and len(got) == 4
    assert got[3].conversations == [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    # the llava format does not read OpenAI's role names
    bad = readers.to_record("llava", "s", 0, {"id": "x", "conversations": [
        {"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]})
    assert isinstance(bad, readers.Bad) and bad.reason == "bad_role"


@pytest.mark.parametrize("conv, want, norm", [
    # LLaVA/Bunny skip one leading non-human turn; FastChat also drops a trailing human turn
    ([("gpt", "hi"), ("human", "Q"), ("gpt", "A")], [("human", "Q"), ("gpt", "A")], ["leading_gpt_dropped"]),
    ([("human", "Q"), ("gpt", "A"), ("human", "Q2")], [("human", "Q"), ("gpt", "A")], ["trailing_human_dropped"]),
    ([("system", "S"), ("gpt", "hi"), ("human", "Q"), ("gpt", "A"), ("human", "x")], [("human", "Q"), ("gpt", "A")],
     ["leading_gpt_dropped", "trailing_human_dropped", "system_kept"]),
    ([("gpt", "a"), ("gpt", "b"), ("human", "Q"), ("gpt", "A")], [("gpt", "b"), ("human", "Q"), ("gpt", "A")],
     ["leading_gpt_dropped"]),                                   # only one: validate rejects the rest
    ([("human", "Q"), ("gpt", "A")], [("human", "Q"), ("gpt", "A")], []),
])
def test_turn_normalisation(conv, want, norm):
    rec = readers.to_record("llava", "s", 0, {"id": "x", "conversations": [{"from": f, "value": v} for f, v in conv]})
    assert [(t["from"], t["value"]) for t in rec.conversations] == want
    assert sorted(n for bit, n in readers.NORM_NAMES.items() if rec.norm & bit) == sorted(norm)
    assert rec.system == ("S" if ("system", "S") in conv else None)


@pytest.mark.parametrize("ref, want", [
    ("coco\\train2017\\1.jpg", "coco/train2017/1.jpg"), ("./coco/1.jpg", "coco/1.jpg"),
    ("coco//a/./1.jpg", "coco/a/1.jpg"), ("coco/1.jpg", "coco/1.jpg"), (".\\vg\\2.jpg", "vg/2.jpg"),
    ("a/../b.jpg", "b.jpg"), ("C:\\x.jpg", "C:\\x.jpg"), ("/abs.jpg", "/abs.jpg"), ("../up.jpg", "../up.jpg"),
])
def test_image_paths_are_normalised_before_the_containment_check(ref, want):
    assert readers.normalise_image_path(ref) == want
    rec = readers.to_record("llava", "s", 0, {"id": "x", "image": ref, "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]})
    assert rec.image == want and bool(rec.norm & readers.IMAGE_PATH) == (want != ref)
    from pipelines.mix import validate
    problem = validate.check(rec, recipe.Limits())
    assert (problem is None) == (ref not in ("C:\\x.jpg", "/abs.jpg", "../up.jpg"))


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
    # every problem, named by its field (pipelines.config, shared with curate and train)
    for part in ("sead: unknown key", "sources[0].colour: unknown key", "sources[0].format: 'alpaca' is not one of",
                 "sources[1].exclude[0].idd: unknown key", "sources[1].exclude[1]: id pattern '(' is not a valid "
                 "regular expression", "dedup: 'fuzzy' is not one of ['exact', 'none']"):
        assert part in msg, part
    with pytest.raises(ConfigError, match=r"sources\[0\]: source a: give count or fraction, not both"):
        recipe.from_dict({"name": "x", "sources": [{"name": "a", "path": "a", "count": 3, "fraction": 0.5}]})
    with pytest.raises(ConfigError, match="unique"):
        recipe.from_dict({"name": "x", "sources": [{"name": "a", "path": "a"}, {"name": "a", "path": "b"}]})
    with pytest.raises(ConfigError, match="dedup: 'fuzzy' is not one of"):
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


def test_changing_the_seed_is_refused_then_redone_with_restart(tmp_path):
    items = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": "A"}]}
             for i in range(40)]
    (tmp_path / "s.json").write_text(json.dumps(items))
    picks = []
    for seed in (0, 1, 0):
        r = recipe.from_dict({"name": "t", "seed": seed, "sources": [
            {"name": "s", "path": str(tmp_path / "s.json"), "count": 10}]})
        if picks:                                           # the same folder each time
            with pytest.raises(runkey.StaleRunError, match=r"source s: its settings changed \(seed\)"):
                build.run(r, str(tmp_path / "out"))
        build.run(r, str(tmp_path / "out"), restart_run=bool(picks))
        picks.append(set(tables(str(tmp_path / "out"))[0]["id"].to_list()))
    assert picks[0] == picks[2] != picks[1] and all(len(p) == 10 for p in picks)


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_records_dropped_late_carry_their_exact_raw_text(tmp_path, kind):
    # duplicates and sampled-out records are decided after the file was read: their text
    # is read back from the file by byte offset; a byte order mark, non-ASCII text,
    # \r\n line ends and a record that is not UTF-8 before them must not shift it
    items = [{"id": f"r{i}", "note": "é☃🙂" * (i % 3),
              "conversations": [{"from": "human", "value": f"Qué {i % 20}?"}, {"from": "gpt", "value": "Sí 🙂."}]}
             for i in range(60)]
    bad = b'{"id": "latin", "conversations": [{"from": "human", "value": "\xe9"}, {"from": "gpt", "value": "x"}]}'
    texts = [json.dumps(o, ensure_ascii=False).encode() for o in items]
    texts.insert(3, bad)
    if kind == "json":
        data = b"\xef\xbb\xbf[\r\n  " + b" ,\r\n  ".join(texts) + b"\r\n]\r\n"
    else:
        data = b"\xef\xbb\xbf" + b"\r\n".join(texts) + b"\r\n"
    (tmp_path / f"s.{kind}").write_bytes(data)
    r = recipe.from_dict({"name": "t", "sources": [{"name": "s", "path": str(tmp_path / f"s.{kind}"), "count": 10}]})
    stats = build.run(r, str(tmp_path / "out"))
    _, rej = tables(str(tmp_path / "out"))
    assert stats["reasons"] == {"bad_text": 1, "duplicate": 40, "sampled_out": 10}
    source = [o for o in items]
    source.insert(3, None)
    for row, reason, record in rej.select("row", "reason", "record").iter_rows():
        if reason.startswith("bad_text"):
            assert row == 3 and record == bad.decode("utf-8", "replace")
        else:
            assert json.loads(record) == source[row], (row, reason)
