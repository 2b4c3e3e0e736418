"""Conversation templates: how a conversation becomes the text, ids and labels a model
trains on, token for token as Bunny's and LLaVA's own preprocessing makes them.

    ids, labels = templates.get("bunny").encode(conversations, tokenizer, num_image_tokens)

Templates (registry `REGISTRY`; `register()` adds more, e.g. TinyGPT-V's):
  plain      LLaVA/Bunny `preprocess_plain` (stage 1): `<image>` + caption + "\\n"; the
             question is dropped, the caption and its "\\n" are trained.
  bunny      Bunny's `preprocess_bunny` (conv_bunny, Phi-2):
             "{system} USER: <image>\\n{q} ASSISTANT: {a}<|endoftext|>USER: ..."
  vicuna_v1  LLaVA's `preprocess_v1` (conv_vicuna_v1, LLaVA-1.5):
             "<s>{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ..."
  llama3, qwen2   the models' own chat formats.
`phi2` is an alias of `bunny`.

What is shared by training, `warren generate`, eval and `warren tokens`:
- `normalize_image`: the image moved to the front of its human turn, as LLaVA's and
  Bunny's `preprocess_multimodal` do.
- The ids: each image-free chunk of the rendered text is tokenized in one call, as the
  reference does (mllm.encoding); labels are the answers and their end tokens, by
  character offsets. Content never becomes a special token.
- `<image>` becomes `num_image_tokens` image ids (training), or one id such as LLaVA's
  IMAGE_TOKEN_INDEX -200 (`warren tokens`).
Where the reference code is wrong (docs/train.md, "Templates"), Warren is right.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mllm.encoding import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, ConversationError, Segment,
                           encode_segments, start_text)
from mllm.tokenizer import IMAGE_TOKEN
from pipelines.errors import ConfigError

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "BUNNY_SYSTEM", "ConversationError", "Segment",
           "Template", "REGISTRY", "register", "get", "normalize_image", "check_conversation"]

BUNNY_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# Chat-format markers a template may spell out; each must be one token of the tokenizer.
_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>|</s>")


def normalize_image(conversations: list[dict]) -> list[dict]:
    """The conversation as LLaVA/Bunny `preprocess_multimodal` leaves it: in a human turn
    holding `<image>`, every `<image>` is removed, the rest stripped, and one `<image>\\n`
    put in front (then stripped again, so an image-only turn is just `<image>`).
    Assistant turns are left alone: there `<image>` is text. Returns a new list."""
    out = []
    for turn in conversations:
        value = turn.get("value") if isinstance(turn, dict) else None
        if isinstance(value, str) and turn.get("from") == "human" and IMAGE_TOKEN in value:
            turn = {**turn, "value": (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()}
        out.append(turn)
    return out


def _fill(fmt: str, content: str | None, **fixed: str) -> list[tuple[str, bool]]:
    """`fmt` with `{content}` (data) and the fixed fields filled: (text, is_content) parts."""
    for key, value in fixed.items():
        fmt = fmt.replace("{" + key + "}", value)
    if content is None:
        return [(fmt, False)]
    before, sep, after = fmt.partition("{content}")
    if not sep:
        raise ConfigError(f"template text {fmt!r} has no {{content}}")
    return [(before, False), (content, True), (after, False)]


@dataclass(frozen=True)
class Template:
    """How one conversation becomes text. `{system}`, `{content}` and `{end}` are filled in.

    prefix       once, at the start (holds the system prompt)
    user         around each human turn
    assistant    the untrained lead-in of each answer (generation prompts end here)
    answer       the trained part: the answer and its end token `{end}`
    after        untrained text after each answer
    end          the end-of-answer text; None = the tokenizer's eos
    prompt_text  False (stage-1 'plain'): one image-and-caption pair; of the human turn
                 only `<image>` is kept
    bos          start with the tokenizer's own start token, as `tokenizer(text)` does
                 (the reference templates); False where the template spells it out
    """

    name: str
    prefix: str
    user: str
    assistant: str
    answer: str
    after: str = ""
    end: str | None = None
    system: str = BUNNY_SYSTEM
    prompt_text: bool = True
    bos: bool = False

    def end_token(self, tokenizer) -> str:
        return self.end if self.end is not None else tokenizer.eos_token

    def stop_ids(self, tokenizer) -> list[int]:
        """Token ids that end a generated answer: the end token (when it is one token)
        and the tokenizer's eos."""
        end, ids = self.end_token(tokenizer), []
        vocab = tokenizer.get_vocab()
        if end in vocab:
            ids.append(vocab[end])
        else:
            piece = tokenizer(end, add_special_tokens=False)["input_ids"]
            ids += piece[-1:] if piece and tokenizer.decode(piece[-1:]) == end else []
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        return ids

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ConfigError if a marker this template writes (its end token, chat
        markers) is not one token of `tokenizer`: the model could never emit it."""
        fixed = [self.prefix, self.user, self.assistant, self.answer, self.after]
        wanted = {self.end_token(tokenizer)} | {m for f in fixed for m in _MARKER.findall(f)}
        vocab = tokenizer.get_vocab()
        missing = sorted(m for m in wanted if m and m.strip() and m not in vocab)
        if missing:
            raise ConfigError(f"template '{self.name}' writes {', '.join(missing)}, which "
                              f"{'is' if len(missing) == 1 else 'are'} not a token of this tokenizer")

    def segments(self, conversations: list[dict], tokenizer,
                 add_generation_prompt: bool = False) -> list[Segment]:
        """The rendered conversation as (text, trainable) Segments, image normalised."""
        conv = normalize_image(conversations)
        for k, turn in enumerate(conv):
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") \
                    or not isinstance(turn.get("value"), str):
                raise ConversationError(f"turn {k} is not a human or gpt turn with text")
        if add_generation_prompt and (not conv or conv[-1]["from"] != "human"):
            raise ConversationError("a generation prompt must end with a human turn")
        if not self.prompt_text:
            want = ["human"] if add_generation_prompt else ["human", "gpt"]
            if [t["from"] for t in conv] != want or IMAGE_TOKEN not in conv[0]["value"]:
                raise ConversationError(f"template '{self.name}' takes one image-and-caption pair "
                                        "(a human turn with <image>, then the caption)")
        end = self.end_token(tokenizer)
        out: list[Segment] = []
        if self.prefix:
            out.append(Segment(_fill(self.prefix, None, system=self.system), False))
        for turn in conv:
            text = turn["value"]
            if turn["from"] == "human":
                if not self.prompt_text:
                    text = IMAGE_TOKEN
                out.append(Segment(_fill(self.user, text, system=self.system), False))
                if self.assistant:
                    out.append(Segment(_fill(self.assistant, None), False))
            else:
                out.append(Segment(_fill(self.answer, text, end=end), True))
                if self.after:
                    out.append(Segment(_fill(self.after, None), False))
        return [s for s in out if s[0]]

    def render(self, conversations: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
        """The whole text the model sees, `<image>` once where the image goes, starting
        with the tokenizer's start token when the template uses it."""
        text = "".join(s[0] for s in self.segments(conversations, tokenizer, add_generation_prompt))
        return (start_text(tokenizer) if self.bos else "") + text

    def encode(self, conversations: list[dict], tokenizer, num_image_tokens: int,
               add_generation_prompt: bool = False,
               image_token_id: int | None = None) -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE_INDEX outside answers and their end tokens).
        `<image>` becomes `num_image_tokens` copies of `image_token_id` (default: the
        tokenizer's `<image>` id). Raises ConversationError."""
        (result,) = self.encode_many([conversations], tokenizer, num_image_tokens,
                                     add_generation_prompt, image_token_id)
        if isinstance(result, Exception):
            raise result
        return result

    def encode_many(self, conversations_list, tokenizer, num_image_tokens: int,
                    add_generation_prompt: bool = False, image_token_id: int | None = None) -> list:
        """`encode` over many conversations in one batched tokenizer call; a
        conversation that cannot be rendered gives its ConversationError in place."""
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        rows = []
        for conv in conversations_list:
            try:
                rows.append(self.segments(conv, tokenizer, add_generation_prompt))
            except ConversationError as e:
                rows.append(e)
        return encode_segments(rows, tokenizer, num_image_tokens, image_token_id, self.bos)


REGISTRY: dict[str, Template] = {}


def register(template: Template) -> Template:
    REGISTRY[template.name] = template
    return template


# LLaVA's and Bunny's stage-1 'plain' (conv_plain, sep "\n"): the image, the caption and
# "\n"; the question is dropped and the caption with its "\n" is trained.
register(Template(name="plain", prefix="", user="{content}", assistant="",
                  answer="{content}{end}", end="\n", system="", prompt_text=False, bos=True))
# Bunny's Phi-2 format (separators ' ' after the question, eos after the answer).
# The space after 'ASSISTANT:' is rendered with the answer, where the tokenizer merges it.
register(Template(name="bunny", prefix="{system} ", user="USER: {content} ", assistant="ASSISTANT:",
                  answer=" {content}{end}", end="<|endoftext|>", bos=True))
# LLaVA-1.5's Vicuna format: the same text with '</s>' after each answer, after BOS.
register(Template(name="vicuna_v1", prefix="{system} ", user="USER: {content} ",
                  assistant="ASSISTANT:", answer=" {content}{end}", end="</s>", bos=True))
register(Template(
    name="llama3",
    prefix="<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
    answer="{content}{end}", end="<|eot_id|>"))
register(Template(
    name="qwen2", prefix="<|im_start|>system\n{system}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n", assistant="<|im_start|>assistant\n",
    answer="{content}{end}", after="\n", end="<|im_end|>"))
# Aliases: the Phi-2 template is Bunny's.
REGISTRY["phi2"] = REGISTRY["bunny"]


def get(name: str) -> Template:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown template '{name}' (known: {', '.join(sorted(REGISTRY))})") from None


def check_conversation(conversations, has_image: bool) -> str | None:
    """Why a conversation cannot be trained on, or None if it can.

    Turns alternate human, gpt, human, gpt, ... starting with human and ending with
    gpt; every value is a non-blank string; an image sample has `<image>` in exactly one
    human turn (normalize_image puts it at that turn's front); a text-only sample has
    none. `<image>` in an answer is text, as any special-token text in content is."""
    if not isinstance(conversations, list) or not conversations:
        return "no turns"
    if len(conversations) % 2:
        return f"{len(conversations)} turns: expected human/gpt pairs"
    image_turns = 0
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            return f"turn {k} is not a mapping"
        want = "human" if k % 2 == 0 else "gpt"
        if turn.get("from") != want:
            return f"turn {k} is from {turn.get('from')!r}, expected {want!r}"
        value = turn.get("value")
        if not isinstance(value, str):
            return f"turn {k} has no text"
        if not value.strip():
            return f"turn {k} is empty"
        if want == "human" and IMAGE_TOKEN in value:
            image_turns += 1
    if has_image and image_turns != 1:
        return f"image sample with {image_turns} <image> markers (expected 1, in a human turn)"
    if not has_image and image_turns:
        return "text-only sample contains <image>"
    return None
