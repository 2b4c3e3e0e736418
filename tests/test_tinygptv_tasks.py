"""Multi-task templates (task identifiers, boxes on a 0-100 grid) and tagging MIX
records by task: masks checked token by token."""
from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pytest

import mllm_fixtures as fx
import mllm.tinygptv  # noqa: F401  (registers the options)
from mllm import multitask
from mllm.templates import IGNORE_INDEX, REGISTRY, ConversationError
from mllm.templates import get as get_template
from pipelines import schemas
from pipelines.mix import tasks
from pipelines.errors import ConfigError, InputError

N_IMG = 4
W, H = 200, 100

# One conversation per task, answers with boxes where the task has them.
CASES = {
    "vqa": ("What color is the shape?", "red."),
    "caption": ("", "a red square on a white background."),
    "refer": ("the red square", tasks.format_box((20, 10, 120, 90), W, H)),
    "grounding": ("", f"a {tasks.format_grounded('red square', [(20, 10, 120, 90)], W, H)} on white."),
    "identify": (tasks.format_box((20, 10, 120, 90), W, H), "a red square"),
    "detection": ("red square", tasks.format_grounded("red square", [(20, 10, 120, 90), (0, 0, 50, 50)], W, H)),
}


def conv_for(task):
    subject, answer = CASES[task]
    return [{"from": "human", "value": multitask.instruction(task, subject)},
            {"from": "gpt", "value": answer}]


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_each_task_template_masks_token_by_token(task):
    tok = fx.local_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    subject, answer = CASES[task]
    question = multitask.INSTRUCTIONS[task].format(subject)
    for name in ("tinygptv", f"tinygptv-{task}"):
        ids, labels = get_template(name).encode(conv_for(task), tok, N_IMG)
        # the expected sequence, segment by segment
        pieces = [(ids_of(tok, "###Human: "), False), ([image_id] * N_IMG, False),
                  (ids_of(tok, "\n"), False), (ids_of(tok, f"[{task}]"), False),
                  (ids_of(tok, f" {question} "), False), (ids_of(tok, "###Assistant:"), False),
                  (ids_of(tok, f" {answer}") + [tok.eos_token_id], True)]
        want_ids = [i for p, _ in pieces for i in p]
        want_labels = [i if trained else IGNORE_INDEX for p, trained in pieces for i in p]
        assert ids == want_ids, name
        assert labels == want_labels, name
        trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        assert tok.decode(trained) == f" {answer}<|endoftext|>"
        for i, lab in zip(ids, labels):
            assert lab == IGNORE_INDEX or lab == i


def test_per_task_template_tags_untagged_turns_like_the_mix_builder_would():
    tok = fx.local_tokenizer()
    plain = [{"from": "human", "value": "<image>\ngive me the location of the red square"},
             {"from": "gpt", "value": "{<10><10><60><90>}"}]
    by_template = get_template("tinygptv-refer").encode(plain, tok, N_IMG)
    by_tagging = get_template("tinygptv").encode(tasks.tag_conversation(plain, "refer"), tok, N_IMG)
    assert by_template == by_tagging
    # an identifier already there wins over the template's default task
    tagged = tasks.tag_conversation(plain, "vqa")
    assert get_template("tinygptv-refer").encode(tagged, tok, N_IMG) == \
        get_template("tinygptv").encode(tagged, tok, N_IMG)


def test_multi_turn_and_text_only_records_mask_every_answer():
    tok = fx.local_tokenizer()
    conv = [{"from": "human", "value": "<image>\n[vqa] What color is the shape?"},
            {"from": "gpt", "value": "red."},
            {"from": "human", "value": "And what shape is it?"},
            {"from": "gpt", "value": "a square."}]
    ids, labels = get_template("tinygptv").encode(conv, tok, N_IMG)
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur) if cur else None
    assert [tok.decode(s) for s in spans] == [" red.<|endoftext|>", " a square.<|endoftext|>"]
    text = [{"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "four."}]
    ids, labels = get_template("tinygptv").encode(text, tok, N_IMG)
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == " four.<|endoftext|>"
    # a task template leaves a text-only turn untagged, as the mix builder does
    ids_vqa, labels_vqa = get_template("tinygptv-vqa").encode(text, tok, N_IMG)
    assert (ids_vqa, labels_vqa) == (ids, labels) and "[vqa]" not in tok.decode(ids_vqa)
    assert "[" not in tok.decode(ids)


def test_generation_prompt_is_the_training_prefix():
    tok = fx.local_tokenizer()
    conv = conv_for("refer")
    ids, labels = get_template("tinygptv").encode(conv, tok, N_IMG)
    prompt, _ = get_template("tinygptv").encode(conv[:1], tok, N_IMG, add_generation_prompt=True)
    first_trained = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert ids[:first_trained] == prompt


def test_require_task_refuses_untagged_image_turns():
    tpl = multitask.TaskTemplate(name="strict", prefix="", user="{content} ", assistant="A:",
                                 answer=" {content}{end}", require_task=True)
    with pytest.raises(ConversationError, match="task identifier"):
        tpl.encode([{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}],
                   fx.local_tokenizer(), N_IMG)


def test_all_task_templates_are_registered():
    assert {"tinygptv", *(f"tinygptv-{t}" for t in tasks.TASKS)} <= set(REGISTRY)
    assert tasks.TASKS == ("vqa", "caption", "refer", "grounding", "identify", "detection")


# ---------------------------------------------------------------------- boxes

def test_boxes_on_a_0_to_100_grid():
    assert tasks.format_box((20, 10, 120, 90), 200, 100) == "{<10><10><60><90>}"
    assert tasks.format_box((-5, 0, 250, 101), 200, 100) == "{<0><0><100><100>}"  # clamped
    assert tasks.format_box((1, 1, 3, 3), 200, 100) == "{<0><1><2><3>}"  # rounded
    text = "a {<10><10><60><90>}<delim>{<0><0><25><50>} b"
    assert tasks.parse_boxes(text) == [(10, 10, 60, 90), (0, 0, 25, 50)]
    assert tasks.box_to_pixels((10, 10, 60, 90), 200, 100) == (20.0, 10.0, 120.0, 90.0)
    with pytest.raises(InputError, match="off the 0-100 grid"):
        tasks.parse_boxes("{<10><10><160><90>}")
    with pytest.raises(InputError, match="x2 < x1"):
        tasks.format_box((50, 0, 10, 10), 200, 100)
    assert tasks.format_grounded("cat", [(0, 0, 100, 50)], 200, 100) == "<p>cat</p> {<0><0><50><50>}"


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
