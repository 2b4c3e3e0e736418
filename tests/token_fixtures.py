"""Tokenizers for the template tests, built here with no network.

`word_tokenizer(words, style)` has a vocabulary written out by hand: every pre-token
(what the style's pre-tokenizer cuts the text into) is one entry, so a test can write
the expected ids as token strings and look them up in the vocabulary it chose. Styles:
  gpt2       byte-level, GPT-2's split rule (Phi-2, CodeGen): ' USER' is one pre-token
  llama3     byte-level, Llama-3's / Qwen2's split rule ("\\n\\n" is one pre-token)
  sp         SentencePiece-like ('▁' for spaces, pieces start at spaces), BOS added,
             `legacy=True`: a prefix '▁' after every special token (LLaVA-era Llama)
  sp-first   the same with `legacy=False`: the prefix '▁' only at the start of the text

`trained_bytelevel` and `trained_sentencepiece` learn a BPE from given text (for
comparisons on many conversations).
"""
from __future__ import annotations

import json

from mllm import tokenizer as tok_mod

SPECIALS = ["<|endoftext|>", "<pad>", "<image>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
SP_SPECIALS = ["<unk>", "<s>", "</s>", "<image>"]
UNK = "[UNK]"
# Llama-3's (and, but for digits, Qwen2's) pre-tokenizer split rule.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _wrap(tok, specials, sp: bool):
    from transformers import PreTrainedTokenizerFast
    if sp:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", pad_token="<unk>",
                                       additional_special_tokens=["<image>"])
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                       pad_token="<pad>",
                                       additional_special_tokens=[s for s in specials[2:]])
    return tok_mod.prepare(fast)


def word_tokenizer(words: list[str], style: str = "gpt2"):
    """A tokenizer whose vocabulary is the special tokens, then `words`, in that order
    (ids 0, 1, 2, ...), then [UNK]. `words` are written as the style spells tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    sp = style.startswith("sp")
    specials = SP_SPECIALS if sp else SPECIALS
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + list(words) + [UNK]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    if sp:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if style == "sp-first" else "always", split=True)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    elif style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    elif style == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    else:
        raise ValueError(style)
    tok.add_special_tokens(specials)
    return _wrap(tok, specials, sp)


def trained_bytelevel(texts: list[str], vocab_size: int = 2000):
    """A byte-level BPE (GPT-2 split rule, as Phi-2's) learnt from `texts`, eos
    '<|endoftext|>' used as pad too (Bunny's Phi-2 setup), '<image>' added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[3:])
    return tok_mod.prepare(fast)


def trained_sentencepiece(texts: list[str], vocab_size: int = 1500, legacy: bool = True,
                          drop_merges: tuple = ()):
    """A SentencePiece-style BPE learnt from `texts` ('▁' for spaces, pieces never cross
    a space, byte fallback), wrapped as transformers' LlamaTokenizer with BOS — the
    tokenizer LLaVA-1.5 trains with (pad = unk, as LLaVA sets it). `drop_merges` removes
    merges, e.g. ('▁', 'USER:') to make '▁USER:' two tokens and 'USER:' one, as
    Llama-2's vocabulary has it ('▁US','ER' but 'USER')."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    merges = [m for m in merges if m not in set(drop_merges)]
    llama = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, add_bos_token=True,
                           unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    llama.pad_token = llama.unk_token
    return tok_mod.prepare(llama)


def save(tokenizer, folder: str) -> str:
    """save_pretrained, recording `legacy` in tokenizer_config.json as real Llama tokenizer
    folders do (transformers 5 rebuilds the pre-tokenizer from it on load, and does not
    write it itself)."""
    tokenizer.save_pretrained(folder)
    if hasattr(tokenizer, "legacy"):
        path = f"{folder}/tokenizer_config.json"
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config["legacy"] = bool(tokenizer.legacy)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    return folder
