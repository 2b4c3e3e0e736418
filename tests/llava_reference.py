"""Bunny's and LLaVA's training preprocessing, re-derived for comparison with Warren.

Written from reading their code (Bunny: bunny/util/data_utils.py, bunny/conversation.py,
bunny/util/mm_utils.py; LLaVA: llava/train/train.py, llava/conversation.py,
llava/mm_utils.py), step by step, not copied. Each function returns
(input_ids, labels, mismatch): `mismatch` is where their code prints "WARNING:
tokenization mismatch" and masks the whole sample.

The steps they share:
- preprocess_multimodal: in every turn holding `<image>` (answers too), remove it,
  strip, put "<image>\\n" in front, strip again.
- get_prompt (SeparatorStyle.TWO): a leading gpt turn is dropped; then
  system + sep, and per turn "ROLE: message" + (sep after a question, sep2 after an
  answer); an empty message gives "ROLE:".
- tokenizer_image_token: the prompt cut at "<image>", each piece tokenized with the
  tokenizer's defaults (BOS where it adds one); a BOS of the first piece is kept, every
  other piece loses its first token when the tokenizer adds BOS; one -200 per cut.
- The mask: the prompt is split at sep2 into rounds; a round is split at
  sep + "ASSISTANT: "; the question part's token count, less the trailing space token
  (and less BOS for LLaVA), is masked; a round counts its tokens plus the sep2 token.
  When the counted length differs from the real one, everything is masked.
"""
from __future__ import annotations

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE = "<image>"
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200


def multimodal(conversations: list[dict]) -> list[dict]:
    out = []
    for turn in conversations:
        value = turn["value"]
        if IMAGE in value:
            value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
        out.append({**turn, "value": value})
    return out


def prompt_two(conversations: list[dict], sep: str, sep2: str) -> str:
    if conversations and conversations[0]["from"] != "human":
        conversations = conversations[1:]
    roles = ("USER", "ASSISTANT")
    text = SYSTEM + sep
    for i, turn in enumerate(conversations):
        assert turn["from"] == ("human", "gpt")[i % 2]
        if turn["value"]:
            text += f"{roles[i % 2]}: {turn['value']}" + (sep, sep2)[i % 2]
        else:
            text += f"{roles[i % 2]}:"
    return text


def image_token_ids(prompt: str, tokenizer) -> list[int]:
    pieces = [tokenizer(p)["input_ids"] for p in prompt.split(IMAGE)]
    skip = 1 if pieces and pieces[0] and pieces[0][0] == tokenizer.bos_token_id else 0
    ids = [pieces[0][0]] if skip else []
    for k, piece in enumerate(pieces):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += piece[skip:]
    return ids


def _count(text: str, tokenizer, has_image: bool) -> int:
    return len(image_token_ids(text, tokenizer) if has_image else tokenizer(text)["input_ids"])


def _mask(target: list[int], start: int, stop: int) -> None:
    """target[start:stop] = IGNORE_INDEX with Python/torch slice semantics (length kept)."""
    idx = range(len(target))[start:stop]
    for k in idx:
        target[k] = IGNORE_INDEX


def _two(conversations, tokenizer, has_image, sep2, bunny: bool):
    """bunny: Bunny's counting (a round counts its end token, no BOS, end tokens uncounted
    when pad = eos); else LLaVA v1's (BOS first and standing in for the end token, one
    less per later round for a non-legacy tokenizer)."""
    first, less = (0, 1) if bunny else (1, 2)
    convs = multimodal(conversations) if has_image else conversations
    prompt = prompt_two(convs, " ", sep2)
    ids = image_token_ids(prompt, tokenizer) if has_image else tokenizer(prompt)["input_ids"]
    target = list(ids)
    total = sum(1 for t in target if t != tokenizer.pad_token_id)
    sep = " ASSISTANT: "
    cur, ends = first, 0
    _mask(target, 0, first)
    for i, rnd in enumerate(prompt.split(sep2)):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        question = parts[0] + sep
        round_len = _count(rnd, tokenizer, has_image)
        question_len = _count(question, tokenizer, has_image) - less
        if bunny:
            round_len += 1
            ends += 1
        elif i != 0 and not getattr(tokenizer, "legacy", True):
            round_len -= 1
            question_len -= 1
        _mask(target, cur, cur + question_len)
        cur += round_len
    _mask(target, cur, len(target))
    if bunny and tokenizer.pad_token_id == tokenizer.eos_token_id:
        cur -= ends
    mismatch = cur != total
    if mismatch:
        target = [IGNORE_INDEX] * len(target)
    return ids, target, mismatch


def preprocess_bunny(conversations, tokenizer, has_image: bool):
    """Bunny's preprocess_bunny with conv_bunny (sep ' ', sep2 '<|endoftext|>')."""
    return _two(conversations, tokenizer, has_image, "<|endoftext|>", bunny=True)


def preprocess_v1(conversations, tokenizer, has_image: bool):
    """LLaVA's preprocess_v1 with conv_vicuna_v1 (sep ' ', sep2 '</s>'), tokenizers >= 0.14."""
    return _two(conversations, tokenizer, has_image, "</s>", bunny=False)


def preprocess_plain(conversations, tokenizer):
    """LLaVA's and Bunny's preprocess_plain (conv_plain.sep = '\\n'), after multimodal."""
    convs = multimodal(conversations)
    assert len(convs) == 2 and IMAGE in convs[0]["value"]
    prompt = IMAGE + convs[1]["value"] + "\n"
    ids = image_token_ids(prompt, tokenizer)
    target = list(ids)
    _mask(target, 0, len(image_token_ids(IMAGE, tokenizer)))
    return ids, target, False
