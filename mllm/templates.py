"""Conversation templates and exact label masks.

A template renders a conversation as a list of text segments, each marked trainable
or not; every segment is tokenized on its own and the ids concatenated. The mask is
therefore exact by construction: a label is the token id inside an assistant answer
(or its end token) and IGNORE_INDEX everywhere else. There is no "tokenization
mismatch" to detect or paper over, because nothing is re-tokenized as a whole. The
same function encodes generation prompts, so training and inference see the same ids.

`<image>` inside a human turn becomes `num_image_tokens` copies of the image token id.

Registry: `REGISTRY[name] -> Template`; `register()` adds more (e.g. TinyGPT-V's
task-identifier templates).
"""
from __future__ import annotations

from dataclasses import dataclass

from mllm.tokenizer import IMAGE_TOKEN
from pipelines.errors import ConfigError

IGNORE_INDEX = -100

BUNNY_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class ConversationError(ValueError):
    """A conversation that no template can render (the reason says why)."""


@dataclass(frozen=True)
class Template:
    """How one conversation becomes text. `{system}` and `{content}` are filled in.

    prefix       once, at the start (holds the system prompt)
    user         around each human turn
    assistant    the untrained lead-in of each answer (generation prompts end here)
    answer       the trained part: the answer and its end token `{end}`
    after        untrained text after each answer
    end          the end-of-turn token; None = the tokenizer's eos
    prompt_text  False (stage-1 'plain') keeps only `<image>` from human turns
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

    def end_token(self, tokenizer) -> str:
        return self.end if self.end is not None else tokenizer.eos_token

    def segments(self, conversations: list[dict], tokenizer,
                 add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """(text, trainable) pieces of the rendered conversation."""
        end = self.end_token(tokenizer)
        out: list[tuple[str, bool]] = []
        if self.prefix:
            out.append((self.prefix.format(system=self.system), False))
        for turn in conversations:
            text = turn["value"]
            if turn["from"] == "human":
                if not self.prompt_text:
                    text = IMAGE_TOKEN if IMAGE_TOKEN in text else ""
                out.append((self.user.format(content=text), False))
                if self.assistant:
                    out.append((self.assistant, False))
            else:
                out.append((self.answer.format(content=text, end=end), True))
                if self.after:
                    out.append((self.after, False))
        if add_generation_prompt and conversations and conversations[-1]["from"] == "gpt":
            raise ConversationError("a generation prompt must end with a human turn")
        return [(t, tr) for t, tr in out if t]

    def encode(self, conversations: list[dict], tokenizer, num_image_tokens: int,
               add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE_INDEX outside assistant answers)."""
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        ids: list[int] = []
        labels: list[int] = []
        for text, trainable in self.segments(conversations, tokenizer, add_generation_prompt):
            pieces = text.split(IMAGE_TOKEN)
            for k, piece in enumerate(pieces):
                if k:
                    if trainable:
                        raise ConversationError("<image> inside an assistant turn")
                    ids += [image_id] * num_image_tokens
                    labels += [IGNORE_INDEX] * num_image_tokens
                if piece:
                    tok = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += tok
                    labels += tok if trainable else [IGNORE_INDEX] * len(tok)
        return ids, labels


REGISTRY: dict[str, Template] = {}


def register(template: Template) -> Template:
    REGISTRY[template.name] = template
    return template


# LLaVA's stage-1 'plain' format: the image, then the caption and eos; the prompt text
# is dropped and the caption alone is trained.
register(Template(name="plain", prefix="", user="{content}", assistant="",
                  answer="{content}{end}", prompt_text=False))
# Bunny's Phi-2 format (LLaVA 'two' separators: ' ' after the user turn, eos after the
# answer): "{system} USER: <image>\n{q} ASSISTANT: {a}<|endoftext|>USER: ..."
# The space after 'ASSISTANT:' belongs to the answer, where a BPE puts it (' a').
register(Template(name="bunny", prefix="{system} ", user="USER: {content} ", assistant="ASSISTANT:",
                  answer=" {content}{end}", end="<|endoftext|>"))
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
    gpt; every value is a string; an image sample has exactly one `<image>`, in its
    first human turn; a text-only sample has none."""
    if not isinstance(conversations, list) or not conversations:
        return "no turns"
    if len(conversations) % 2:
        return f"{len(conversations)} turns: expected human/gpt pairs"
    n_image = 0
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
        count = value.count(IMAGE_TOKEN)
        if count and (want == "gpt" or k > 0):
            return f"<image> in turn {k} (only the first human turn may hold it)"
        n_image += count
    if has_image and n_image != 1:
        return f"image sample with {n_image} <image> markers (expected 1)"
    if not has_image and n_image:
        return "text-only sample contains <image>"
    return None
