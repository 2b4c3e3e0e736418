"""TinyGPT-V's prompts, token by token, on a tokenizer whose ids are known by hand; box
corners truncated as TinyGPT-V does; tagging MIX records by task.

The expected ids below are derived by hand: TinyGPT-V's prompt text (its configs and
datasets), split as its code tokenizes it (the prompt cut at <ImageHere>, each piece and
each answer + end symbol on their own, bos in front), each piece pre-tokenized with
GPT-2's rule (Phi-2's tokenizer is GPT-2's byte-level BPE), each pre-token looked up in
VOCAB. No tokenizer call produces an expected value."""
from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pytest

import mllm_fixtures as fx
from mllm import multitask, registry
from mllm.templates import IGNORE_INDEX, REGISTRY, ConversationError
from mllm.templates import get as get_template
from pipelines import schemas
from pipelines.errors import ConfigError, InputError
from pipelines.mix import tasks

registry.load_builtins()
N_IMG = 3
X = IGNORE_INDEX

# A word-level vocabulary over GPT-2 byte-level pre-tokens (Ġ is a space, Ċ a newline).
VOCAB = ["<|endoftext|>", "<pad>", "<image>", "<unk>",
         "###", "Human", ":", "Ġ<", "Img", ">", "</", "ĠDescribe", "Ġthis", "Ġimage", "Ġin",  # 4-14
         "Ġdetail", ".", "Ġ###", "Assistant", "Ġ", "A", "Ġred", "Ġsquare", ".###", "[",       # 15-24
         "INST", "]", "Ġ[", "refer", "Ġgive", "Ġme", "Ġthe", "Ġlocation", "Ġof", "Ġ[/",       # 25-34
         "{<", "10", "><", "15", "80", "85", ">}###", "ĠAnd", "Ġcolor", "?",                  # 35-44
         "red", "ĠWhat", "Ġis", "Ġtwo", "Ġplus", "four", "a", "Ċ"]                             # 45-52


def known_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


def human(v):
    return {"from": "human", "value": v}


def gpt(v):
    return {"from": "gpt", "value": v}


def test_stage3_prompt_token_by_token():
    # train_configs/tinygptv_stage3.yaml: prompt_template '###Human: {} ###Assistant: ', end_sym '###';
    # the prompt from MiniGPT-4's alignment.txt: '<Img><ImageHere></Img> Describe this image in detail.'
    conv = [human("<image>\nDescribe this image in detail."), gpt("A red square.")]
    ids, labels = get_template("tinygptv-instruct").encode(conv, known_tokenizer(), N_IMG)
    want = ([0]                                        # bos
            + [4, 5, 6, 7, 8, 9]                       # ###|Human|:|Ġ<|Img|>     ('###Human: <Img>')
            + [2, 2, 2]                                # the image
            + [10, 8, 9, 11, 12, 13, 14, 15, 16, 17, 18, 6, 19]  # </|Img|>|ĠDescribe|...|.|Ġ###|Assistant|:|Ġ
            + [20, 21, 22, 23])                        # A|Ġred|Ġsquare|.###     ('A red square.' + '###')
    assert ids == want
    assert labels == [X] * 23 + [20, 21, 22, 23]
    # tokenized as one string the answer would start 'ĠA' (not in VOCAB): the split matters
    tok = known_tokenizer()
    whole = tok("###Assistant: A red square.###", add_special_tokens=False)["input_ids"]
    assert whole == [4, 18, 6, 3, 21, 22, 23] and ids[-6:] != whole[-6:]


def test_stage4_prompt_token_by_token_with_a_second_turn():
    # tinygptv_stage4.yaml: chat_template with MiniGPT-v2's '[INST] {} [/INST]'; its datasets write
    # '<Img><ImageHere></Img> {instruction} ' (coco_dataset.py: '[refer] give me the location of {}'),
    # later questions 'question ' (multitask_conversation.py), each after the bos text; end_sym '###'
    conv = [human("<image>\n[refer] give me the location of the red square"), gpt("{<10><15><80><85>}"),
            human("And the color?"), gpt("red")]
    ids, labels = get_template("tinygptv").encode(conv, known_tokenizer(), N_IMG)
    prompt = ([0]
              + [24, 25, 26, 7, 8, 9]                  # [|INST|]|Ġ<|Img|>        ('[INST] <Img>')
              + [2, 2, 2]
              + [10, 8, 9, 27, 28, 26, 29, 30, 31, 32, 33, 31, 21, 22,  # </|Img|>|Ġ[|refer|]|Ġgive|...|Ġsquare
                 19, 34, 25, 26])                      # Ġ|Ġ[/|INST|]   ('  [/INST]': two spaces)
    answer1 = [35, 36, 37, 38, 37, 39, 37, 40, 41]     # {<|10|><|15|><|80|><|85|>}###
    turn2 = [0, 24, 25, 26, 42, 31, 43, 44, 19, 34, 25, 26]  # bos '[INST] And the color?  [/INST]'
    answer2 = [45, 4]                                  # red|###
    assert ids == prompt + answer1 + turn2 + answer2
    assert labels == [X] * len(prompt) + answer1 + [X] * len(turn2) + answer2
    # the generation prompt is the training prefix
    gen, _ = get_template("tinygptv").encode(conv[:1], known_tokenizer(), N_IMG, add_generation_prompt=True)
    assert gen == prompt


def test_stage4_text_only_and_stage1_2_captions_token_by_token():
    tok = known_tokenizer()
    # unnatural_instruction.py: the instruction alone, no image, no space added
    ids, labels = get_template("tinygptv").encode([human("What is two plus two?"), gpt("four.")], tok, N_IMG)
    assert ids == [0, 24, 25, 26, 46, 47, 48, 49, 48, 44, 34, 25, 26, 50, 23]
    assert labels == [X] * 13 + [50, 23]
    # stages 1-2: no prompt text at all; the caption + end_sym '\n' (MiniGPT4's default)
    ids, labels = get_template("tinygptv-pretrain").encode(
        [human("<image>\nDescribe the image briefly."), gpt("a red square")], tok, N_IMG)
    assert ids == [0, 2, 2, 2, 51, 21, 22, 52] and labels == [X] * 4 + [51, 21, 22, 52]
    with pytest.raises(ConversationError, match="takes an image"):
        get_template("tinygptv-pretrain").encode([human("hi"), gpt("a")], tok, N_IMG)


def test_the_image_marker_anywhere_becomes_img_in_front():
    tok = known_tokenizer()
    tpl = get_template("tinygptv-instruct")
    front = tpl.encode([human("<image>\nDescribe this image in detail."), gpt("A")], tok, N_IMG)
    back = tpl.encode([human("Describe this image in detail.\n<image>"), gpt("A")], tok, N_IMG)
    assert front == back


def test_per_task_template_tags_untagged_turns_like_the_mix_builder_would():
    tok = fx.local_tokenizer()
    plain = [human("<image>\ngive me the location of the red square"), gpt("{<10><10><60><90>}")]
    by_template = get_template("tinygptv-refer").encode(plain, tok, N_IMG)
    by_tagging = get_template("tinygptv").encode(tasks.tag_conversation(plain, "refer"), tok, N_IMG)
    assert by_template == by_tagging
    assert "[refer]" in tok.decode(by_template[0]) and "[refer]" not in tok.decode(
        get_template("tinygptv").encode(plain, tok, N_IMG)[0])
    # an identifier already there wins over the template's default task
    tagged = tasks.tag_conversation(plain, "vqa")
    assert get_template("tinygptv-refer").encode(tagged, tok, N_IMG) == \
        get_template("tinygptv").encode(tagged, tok, N_IMG)
    # text-only turns stay untagged, as the mix builder leaves them
    text = [human("What is two plus two?"), gpt("four.")]
    assert get_template("tinygptv-vqa").encode(text, tok, N_IMG) == get_template("tinygptv").encode(text, tok, N_IMG)


def test_require_task_refuses_untagged_image_turns():
    tpl = multitask._template("strict", "multitask", multitask.STAGE4_PROMPT, "###", require_task=True)
    with pytest.raises(ConversationError, match="task identifier"):
        tpl.encode([human("<image>\nhi"), gpt("x")], fx.local_tokenizer(), N_IMG)


def test_all_templates_are_registered():
    assert {"tinygptv", "tinygptv-instruct", "tinygptv-pretrain", *(f"tinygptv-{t}" for t in tasks.TASKS)} \
        <= set(REGISTRY)
    assert tasks.TASKS == ("vqa", "caption", "refer", "grounding", "identify", "detection")
    assert multitask.instruction("refer", "the cat") == "<image>\n[refer] give me the location of the cat"


# ---------------------------------------------------------------------- boxes

def test_box_corners_are_truncated_as_tinygptv_does():
    # coco_dataset.py: a COCO box (x, y, w, h) in a 640x480 image -> corners x / w * 100, int()
    x, y, w, h = 100, 50, 200, 300
    assert tasks.format_box((x, y, x + w, y + h), 640, 480) == "{<15><10><46><72>}"  # 15.6 10.4 46.9 72.9
    assert tasks.format_box((x, y, x + w, y + h), 640, 480, rounding="round") == "{<16><10><47><73>}"
    assert tasks.format_box((20.6, 10.9, 120.99, 90.2), 200, 100) == "{<10><10><60><90>}"
    assert tasks.format_box((-5, 0, 250, 101), 200, 100) == "{<0><0><100><100>}"  # clamped
    assert tasks.format_grounded("cat", [(0, 0, 99, 59)], 200, 100) == "<p>cat</p> {<0><0><49><59>}"
    assert tasks.format_grounded("cat", [(0, 0, 99, 59)], 200, 100, rounding="round") == \
        "<p>cat</p> {<0><0><50><59>}"
    text = "a {<10><10><60><90>}<delim>{<0><0><25><50>} b"
    assert tasks.parse_boxes(text) == [(10, 10, 60, 90), (0, 0, 25, 50)]
    assert tasks.box_to_pixels((10, 10, 60, 90), 200, 100) == (20.0, 10.0, 120.0, 90.0)
    with pytest.raises(InputError, match="off the 0-100 grid"):
        tasks.parse_boxes("{<10><10><160><90>}")
    with pytest.raises(InputError, match="x2 < x1"):
        tasks.format_box((50, 0, 10, 10), 200, 100)
    with pytest.raises(ConfigError, match="rounding"):
        tasks.format_box((0, 0, 1, 1), 2, 2, rounding="floor")


# ---------------------------------------------------------------------- tagging

def record(rid, human, answer, has_image=True, source="llava", **extra):
    return {"id": rid, "source": source, "image": rid if has_image else None,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
            "n_turns": 2, "has_image": has_image, **extra}


RULE_CASES = [
    (record("a", "<image>\nWhat is it?", "a cat."), "vqa", "default"),
    (record("b", "<image>\nDescribe the image briefly.", "a cat", source="coreset"), "caption", "caption source"),
    (record("c", "<image>\nWrite a caption for this.", "a cat"), "caption", "caption prompt"),
    (record("d", "<image>\nwhere is the cat?", "{<1><2><30><40>}"), "refer", "answer is boxes"),
    (record("e", "<image>\nwhat is in {<1><2><30><40>}", "a cat"), "identify", "box in question"),
    (record("f", "<image>\ndescribe it", "a <p>cat</p> {<1><2><30><40>} sits"), "grounding",
     "grounded phrase in answer"),
    (record("g", "<image>\ndetect cat and dog", "<p>cat</p> {<1><2><30><40>}"), "detection", "detect prompt"),
    (record("h", "What is two plus two?", "four.", has_image=False), None, "text-only"),
    (record("i", "<image>\n[refer] the cat", "{<1><2><30><40>}"), "refer", "tagged"),
    (record("j", "<image>\nWhat is it?", "a cat.", task="identify"), "identify", "task column"),
]


@pytest.mark.parametrize("rec,task,rule", RULE_CASES, ids=[r[0]["id"] for r in RULE_CASES])
def test_rules_name_the_task(rec, task, rule):
    assert tasks.task_for(rec) == (task, rule)


def test_tag_table_writes_identifiers_into_a_mix_table():
    rows = [r for r, _, _ in RULE_CASES]
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "task"} for r in rows],
                                 schema=schemas.MIX)
    overrides = [None] * len(rows)
    overrides[-1] = "identify"  # as a task column would
    out, stats = tasks.tag_table(table, overrides)
    assert out.schema == schemas.MIX and out.num_rows == len(rows)
    firsts = [c[0]["value"] for c in out.column("conversations").to_pylist()]
    for (rec, task, _), first in zip(RULE_CASES, firsts):
        assert tasks.task_in(first) == task, rec["id"]
        if task is None:
            assert first == rec["conversations"][0]["value"]
        else:
            assert first.startswith(f"<image>\n[{task}] ")
    assert firsts[8] == "<image>\n[refer] the cat"  # not tagged twice
    assert stats["rows"] == len(rows) and stats["by_task"]["none"] == 1
    assert stats["by_task"]["identify"] == 2 and sum(stats["by_task"].values()) == len(rows)
    # answers are untouched
    assert [c[1] for c in out.column("conversations").to_pylist()] == [r["conversations"][1] for r in rows]


def test_tagging_errors_name_the_record():
    with pytest.raises(InputError, match="'x'.*already tagged"):
        tasks.tag_records([record("x", "<image>\n[vqa] hi", "y", task="refer")])
    with pytest.raises(InputError, match="unknown task 'ocr'"):
        tasks.tag_records([record("y", "<image>\nhi", "y", task="ocr")])
    with pytest.raises(ConfigError):
        tasks.identifier("ocr")


def test_pipelines_tasks_needs_neither_prefect_nor_mllm():
    code = ("import sys, pipelines.mix.tasks; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mllm', 'torch')]; "
            "print(bad); raise SystemExit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_tag_one_record_as_the_mix_builder_hook_does():
    conv = [{"from": "human", "value": "<image>\nwhere is the cat?"}, {"from": "gpt", "value": "{<1><2><3><4>}"}]
    assert tasks.tag(conv, True, "refcoco")[0]["value"] == "<image>\n[refer] where is the cat?"
    assert tasks.tag(conv, True, "refcoco", "vqa")[0]["value"] == "<image>\n[vqa] where is the cat?"
    assert tasks.tag(conv, True, "refcoco", None) == conv
    assert conv[0]["value"] == "<image>\nwhere is the cat?"  # the input is not modified
    text = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    assert tasks.tag(text, False) == text


def test_special_token_text_in_content_is_trained_as_text():
    # An answer quoting '<|endoftext|>' must not end the sequence mid-answer: the only
    # eos/bos ids are TinyGPT-V's own bos in front of each human turn.
    tok = known_tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    for name in ("tinygptv", "tinygptv-instruct"):
        conv = [human("<image>\nwhat does it say <|endoftext|>?"), gpt("it says <|endoftext|> here"),
                human("again?"), gpt("yes")]
        ids, labels = get_template(name).encode(conv, tok, N_IMG)
        bos_at = [k for k, i in enumerate(ids) if i == eos]
        turn_starts = [0] + [k for k in bos_at if k > 0]
        assert bos_at == turn_starts and len(bos_at) == 2, (name, ids)
        assert eos not in [l for l in labels if l != X]
