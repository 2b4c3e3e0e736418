"""Tokenizers: a real one from the hub or a folder, or a small BPE built locally.

The local builder trains a byte-level BPE on the given text with the `tokenizers`
library, so tests and the demo run with no network. Either way the tokenizer carries
the `<image>` token (the placeholder the data pipeline expands) and a pad token, and
the special tokens every template in mllm.templates uses.
"""
from __future__ import annotations

from typing import Iterable

IMAGE_TOKEN = "<image>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
# The chat-format markers of the Llama-3, Qwen2 and Vicuna (LLaVA v1) templates.
TEMPLATE_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|im_start|>", "<|im_end|>", "</s>"]


def build_local(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a
    PreTrainedTokenizerFast with `<|endoftext|>` as eos, `<pad>`, `<image>` and the
    template markers as special tokens. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, *TEMPLATE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   additional_special_tokens=[IMAGE_TOKEN, *TEMPLATE_TOKENS])


def load(name_or_path: str):
    """A pretrained tokenizer (hub name such as microsoft/phi-2, or a folder), with
    `<image>` added as a special token and a pad token (eos) if it has none."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(name_or_path)
    return prepare(tok)


def prepare(tok):
    """Add `<image>` as a special token (what the trainer, `warren tokens` and the
    exports agree on) and a pad token (eos) where the tokenizer has none."""
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
