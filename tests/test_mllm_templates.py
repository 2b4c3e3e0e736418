"""Templates, token by token, against ids derived by hand.

Each tokenizer here has a vocabulary written out in this file (token_fixtures.word_tokenizer):
one entry per pre-token, so the expected ids below are written as token strings, worked
out by hand from the reference's rendering and the tokenizer's split rule, and looked up
in that vocabulary. `T(...)` marks trained tokens.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from mllm import generate, templates
from mllm.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX, check_conversation, normalize_image
from token_fixtures import UNK, word_tokenizer

N_IMG = 3


class T(str):
    """A trained token."""


IMG = object()  # the image span

SYS_GPT2 = ["A", "Ġchat", "Ġbetween", "Ġa", "Ġcurious", "Ġuser", "Ġand", "Ġan", "Ġartificial",
            "Ġintelligence", "Ġassistant", ".", "ĠThe", "Ġassistant", "Ġgives", "Ġhelpful", ",",
            "Ġdetailed", ",", "Ġand", "Ġpolite", "Ġanswers", "Ġto", "Ġthe", "Ġuser", "'s",
            "Ġquestions", "."]
SYS_SP = ["▁A", "▁chat", "▁between", "▁a", "▁curious", "▁user", "▁and", "▁an", "▁artificial",
          "▁intelligence", "▁assistant.", "▁The", "▁assistant", "▁gives", "▁helpful,", "▁detailed,",
          "▁and", "▁polite", "▁answers", "▁to", "▁the", "▁user's", "▁questions."]

GPT2_WORDS = SYS_GPT2 + [
    "ĠUSER", "USER", ":", "Ġ", "Ċ", "ĠASSISTANT", "What", "Ġcolor", "Ġis", "Ġit", "?", "ĠRed",
    "ĠAnd", "Ġthe", "Ġshape", "ĠA", "Ġsquare", "ĠWhat", "Ġtwo", "Ġplus", "ĠFour", "a", "Ġred",
    "Ġends", "Ġsample", "ĠThe", "Ġtoken", "Ġ<|", "endoftext", "|>", "Ġdoes", "Say", "<|", "im",
    "_", "start", "Ġshows", "Ġ<", "image", ">", "Ġhere", "ĠUSER", "ĠASSISTANT", "ASSISTANT", "Ġ?"]
SP_WORDS = SYS_SP + [
    "▁USER:", "USER:", "▁", "▁\nWhat", "▁color", "▁is", "▁it?", "▁ASSISTANT:", "▁Red.", "▁And",
    "▁the", "▁shape?", "▁A", "▁square.", "▁a", "▁red", "▁square\n"]
LLAMA3_WORDS = SYS_GPT2 + [
    "system", "user", "assistant", "Ċ", "ĊĊ", "What", "Ġcolor", "?", "red", "Shape", "square",
    "Say", "Ġhello", "hello", "!", "Again"]


def ids(tok, tokens):
    """Expected (ids, labels) from hand-written tokens; IMG = the image span."""
    vocab = tok.get_vocab()
    image_id = vocab["<image>"]
    out, labels = [], []
    for t in tokens:
        if t is IMG:
            out += [image_id] * N_IMG
            labels += [IGNORE_INDEX] * N_IMG
        else:
            out.append(vocab[t])
            labels.append(vocab[t] if isinstance(t, T) else IGNORE_INDEX)
    return out, labels


def encode(name, tok, conv, **kw):
    got = templates.get(name).encode(conv, tok, N_IMG, **kw)
    assert tok.get_vocab()[UNK] not in got[0], "the test vocabulary misses a token"
    return got


def conv(*turns):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]


COLOR = conv("<image>\nWhat color is it?", "Red.", "And the shape?", "A square.")


def test_bunny_ids_by_hand():
    tok = word_tokenizer(GPT2_WORDS, "gpt2")
    # "{system} USER: " | image | "\nWhat color is it? ASSISTANT: Red.<|endoftext|>USER: ..."
    # ' USER' and ' ASSISTANT' are one token each: the text is tokenized as one string.
    want = SYS_GPT2 + ["ĠUSER", ":", "Ġ", IMG, "Ċ", "What", "Ġcolor", "Ġis", "Ġit", "?", "ĠASSISTANT",
                       ":", T("ĠRed"), T("."), T("<|endoftext|>"), "USER", ":", "ĠAnd", "Ġthe",
                       "Ġshape", "?", "ĠASSISTANT", ":", T("ĠA"), T("Ġsquare"), T("."),
                       T("<|endoftext|>")]
    assert encode("bunny", tok, COLOR) == ids(tok, want)
    text_only = conv("What is two plus two?", "Four.")
    want = SYS_GPT2 + ["ĠUSER", ":", "ĠWhat", "Ġis", "Ġtwo", "Ġplus", "Ġtwo", "?", "ĠASSISTANT", ":",
                       T("ĠFour"), T("."), T("<|endoftext|>")]
    assert encode("bunny", tok, text_only) == ids(tok, want)
    assert templates.get("phi2") is templates.get("bunny")


@pytest.mark.parametrize("style", ["sp", "sp-first"])
def test_vicuna_v1_ids_by_hand(style):
    """LLaVA-1.5: BOS first; the chunk after the image gets SentencePiece's prefix '▁';
    after '</s>' a legacy tokenizer adds '▁' again, a non-legacy one does not."""
    tok = word_tokenizer(SP_WORDS, style)
    user2 = "▁USER:" if style == "sp" else "USER:"
    want = ["<s>"] + SYS_SP + ["▁USER:", "▁", IMG, "▁\nWhat", "▁color", "▁is", "▁it?", "▁ASSISTANT:",
                               T("▁Red."), T("</s>"), user2, "▁And", "▁the", "▁shape?", "▁ASSISTANT:",
                               T("▁A"), T("▁square."), T("</s>")]
    assert encode("vicuna_v1", tok, COLOR) == ids(tok, want)


def test_plain_ids_by_hand():
    """Stage 1: the image, the caption, then "\\n" (conv_plain's separator, not eos); the
    question is dropped. With a BOS tokenizer, BOS comes first (tokenizer_image_token)."""
    caption = conv("<image>\nDescribe the image briefly.", "a red square")
    tok = word_tokenizer(GPT2_WORDS, "gpt2")
    assert encode("plain", tok, caption) == ids(tok, [IMG, T("a"), T("Ġred"), T("Ġsquare"), T("Ċ")])
    assert templates.get("plain").render(caption, tok) == "<image>a red square\n"
    sp = word_tokenizer(SP_WORDS, "sp")
    assert encode("plain", sp, caption) == ids(sp, ["<s>", IMG, T("▁a"), T("▁red"), T("▁square\n")])
    with pytest.raises(templates.ConversationError, match="one image-and-caption pair"):
        templates.get("plain").encode(COLOR, tok, N_IMG)


def test_llama3_ids_by_hand():
    tok = word_tokenizer(LLAMA3_WORDS, "llama3")
    c = conv("<image>\nWhat color?", "red.", "Shape?", "square.")
    hdr = lambda role: ["<|start_header_id|>", role, "<|end_header_id|>", "ĊĊ"]  # noqa: E731
    # "\n\n" before text is one pre-token for Llama-3's split rule, as before the image
    want = (["<|begin_of_text|>"] + hdr("system") + SYS_GPT2 + ["<|eot_id|>"] + hdr("user") + [IMG]
            + ["Ċ", "What", "Ġcolor", "?", "<|eot_id|>"] + hdr("assistant")
            + [T("red"), T("."), T("<|eot_id|>")] + hdr("user") + ["Shape", "?", "<|eot_id|>"]
            + hdr("assistant") + [T("square"), T("."), T("<|eot_id|>")])
    assert encode("llama3", tok, c) == ids(tok, want)


def test_qwen2_ids_by_hand():
    tok = word_tokenizer(LLAMA3_WORDS, "llama3")
    c = conv("Say hello.", "hello!", "Again.", "hello!")
    want = (["<|im_start|>", "system", "Ċ"] + SYS_GPT2 + ["<|im_end|>", "Ċ"]
            + ["<|im_start|>", "user", "Ċ", "Say", "Ġhello", ".", "<|im_end|>", "Ċ"]
            + ["<|im_start|>", "assistant", "Ċ", T("hello"), T("!"), T("<|im_end|>"), "Ċ"]
            + ["<|im_start|>", "user", "Ċ", "Again", ".", "<|im_end|>", "Ċ"]
            + ["<|im_start|>", "assistant", "Ċ", T("hello"), T("!"), T("<|im_end|>"), "Ċ"])
    assert encode("qwen2", tok, c) == ids(tok, want)


def test_special_token_text_in_content_is_text():
    """An answer quoting '<|endoftext|>' is trained as that text, not as eos mid-answer;
    '<image>' in an answer is text too; the template's own end token stays special."""
    tok = word_tokenizer(GPT2_WORDS, "gpt2")
    c = conv("What ends a sample?", "The token <|endoftext|> does.")
    want = SYS_GPT2 + ["ĠUSER", ":", "ĠWhat", "Ġends", "Ġa", "Ġsample", "?", "ĠASSISTANT", ":",
                       T("ĠThe"), T("Ġtoken"), T("Ġ<|"), T("endoftext"), T("|>"), T("Ġdoes"), T("."),
                       T("<|endoftext|>")]
    got = encode("bunny", tok, c)
    assert got == ids(tok, want)
    assert got[0].count(tok.eos_token_id) == 1 and got[0][-1] == tok.eos_token_id
    # a question quoting a chat marker; an answer quoting <image> (the real image stays one)
    c = conv("<image>\nSay <|im_start|> ?", "It shows <image> here.")
    tok2 = word_tokenizer(GPT2_WORDS + ["ĠIt"], "gpt2")
    got_ids, got_labels = encode("bunny", tok2, c)
    want = SYS_GPT2 + ["ĠUSER", ":", "Ġ", IMG, "Ċ", "Say", "Ġ<|", "im", "_", "start", "|>", "Ġ?",
                       "ĠASSISTANT", ":", T("ĠIt"), T("Ġshows"), T("Ġ<"), T("image"), T(">"),
                       T("Ġhere"), T("."), T("<|endoftext|>")]
    assert (got_ids, got_labels) == ids(tok2, want)
    image_id = tok2.convert_tokens_to_ids("<image>")
    assert got_ids.count(image_id) == N_IMG  # only the human turn's image


def test_image_is_moved_to_the_front_as_preprocess_multimodal_does():
    assert normalize_image(conv("What color is it?\n<image>", "Red.")) == \
        conv("<image>\nWhat color is it?", "Red.")
    assert normalize_image(conv("  <image>  ", "a")) == conv("<image>", "a")
    assert normalize_image(conv("a <image> b <image>", "x <image>")) == conv("<image>\na  b", "x <image>")
    tok = word_tokenizer(GPT2_WORDS, "gpt2")
    last = conv("What color is it? <image>", "Red.", "And the shape?", "A square.")
    assert encode("bunny", tok, last) == encode("bunny", tok, COLOR)
    assert templates.get("bunny").render(last, tok) == (
        f"{templates.BUNNY_SYSTEM} USER: <image>\nWhat color is it? ASSISTANT: Red.<|endoftext|>"
        "USER: And the shape? ASSISTANT: A square.<|endoftext|>")
    assert templates.get("vicuna_v1").render(conv("q <image>"), word_tokenizer(SP_WORDS, "sp"),
                                             add_generation_prompt=True) == \
        f"<s>{templates.BUNNY_SYSTEM} USER: <image>\nq ASSISTANT:"


@pytest.mark.parametrize("name,style,words", [
    ("bunny", "gpt2", GPT2_WORDS), ("vicuna_v1", "sp", SP_WORDS), ("vicuna_v1", "sp-first", SP_WORDS),
    ("llama3", "llama3", LLAMA3_WORDS), ("qwen2", "llama3", LLAMA3_WORDS),
    ("plain", "gpt2", GPT2_WORDS)])
def test_image_last_rows_give_generate_the_training_prompt(name, style, words):
    """An image-last training row and `warren generate`'s prompt for the same question
    give the same ids up to the first trained token."""
    tok = word_tokenizer(words, style)
    question = {"plain": "What color is it?", "bunny": "What color is it?",
                "vicuna_v1": "What color is it?"}.get(name, "What color?")
    answer = {"llama3": "red.", "qwen2": "hello!"}.get(name, "Red." if name != "plain" else "a red square")
    row = conv(f"{question}\n<image>", answer)
    ids_, labels = encode(name, tok, row)
    first = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    loaded = SimpleNamespace(template=templates.get(name), tokenizer=tok,
                             model=SimpleNamespace(num_image_tokens=N_IMG))
    assert generate.prompt_ids(loaded, question, with_image=True) == ids_[:first]


def test_one_image_placeholder_for_warren_tokens():
    tok = word_tokenizer(GPT2_WORDS, "gpt2")
    got, labels = templates.get("bunny").encode(COLOR, tok, 1, image_token_id=IMAGE_TOKEN_INDEX)
    full, _ = encode("bunny", tok, COLOR)
    k = got.index(IMAGE_TOKEN_INDEX)
    assert got.count(IMAGE_TOKEN_INDEX) == 1 and labels[k] == IGNORE_INDEX
    assert got[:k] + [tok.convert_tokens_to_ids("<image>")] * N_IMG + got[k + 1:] == full


def test_stop_ids_and_markers_the_tokenizer_lacks():
    tok = word_tokenizer(GPT2_WORDS, "gpt2")
    assert templates.get("bunny").stop_ids(tok) == [tok.eos_token_id]
    assert templates.get("plain").stop_ids(tok) == [tok.get_vocab()["Ċ"], tok.eos_token_id]
    sp = word_tokenizer(SP_WORDS, "sp")
    with pytest.raises(templates.ConfigError, match=r"'bunny' writes <\|endoftext\|>"):
        templates.get("bunny").check_tokenizer(sp)
    templates.get("vicuna_v1").check_tokenizer(sp)
    with pytest.raises(templates.ConfigError, match="</s>"):
        templates.get("vicuna_v1").check_tokenizer(tok)


def test_generation_prompt_must_end_with_a_human_turn():
    tok = word_tokenizer(GPT2_WORDS, "gpt2")
    with pytest.raises(templates.ConversationError, match="end with a human turn"):
        templates.get("bunny").encode(COLOR, tok, N_IMG, add_generation_prompt=True)


@pytest.mark.parametrize("turns,has_image,reason", [
    ([], False, "no turns"),
    ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}], False, "turn 0 is from 'gpt'"),
    ([{"from": "human", "value": "x"}], False, "expected human/gpt pairs"),
    ([{"from": "human", "value": "x"}, {"from": "gpt", "value": "  "}], False, "turn 1 is empty"),
    ([{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], True, "0 <image> markers"),
    ([{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}], False,
     "text-only sample contains <image>"),
    ([{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "a"},
      {"from": "human", "value": "<image>y"}, {"from": "gpt", "value": "b"}], True, "2 <image> markers"),
])
def test_malformed_conversations_have_reasons(turns, has_image, reason):
    assert reason in check_conversation(turns, has_image)


def test_valid_conversations_pass():
    assert check_conversation(conv("<image>\nq", "a", "q2", "a2"), True) is None
    assert check_conversation(conv("q", "a"), False) is None
    # the image may sit in any one human turn, and an answer may quote <image> as text
    assert check_conversation(conv("q", "a", "q2 <image>", "a2"), True) is None
    assert check_conversation(conv("<image>x", "write <image> to add a picture"), True) is None
