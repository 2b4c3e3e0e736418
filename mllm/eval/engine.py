"""Generation for evaluation: batched, left-padded, greedy, with a KV cache.

    loaded = mllm.export.load(folder)
    for batch in answer_batches(loaded, questions, data_dir, batch_size=16, workers=2):
        for a in batch:                      # Answer(question, text, tokens), in order
            ...

Questions are asked in the order given, `batch_size` at a time. Each prompt is built by
`mllm.generate.prompt_ids` (the template's generation prompt with `<image>\\n` first, as
training saw it), left-padded to the longest prompt of the batch, and decoded greedily
until the template's stop token(s) (as `mllm.generate.answer` stops) or the question's
`max_new_tokens`. Position ids count
only real tokens (cumsum of the attention mask), so a padded row sees exactly the
positions it would alone: the answers do not depend on the batch size (a test checks it
against one-question-at-a-time `generate`). Rows that finish leave the batch (their KV
cache rows are dropped), so one long answer does not make the others wait per token.

Images are read and preprocessed in DataLoader worker processes (`workers`), one batch
ahead of the model, so decoding JPEGs overlaps generation.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from mllm.eval.types import Question
from pipelines.errors import InputError


@dataclass(frozen=True)
class Answer:
    question: Question
    text: str
    tokens: int          # generated tokens, the end token excluded


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def image_source(image, data_dir: str | None):
    """What the image processor opens: bytes as they are, a path resolved against the
    benchmark folder."""
    if image is None or isinstance(image, (bytes, bytearray)):
        return image
    path = str(image)
    if data_dir and not os.path.isabs(path):
        path = os.path.join(data_dir, path)
    return path


class _Pixels(torch.utils.data.Dataset):
    """Decode + preprocess one question's image (runs in the worker processes). A
    failure comes back as a message, so the main process raises one clear error naming
    the question instead of a worker traceback."""

    def __init__(self, images: Sequence, data_dir: str | None, processor):
        self.images, self.data_dir, self.processor = list(images), data_dir, processor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        src = image_source(self.images[i], self.data_dir)
        if src is None:
            return i, None, None
        try:
            return i, self.processor(src), None
        except Exception as e:  # noqa: BLE001 — any unreadable image is reported by name
            return i, None, f"{type(e).__name__}: {e}"


def stop_ids(loaded) -> list[int]:
    """The ids that end an answer, as `mllm.generate.answer` stops: the template's own
    list where it has one, else its end token."""
    tok, tpl = loaded.tokenizer, loaded.template
    if hasattr(tpl, "stop_ids"):
        return list(tpl.stop_ids(tok))
    return [tok.convert_tokens_to_ids(tpl.end_token(tok))]


def _as_list(batch):
    return batch


def _forward_kwargs(lm) -> tuple[str, bool]:
    """The cache argument's name (transformers 5.x renames `past_key_values` to `cache`)
    and whether the LM can skip the head over the prompt (`logits_to_keep`)."""
    params = inspect.signature(lm.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    return name, "logits_to_keep" in params


@torch.inference_mode()
def greedy(vlm, prompts: Sequence[Sequence[int]], pixel_values: torch.Tensor | None,
           max_new_tokens: Sequence[int], stop_tokens, pad_id: int) -> list[list[int]]:
    """Greedy continuations of left-padded `prompts` (token ids with the image
    placeholders expanded; `pixel_values` holds one image per placeholder run, in row
    order). Each row stops at a token of `stop_tokens` (not included) or after its
    `max_new_tokens`."""
    from transformers import DynamicCache

    lm = vlm.language_model
    device = next(lm.parameters()).device
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    embeds = vlm.embed(ids, None if pixel_values is None else pixel_values.to(device))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_arg, keep_arg = _forward_kwargs(lm)
    cache = DynamicCache(config=lm.config)
    extra = {"logits_to_keep": 1} if keep_arg else {}
    logits = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                use_cache=True, **{cache_arg: cache}, **extra).logits[:, -1]
    last = positions[:, -1]
    stop = {int(x) for x in ([stop_tokens] if isinstance(stop_tokens, int) else stop_tokens)}
    out: list[list[int]] = [[] for _ in range(b)]
    alive = list(range(b))                   # original row of each row still generating
    while True:
        nxt = logits.argmax(-1)
        keep = []
        for j, (row, tok) in enumerate(zip(alive, nxt.tolist())):  # note: one host sync per step
            if tok in stop:
                continue
            out[row].append(tok)
            if len(out[row]) < max_new_tokens[row]:
                keep.append(j)
        if not keep:
            return out
        if len(keep) < len(alive):
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            mask, last, nxt = mask[idx], last[idx], nxt[idx]
            alive = [alive[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        last = last + 1
        logits = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
                    use_cache=True, **{cache_arg: cache}).logits[:, -1]


def answer_batches(loaded, questions: Sequence[Question], data_dir: str | None = None,
                   batch_size: int = 16, workers: int = 2, progress: bool = True,
                   desc: str = "eval", total: int | None = None,
                   initial: int = 0) -> Iterator[list[Answer]]:
    """Answers to `questions`, one list per batch, in question order. `total`/`initial`
    place the progress bar when a resumed run asks only the remaining questions."""
    from mllm.generate import prompt_ids

    if not questions:
        return
    tok, vlm = loaded.tokenizer, loaded.model
    stop = stop_ids(loaded)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    loader = torch.utils.data.DataLoader(
        _Pixels([q.image for q in questions], data_dir, loaded.processor), batch_size=batch_size,
        shuffle=False, num_workers=workers, collate_fn=_as_list,
        prefetch_factor=2 if workers else None)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total if total is not None else len(questions), initial=initial,
                   desc=desc, unit="q", dynamic_ncols=True)
    try:
        for items in loader:
            batch = [questions[i] for i, _, _ in items]
            for (i, _, err), q in zip(items, batch):
                if err is not None:
                    raise InputError(f"question {q.question_id!r}: image not readable ({err})",
                                     path=str(image_source(q.image, data_dir)) if isinstance(q.image, str) else None)
            pixels = [px for _, px, _ in items if px is not None]
            prompts = [prompt_ids(loaded, q.prompt, q.image is not None) for q in batch]
            gen = greedy(vlm, prompts, torch.stack(pixels) if pixels else None,
                         [q.max_new_tokens for q in batch], stop, pad_id)
            yield [Answer(q, tok.decode(t, skip_special_tokens=True).strip(), len(t))
                   for q, t in zip(batch, gen)]
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
