"""`warren tokens` against Bunny's and LLaVA's own preprocessing, re-derived in
llava_reference.py, on 42 hand-written conversations (tests/data/conversations.json:
multi-turn, image-last, odd whitespace, near-empty turns, unicode, code) with tokenizers
learnt here: a byte-level BPE with Phi-2's split rule and pad = eos (Bunny's setup),
and a SentencePiece-style Llama tokenizer with BOS (LLaVA-1.5's), legacy and not.

Every record gives the reference's input_ids and labels exactly, except the documented
cases where the reference is wrong (docs/train.md, "Where Warren differs").
"""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

import llava_reference as ref
from flows.cli import main
from mllm import tokenizer as tok_mod
from pipelines import schemas, storage
from token_fixtures import save, trained_bytelevel, trained_sentencepiece

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "conversations.json")
RECORDS = json.load(open(DATA, encoding="utf-8"))

# Where the reference is wrong, and how (each departure is asserted below, not skipped).
QUOTES_EOS = "sep-01"     # an answer quotes <|endoftext|>: Bunny makes it eos mid-answer,
#                           its rounds split there, and the sample is masked (mismatch)
HOLDS_SEP = "sep-02"      # an answer holds ' ASSISTANT: ': the round splits in three, the
#                           mask loop stops, the sample is masked (mismatch)
QUOTES_S = "sep-03"       # an answer quotes </s>: LLaVA makes it eos, the sample is masked
IMAGE_IN_ANSWER = "sep-04"  # an answer mentions <image>: moved to the answer's front as a
#                           second image placeholder of a one-image sample
DEPARTS = {"bunny": {QUOTES_EOS, HOLDS_SEP, IMAGE_IN_ANSWER},
           "vicuna_v1": {QUOTES_S, HOLDS_SEP, IMAGE_IN_ANSWER},
           "plain": {IMAGE_IN_ANSWER}}
MULTI_ROUND = {r["id"] for r in RECORDS if len(r["conversations"]) > 2}


def training_text() -> list[str]:
    """The rendered conversations (separators as plain breaks) to learn a vocabulary on."""
    out = []
    for r in RECORDS:
        prompt = ref.prompt_two(ref.multimodal(r["conversations"]), " ", "\n")
        out.append(prompt.replace("<image>", " "))
    return out * 3


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    text = training_text()
    return {
        "bytelevel": save(trained_bytelevel(text, 1500), str(root / "bytelevel")),
        "sp-legacy": save(trained_sentencepiece(text, 1200, legacy=True), str(root / "sp-legacy")),
        # non-legacy, with Llama-2's property LLaVA's offset relies on: '▁USER:' is two
        # tokens, 'USER:' (after </s>) one
        "sp": save(trained_sentencepiece(text, 1200, legacy=False, drop_merges=[("▁", "USER:")]),
                   str(root / "sp")),
        # non-legacy, where '▁USER:' and 'USER:' are one token each
        "sp-merged": save(trained_sentencepiece(text, 1200, legacy=False), str(root / "sp-merged")),
    }


def warren_tokens(tmp_path, template, tokenizer_dir, path=DATA):
    out = str(tmp_path / f"{template}.jsonl")
    assert main(["tokens", "--input", path, "--template", template, "--tokenizer", tokenizer_dir,
                 "--jsonl", out]) == 0
    with open(out, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def spans(ids, labels):
    """Runs of trained ids."""
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != ref.IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def assert_right(line, record, tok, end):
    """Warren's own reading of a record: one trained run per answer, spelling the answer
    and the end token; the end token's id only at the end of each run."""
    answers = [t["value"] for t in record["conversations"][1::2]]
    runs = spans(line["input_ids"], line["labels"])
    assert [tok.decode(r).lstrip() for r in runs] == [a.lstrip() + end for a in answers]
    end_id = tok.convert_tokens_to_ids(end)
    assert [i for r in runs for i in r if i == end_id] == [end_id] * len(answers)
    assert line["input_ids"].count(end_id) == len(answers)
    assert line["input_ids"].count(ref.IMAGE_TOKEN_INDEX) == (1 if "image" in record else 0)


def compare(lines, tok, template, preprocess, departs, end):
    assert [line["id"] for line in lines] == [r["id"] for r in RECORDS]
    agree = set()
    for line, record in zip(lines, RECORDS):
        assert "error" not in line, line
        ids, labels, mismatch = preprocess(record["conversations"], tok, "image" in record)
        if record["id"] in departs:
            assert (ids, labels) != (line["input_ids"], line["labels"]), record["id"]
            assert_right(line, record, tok, end)
        else:
            assert not mismatch, record["id"]
            assert line["input_ids"] == ids, record["id"]
            assert line["labels"] == labels, record["id"]
            agree.add(record["id"])
    return agree


def test_bunny_equals_preprocess_bunny(tokenizers, tmp_path):
    tok = tok_mod.load(tokenizers["bytelevel"])
    # the comparison can tell whole-string from piecewise tokenization: ' USER' is one token
    user = tok.convert_tokens_to_ids("ĠUSER")
    assert tok(" USER", add_special_tokens=False)["input_ids"] == [user]
    assert tok.pad_token_id == tok.eos_token_id  # Bunny's Phi-2 setup (pad = unk = eos)
    lines = warren_tokens(tmp_path, "bunny", tokenizers["bytelevel"])
    agree = compare(lines, tok, "bunny", ref.preprocess_bunny, DEPARTS["bunny"], "<|endoftext|>")
    assert len(agree) == len(RECORDS) - 3
    assert all(user in line["input_ids"] for line in lines if line["id"] in MULTI_ROUND)
    # the reference's own verdict on the departures
    for rid, mismatch in ((QUOTES_EOS, True), (HOLDS_SEP, True), (IMAGE_IN_ANSWER, False)):
        record = next(r for r in RECORDS if r["id"] == rid)
        ids, _, flagged = ref.preprocess_bunny(record["conversations"], tok, "image" in record)
        assert flagged is mismatch, rid
        assert ids.count(ref.IMAGE_TOKEN_INDEX) == (2 if rid == IMAGE_IN_ANSWER else 1 if "image" in record else 0)


@pytest.mark.parametrize("name", ["sp-legacy", "sp"])
def test_vicuna_v1_equals_preprocess_v1(tokenizers, tmp_path, name):
    tok = tok_mod.load(tokenizers[name])
    assert tok.legacy is (name == "sp-legacy") and tok("a")["input_ids"][0] == tok.bos_token_id
    lines = warren_tokens(tmp_path, "vicuna_v1", tokenizers[name])
    agree = compare(lines, tok, "vicuna_v1", ref.preprocess_v1, DEPARTS["vicuna_v1"], "</s>")
    assert len(agree) == len(RECORDS) - 3 and MULTI_ROUND <= agree


def test_vicuna_v1_where_llavas_non_legacy_offset_is_wrong(tokenizers, tmp_path):
    """LLaVA takes one token off every later round for a non-legacy tokenizer, which is
    right only when the text after '</s>' is one token shorter than alone. With a
    vocabulary where it is not, LLaVA masks every multi-round sample; Warren's labels
    stay the answers."""
    tok = tok_mod.load(tokenizers["sp-merged"])
    assert len(tok.tokenize("a</s>USER:")) == 3 and len(tok.tokenize("USER:")) == 1
    lines = warren_tokens(tmp_path, "vicuna_v1", tokenizers["sp-merged"])
    agree = compare(lines, tok, "vicuna_v1", ref.preprocess_v1,
                    DEPARTS["vicuna_v1"] | MULTI_ROUND, "</s>")
    assert agree == {r["id"] for r in RECORDS} - DEPARTS["vicuna_v1"] - MULTI_ROUND
    for line, record in zip(lines, RECORDS):
        if record["id"] in MULTI_ROUND - DEPARTS["vicuna_v1"]:
            ids, labels, mismatch = ref.preprocess_v1(record["conversations"], tok, "image" in record)
            assert mismatch and ids == line["input_ids"] and set(labels) == {ref.IGNORE_INDEX}


@pytest.mark.parametrize("name", ["bytelevel", "sp-legacy"])
def test_plain_equals_preprocess_plain(tokenizers, tmp_path, name):
    """Stage 1: every one-pair image record as the reference gives it (BOS first for the
    Llama tokenizer, the caption ending in "\\n"); other records are refused with a
    reason, where the reference asserts."""
    tok = tok_mod.load(tokenizers[name])
    lines = warren_tokens(tmp_path, "plain", tokenizers[name])
    compared = 0
    for line, record in zip(lines, RECORDS):
        pair = "image" in record and len(record["conversations"]) == 2
        if not pair:
            assert "error" in line, record["id"]
            continue
        ids, labels, _ = ref.preprocess_plain(record["conversations"], tok)
        if record["id"] in DEPARTS["plain"]:
            assert ids.count(ref.IMAGE_TOKEN_INDEX) == 2 and line["input_ids"].count(ref.IMAGE_TOKEN_INDEX) == 1
            caption = record["conversations"][1]["value"]
            assert tok.decode([i for i in line["labels"] if i >= 0]).lstrip() == caption + "\n"
        else:
            assert (line["input_ids"], line["labels"]) == (ids, labels), record["id"]
            compared += 1
    assert compared == sum("image" in r and len(r["conversations"]) == 2 for r in RECORDS) - 1 == 19


def test_mix_parquet_and_jsonl_inputs_and_errors(tokenizers, tmp_path):
    """A mix.parquet (uid carried when present) and JSON Lines give the same lines as
    the JSON list; a record training would refuse is {"id", "error"}."""
    rows = [{"id": r["id"], "source": "hand", "image": r.get("image"),
             "conversations": r["conversations"], "n_turns": len(r["conversations"]),
             "has_image": "image" in r} for r in RECORDS]
    rows.append({"id": "bad", "source": "hand", "image": None, "n_turns": 1, "has_image": False,
                 "conversations": [{"from": "human", "value": "no answer"}]})
    table = pa.Table.from_pylist(rows, schema=schemas.MIX)
    table = table.append_column("uid", pa.array([f"hand:{k}" for k in range(len(rows))]))
    pq_path = str(tmp_path / "mix.parquet")
    storage.write_table(table, pq_path)
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n"
                     + '{"id": "broken", "conversations": 3}\n', encoding="utf-8")
    want = warren_tokens(tmp_path, "bunny", tokenizers["bytelevel"])
    from_parquet = warren_tokens(tmp_path, "bunny", tokenizers["bytelevel"], pq_path)
    assert [{k: v for k, v in line.items() if k != "uid"} for line in from_parquet[:-1]] == want
    assert [line["uid"] for line in from_parquet] == [f"hand:{k}" for k in range(len(rows))]
    assert from_parquet[-1] == {"id": "bad", "uid": f"hand:{len(RECORDS)}",
                                "error": "1 turns: expected human/gpt pairs"}
    from_jsonl = warren_tokens(tmp_path, "bunny", tokenizers["bytelevel"], str(jsonl))
    assert from_jsonl[:-1] == want
    assert from_jsonl[-1]["id"] == "broken" and "not a list" in from_jsonl[-1]["error"]


def test_show_tells_trained_from_masked(tokenizers, tmp_path, capsys):
    assert main(["tokens", "--input", DATA, "--template", "bunny",
                 "--tokenizer", tokenizers["bytelevel"], "--show", "2"]) == 0
    out = capsys.readouterr()
    blocks = out.out.strip().split("\n-- ")
    assert len(blocks) == 2 and blocks[0].startswith("-- img-01: ")
    assert blocks[0].endswith("ĠASSISTANT : [ĠThe Ġbus Ġis Ġred . <|endoftext|>]")
    assert "<image>" in blocks[0] and "\x1b[" not in out.out  # not a terminal: brackets
    # --show alone prints N records and stops
    assert "tokens: 2 records, 2 encoded, 0 errors" in out.err


def test_bad_arguments_are_one_line(tokenizers, tmp_path, capsys):
    assert main(["tokens", "--input", str(tmp_path / "nope.json"), "--template", "bunny",
                 "--tokenizer", tokenizers["bytelevel"]]) == 2
    assert "nope.json: file not found" in capsys.readouterr().err
    assert main(["tokens", "--input", DATA, "--template", "nope", "--tokenizer", tokenizers["bytelevel"]]) == 2
    assert "unknown template 'nope'" in capsys.readouterr().err
    assert main(["tokens", "--input", DATA, "--template", "bunny", "--tokenizer", tokenizers["sp"]]) == 2
    assert "'bunny' writes <|endoftext|>, which is not a token" in capsys.readouterr().err
    assert main(["tokens", "--input", DATA, "--template", "bunny", "--tokenizer", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("warren tokens: error: ") and err.count("\n") == 1
