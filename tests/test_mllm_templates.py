"""Label masks, token by token, against hand-written expectations for every template."""
from __future__ import annotations

import pytest

from mllm import templates
from mllm.templates import BUNNY_SYSTEM, IGNORE_INDEX, check_conversation
from mllm_fixtures import local_tokenizer
from mllm_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

N_IMG = 5  # image tokens per <image> in these tests
IMG = object()  # marks the image span in an expectation


def conv(*turns):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]


def expected(tok, pieces):
    """ids and labels from hand-written (text, trained) pieces; IMG = the image span."""
    image_id = tok.convert_tokens_to_ids("<image>")
    ids, labels = [], []
    for piece in pieces:
        if piece is IMG:
            ids += [image_id] * N_IMG
            labels += [IGNORE_INDEX] * N_IMG
            continue
        text, trained = piece
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if trained else [IGNORE_INDEX] * len(t)
    return ids, labels


def spans(ids, labels):
    """The trained spans as lists of ids."""
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def check(name, conversation, pieces, full_text, answers):
    tok = local_tokenizer()
    ids, labels = templates.get(name).encode(conversation, tok, N_IMG)
    want_ids, want_labels = expected(tok, pieces)
    assert len(ids) == len(labels)
    for k, (a, b, la, lb) in enumerate(zip(ids, want_ids, labels, want_labels)):
        assert (a, la) == (b, lb), f"token {k}: got {(a, la)}, expected {(b, lb)}"
    assert len(ids) == len(want_ids)
    # Independent of how pieces are cut: the ids spell the intended text, and the
    # trained spans spell exactly the answers with their end tokens.
    image_id = tok.convert_tokens_to_ids("<image>")
    squeezed = [i for k, i in enumerate(ids) if i != image_id or k == 0 or ids[k - 1] != image_id]
    assert tok.decode(squeezed) == full_text
    assert [tok.decode(s) for s in spans(ids, labels)] == answers


def test_bunny_phi2_multi_turn_with_image():
    c = conv("<image>\nWhat color is it?", "Red.", "And the shape?", "A square.")
    check("bunny", c,
          [(BUNNY_SYSTEM + " ", False), ("USER: ", False), IMG, ("\nWhat color is it? ", False),
           ("ASSISTANT:", False), (" Red.<|endoftext|>", True),
           ("USER: And the shape? ", False), ("ASSISTANT:", False), (" A square.<|endoftext|>", True)],
          f"{BUNNY_SYSTEM} USER: <image>\nWhat color is it? ASSISTANT: Red.<|endoftext|>"
          "USER: And the shape? ASSISTANT: A square.<|endoftext|>",
          [" Red.<|endoftext|>", " A square.<|endoftext|>"])


def test_bunny_text_only():
    c = conv("What is two plus two?", "four.")
    check("bunny", c,
          [(BUNNY_SYSTEM + " ", False), ("USER: What is two plus two? ", False),
           ("ASSISTANT:", False), (" four.<|endoftext|>", True)],
          f"{BUNNY_SYSTEM} USER: What is two plus two? ASSISTANT: four.<|endoftext|>",
          [" four.<|endoftext|>"])


def test_plain_stage1_keeps_image_and_caption_only():
    c = conv("<image>\nDescribe the image briefly.", "a red square")
    check("plain", c, [IMG, ("a red square<|endoftext|>", True)],
          "<image>a red square<|endoftext|>", ["a red square<|endoftext|>"])


def test_llama3_multi_turn():
    c = conv("<image>\nWhat color?", "red.", "Shape?", "square.")
    sys = f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{BUNNY_SYSTEM}<|eot_id|>"
    user = "<|start_header_id|>user<|end_header_id|>\n\n"
    asst = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    check("llama3", c,
          [(sys, False), (user, False), IMG, ("\nWhat color?<|eot_id|>", False), (asst, False),
           ("red.<|eot_id|>", True), (f"{user}Shape?<|eot_id|>", False), (asst, False),
           ("square.<|eot_id|>", True)],
          f"{sys}{user}<image>\nWhat color?<|eot_id|>{asst}red.<|eot_id|>{user}Shape?<|eot_id|>"
          f"{asst}square.<|eot_id|>",
          ["red.<|eot_id|>", "square.<|eot_id|>"])


def test_qwen2_text_only_multi_turn():
    c = conv("Say hello.", "hello!", "Again.", "hello!")
    sys = f"<|im_start|>system\n{BUNNY_SYSTEM}<|im_end|>\n"
    check("qwen2", c,
          [(sys, False), ("<|im_start|>user\nSay hello.<|im_end|>\n", False),
           ("<|im_start|>assistant\n", False), ("hello!<|im_end|>", True), ("\n", False),
           ("<|im_start|>user\nAgain.<|im_end|>\n", False), ("<|im_start|>assistant\n", False),
           ("hello!<|im_end|>", True), ("\n", False)],
          f"{sys}<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\nhello!<|im_end|>\n"
          "<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\nhello!<|im_end|>\n",
          ["hello!<|im_end|>", "hello!<|im_end|>"])


def test_generation_prompt_is_the_training_prefix():
    tok = local_tokenizer()
    t = templates.get("bunny")
    full, labels = t.encode(conv("<image>\nWhat color?", "red."), tok, N_IMG)
    prompt, plabels = t.encode(conv("<image>\nWhat color?"), tok, N_IMG, add_generation_prompt=True)
    first_trained = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert prompt == full[:first_trained]
    assert all(lab == IGNORE_INDEX for lab in plabels)
    assert tok.decode(prompt).endswith("What color? ASSISTANT:")


@pytest.mark.parametrize("turns,has_image,reason", [
    ([], False, "no turns"),
    ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}], False, "turn 0 is from 'gpt'"),
    ([{"from": "human", "value": "x"}], False, "expected human/gpt pairs"),
    ([{"from": "human", "value": "x"}, {"from": "gpt", "value": "  "}], False, "turn 1 is empty"),
    ([{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], True, "0 <image> markers"),
    ([{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}], False,
     "text-only sample contains <image>"),
    ([{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "<image>"}], True,
     "<image> in turn 1"),
])
def test_malformed_conversations_have_reasons(turns, has_image, reason):
    assert reason in check_conversation(turns, has_image)


def test_valid_conversation_passes():
    assert check_conversation(conv("<image>\nq", "a", "q2", "a2"), True) is None
    assert check_conversation(conv("q", "a"), False) is None
