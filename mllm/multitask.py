"""TinyGPT-V's prompts, tokenized the way TinyGPT-V tokenizes them, and its task
identifiers.

TinyGPT-V (MiniGPT-4 / MiniGPT-v2 code) builds a training sample as

    [bos] + tok(prompt before the image) + image tokens + tok(prompt after the image)
          + tok(answer + end_sym) [+ tok(bos + next prompt) + tok(next answer + end_sym) ...]

each piece tokenized on its own without special tokens (`prompt_wrap` splits the prompt
at `<ImageHere>`; `tokenize_conversation` tokenizes each answer with its end symbol, and
each later question with the bos text in front); only answer tokens (end symbol
included) carry loss. The formats (one per stage):

  tinygptv-pretrain   stages 1-2: no prompt at all, the caption ends in "\\n"
                      [bos] <image tokens> {caption}\\n
  tinygptv-instruct   stage 3 (train_configs/tinygptv_stage3.yaml, prompt_template and
                      MiniGPT-4's alignment prompts), end symbol "###"
                      [bos] ###Human: <Img><image tokens></Img> {question} ###Assistant: {answer}###
  tinygptv            stage 4 (tinygptv_stage4.yaml: chat_template with MiniGPT-v2's
                      default '[INST] {} [/INST]'; its datasets write
                      '<Img><ImageHere></Img> {instruction} ', with a space after), "###"
                      [bos] [INST] <Img><image tokens></Img> [vqa] {question}  [/INST]{answer}###
  tinygptv-<task>     the stage-4 format, tagging an untagged image conversation with <task>

Text-only stage-4 records (TinyGPT-V's unnatural-instructions set) are
`[INST] {instruction} [/INST]`, no space added. Later human turns of a conversation are
`bos + prompt_template.format(question)`, with a space after the question in the stage-4
format (TinyGPT-V's conversation datasets add it). A record's `<image>` marker (wherever
it is in the first human turn, with the whitespace around it) becomes
`<Img><image></Img> ` in front of the question, as TinyGPT-V's LLaVA-style datasets do.

bos: the tokenizer's bos token, else its eos (Phi-2's are both <|endoftext|>).

Task identifiers (MiniGPT-v2): `[vqa]`, `[caption]`, `[refer]`, `[grounding]`,
`[identify]`, `[detection]`, right after the image; boxes `{<x1><y1><x2><y2>}` on a
0-100 grid (pipelines.mix.tasks, which also tags MIX records).

These templates are registered in mllm.templates.REGISTRY by `register()` (called by
mllm.tinygptv.register); their `encode` is their own.
"""
from __future__ import annotations

from dataclasses import dataclass

from mllm import templates
from mllm.templates import IGNORE_INDEX, ConversationError, Template
from mllm.tokenizer import IMAGE_TOKEN
from pipelines.mix.tasks import (GRID, TASKS, box_to_pixels, format_box, format_grounded, identifier,
                                 parse_boxes, tag_text, task_in)

__all__ = ["TASKS", "GRID", "TinyGPTVTemplate", "format_box", "format_grounded", "parse_boxes",
           "box_to_pixels", "instruction", "task_in", "TEMPLATE_NAME", "register"]

TEMPLATE_NAME = "tinygptv"
IMG_OPEN, IMG_CLOSE = "<Img>", "</Img>"

# MiniGPT-v2-style instructions, one per task ({} is the subject: a phrase, a box, ...);
# each is one of the instruction pools of TinyGPT-V's stage-4 datasets.
INSTRUCTIONS = {
    "vqa": "{}",                                          # coco_vqa_datasets.py
    "caption": "Briefly describe this image.",            # text_caps.py
    "refer": "give me the location of {}",                # coco_dataset.py (refcoco)
    "grounding": "describe this image as detailed as possible",  # flickr.py
    "identify": "what object is in this location {}",     # coco_dataset.py (invrefcoco)
    "detection": "{}",                                    # flickr.py (ObjectToPhrase)
}

# One of MiniGPT-4's stage-2 alignment prompts (prompts/alignment.txt), TinyGPT-V stage 3.
ALIGNMENT_PROMPT = "Describe this image in detail."


def instruction(task: str, subject: str = "") -> str:
    """The tagged first human turn for `task` (with the image): e.g.
    instruction('refer', 'the red square') -> '<image>\\n[refer] give me the location of the red square'."""
    return f"<image>\n{identifier(task)} {INSTRUCTIONS[task].format(subject)}".rstrip()


def split_image(text: str) -> tuple[bool, str]:
    """(has the image, the text without the marker and the whitespace around it)."""
    if IMAGE_TOKEN not in text:
        return False, text
    if text.count(IMAGE_TOKEN) > 1:
        raise ConversationError(f"{text.count(IMAGE_TOKEN)} <image> markers in one turn")
    before, after = text.split(IMAGE_TOKEN)
    before, after = before.strip(), after.strip()
    return True, f"{before} {after}".strip() if before and after else (before or after)


@dataclass(frozen=True)
class TinyGPTVTemplate(Template):
    """One of TinyGPT-V's formats (see the module docstring).

    style         pretrain | instruct | multitask
    prompt        the prompt template; `{}` is the human turn
    space_after   a space after an image conversation's questions (stage 4)
    task          tags an untagged first human turn that has the image
    require_task  refuses image conversations without an identifier
    """

    style: str = "multitask"
    prompt: str = "[INST] {} [/INST]"
    space_after: bool = True
    task: str | None = None
    require_task: bool = False

    # ------------------------------------------------------------------ text

    def _tagged(self, conversations: list[dict]) -> list[dict]:
        out = [dict(t) for t in conversations]
        first = next((t for t in out if t.get("from") == "human"), None)
        if first is None:
            return out
        if self.task is not None and IMAGE_TOKEN in first["value"] and task_in(first["value"]) is None:
            first["value"] = tag_text(first["value"], self.task)
        if self.require_task and IMAGE_TOKEN in first["value"] and task_in(first["value"]) is None:
            raise ConversationError(f"template '{self.name}' needs a task identifier "
                                    f"({', '.join('[' + t + ']' for t in TASKS)}) in the first "
                                    "human turn: tag the records with pipelines.mix.tasks")
        return out

    def _pairs(self, conversations: list[dict], add_generation_prompt: bool):
        turns = self._tagged(conversations)
        if not turns or turns[0].get("from") != "human":
            raise ConversationError("a conversation starts with a human turn")
        if add_generation_prompt and turns[-1].get("from") != "human":
            raise ConversationError("a generation prompt must end with a human turn")
        for k, t in enumerate(turns):
            if t.get("from") != ("human" if k % 2 == 0 else "gpt"):
                raise ConversationError(f"turn {k} is from {t.get('from')!r}: turns alternate human, gpt")
        questions = [t["value"] for t in turns[0::2]]
        answers = [t["value"] for t in turns[1::2]]
        return questions, answers

    def prompts(self, questions: list[str]) -> tuple[bool, list[str]]:
        """(has image, the prompt text of each human turn), the image as `<image>`."""
        has_image, first = split_image(questions[0])
        for q in questions[1:]:
            if IMAGE_TOKEN in q:
                raise ConversationError("<image> after the first human turn")
        if self.style == "pretrain":
            if not has_image or len(questions) > 1:
                raise ConversationError(f"template '{self.name}' (TinyGPT-V stages 1-2) takes an image "
                                        "and one caption")
            return True, [IMAGE_TOKEN]
        space = " " if (self.space_after and has_image) else ""
        texts = [f"{IMG_OPEN}{IMAGE_TOKEN}{IMG_CLOSE} {first}{space}" if has_image else f"{first}{space}"]
        texts += [f"{q}{space}" for q in questions[1:]]
        return has_image, [self.prompt.format(t) for t in texts]

    def segments(self, conversations: list[dict], tokenizer,
                 add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """(text, trained) pieces in order, each tokenized on its own (bos included)."""
        questions, answers = self._pairs(conversations, add_generation_prompt)
        _, prompts = self.prompts(questions)
        bos = bos_text(tokenizer)
        end = self.end_token(tokenizer)
        out: list[tuple[str, bool]] = [(bos, False)]
        for k, prompt in enumerate(prompts):
            if k == 0:
                head, _, tail = prompt.partition(IMAGE_TOKEN)
                out += [(head, False), (IMAGE_TOKEN, False), (tail, False)] if IMAGE_TOKEN in prompt \
                    else [(prompt, False)]
            else:  # later turns: the bos text, then the prompt (MiniGPT-4's conversation)
                out += [(bos, False), (prompt, False)]
            if k < len(answers):
                out.append((answers[k] + end, True))
        return [(t, tr) for t, tr in out if t]

    # ----------------------------------------------------------------- tokens

    def encode(self, conversations: list[dict], tokenizer, num_image_tokens: int,
               add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and labels as TinyGPT-V builds them (IGNORE_INDEX outside answers)."""
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        ids: list[int] = []
        labels: list[int] = []
        bos = bos_text(tokenizer)
        for text, trained in self.segments(conversations, tokenizer, add_generation_prompt):
            if text == bos and not trained:  # TinyGPT-V's bos before every human turn
                ids.append(bos_id(tokenizer))
                labels.append(IGNORE_INDEX)
                continue
            if text == IMAGE_TOKEN:
                ids += [image_id] * num_image_tokens
                labels += [IGNORE_INDEX] * num_image_tokens
                continue
            if IMAGE_TOKEN in text:
                raise ConversationError("<image> inside an answer or a later turn")
            # Nothing in TinyGPT-V's prompts is a special token, so every piece is
            # tokenized with special-token text split: content can never become eos.
            tok = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            ids += tok
            labels += tok if trained else [IGNORE_INDEX] * len(tok)
        return ids, labels


def bos_text(tokenizer) -> str:
    return tokenizer.bos_token or tokenizer.eos_token


def bos_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _template(name: str, style: str, prompt: str, end: str, **kw) -> TinyGPTVTemplate:
    user = prompt.replace("{}", "{content}")
    # prefix/user/assistant/answer hold the fixed text (the trainer's local tokenizer
    # learns from it); encoding is TinyGPTVTemplate.encode.
    return TinyGPTVTemplate(name=name, prefix="", user=user, assistant="", answer="{content}{end}",
                            end=end, system="", style=style, prompt=prompt, **kw)


STAGE3_PROMPT = "###Human: {} ###Assistant: "
STAGE4_PROMPT = "[INST] {} [/INST]"


def register() -> None:
    templates.register(_template("tinygptv-pretrain", "pretrain", "{}", "\n", space_after=False))
    templates.register(_template("tinygptv-instruct", "instruct", STAGE3_PROMPT, "###", space_after=False))
    templates.register(_template(TEMPLATE_NAME, "multitask", STAGE4_PROMPT, "###"))
    for task in TASKS:
        templates.register(_template(f"{TEMPLATE_NAME}-{task}", "multitask", STAGE4_PROMPT, "###", task=task))
