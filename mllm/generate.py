"""Answer a prompt about an image with an exported model (greedy decoding).

    loaded = mllm.export.load(folder)
    answer(loaded, "photo.jpg", "What is in the picture?")
"""
from __future__ import annotations

import torch

from mllm.export import Loaded
from mllm.templates import ConversationError
from mllm.tokenizer import IMAGE_TOKEN


def prompt_ids(loaded: Loaded, prompt: str, with_image: bool) -> list[int]:
    """The template's generation prompt for one question: the user turn (with the image,
    normalised to `<image>\\n{prompt}` as in training, wherever the prompt puts it),
    ending where the assistant's answer starts. The ids equal a training row's ids up
    to its first trained token (templates.normalize_image, mllm.encoding)."""
    if with_image:
        text = prompt if IMAGE_TOKEN in prompt else f"{IMAGE_TOKEN}\n{prompt}"
    elif IMAGE_TOKEN in prompt:
        raise ConversationError("the prompt holds <image> but no image was given")
    else:
        text = prompt
    ids, _ = loaded.template.encode([{"from": "human", "value": text}], loaded.tokenizer,
                                    loaded.model.num_image_tokens, add_generation_prompt=True)
    return ids


@torch.no_grad()
def answer(loaded: Loaded, image, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy answer. `image` is a path, bytes, a PIL image, or None (text only)."""
    vlm, tok = loaded.model, loaded.tokenizer
    device = next(vlm.language_model.parameters()).device
    ids = torch.tensor([prompt_ids(loaded, prompt, image is not None)], device=device)
    pixels = loaded.processor(image).unsqueeze(0).to(device) if image is not None else None
    embeds = vlm.embed(ids, pixels)
    out = vlm.language_model.generate(
        inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=loaded.template.stop_ids(tok), pad_token_id=tok.pad_token_id)
    # With inputs_embeds (and no input_ids) generate returns only the new tokens.
    return tok.decode(out[0], skip_special_tokens=True).strip()
