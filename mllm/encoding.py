"""Rendered conversation -> token ids and labels, tokenized as the reference code does.

LLaVA's and Bunny's preprocessing renders a whole conversation as one string, cuts it
only at `<image>` (`tokenizer_image_token`) and tokenizes each image-free chunk in one
call, the first with the tokenizer's own start token (BOS) and the rest without. The
ids below come from exactly those calls, so they are the reference's ids, including
every merge across a template boundary (`ĠUSER`, not `Ġ`,`USER`).

The reference then guesses the label mask from the lengths of re-tokenized pieces,
which goes wrong when content holds a separator ("tokenization mismatch", the whole
sample masked). Here labels come from character offsets instead: a token is trained
when the last character it covers lies in a trained segment (an answer and its end
token). Where the guess is right the two agree token for token.

Content never becomes a special token. A template's own markers (`<|im_end|>`,
`<|endoftext|>` as an end token) stay special; text the data brings in (an answer that
quotes `<|endoftext|>`, an `<image>` inside an answer) is tokenized as text. Chunks whose
content holds special-token text are cut at the template's special markers and each
piece is tokenized with `split_special_tokens=True`; every other chunk takes the single
call above. (For a non-legacy SentencePiece tokenizer, the piece right after a marker
in such a chunk gets the prefix space a separate call adds; nothing else differs.)

Segments come from `Template.segments`: a `Segment` knows which of its characters are
data (`parts`); a plain `(text, trainable)` tuple, as a subclass may return, is treated
as template text.
"""
from __future__ import annotations

import bisect
import re
import weakref
from dataclasses import dataclass

from mllm.tokenizer import IMAGE_TOKEN
from pipelines.errors import ConfigError, WarrenError

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder for the image before it is expanded


class ConversationError(WarrenError, ValueError):
    """A conversation that a template cannot render (the message says why)."""


class Segment(tuple):
    """A `(text, trainable)` piece of a rendered conversation; `parts` holds its
    `(text, is_content)` pieces, content being text taken from the data."""

    parts: tuple[tuple[str, bool], ...]

    def __new__(cls, parts, trainable: bool):
        parts = tuple([(t, bool(c)) for t, c in parts if t])
        self = super().__new__(cls, ("".join(t for t, _ in parts), bool(trainable)))
        self.parts = parts
        return self


# ------------------------------------------------------------------ tokenizer facts

@dataclass(frozen=True)
class TokenizerInfo:
    special: re.Pattern | None
    """Matches the text of every special token (longest first)."""
    special_ids: dict
    bos: tuple[int, ...]
    """What `tokenizer(text)` puts before the text's own ids (BOS, or nothing)."""


_INFO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_info(tokenizer) -> TokenizerInfo:
    """Special tokens and start tokens of a tokenizer (cached until it grows)."""
    size = len(tokenizer)
    cached = _INFO.get(tokenizer)
    if cached is not None and cached[0] == size:
        return cached[1]
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{type(tokenizer).__name__} is not a fast tokenizer: templates need "
                          "character offsets (a tokenizer folder with tokenizer.json)")
    special = {str(t.content): i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for text in tokenizer.all_special_tokens:
        special.setdefault(text, tokenizer.convert_tokens_to_ids(text))
    pattern = (re.compile("|".join(re.escape(s) for s in sorted(special, key=len, reverse=True)))
               if special else None)
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    start = next((k for k in range(len(with_specials) - len(plain) + 1)
                  if with_specials[k:k + len(plain)] == plain), 0)
    info = TokenizerInfo(pattern, special, tuple(with_specials[:start]))
    _INFO[tokenizer] = (size, info)
    return info


# ------------------------------------------------------------------------ chunks

@dataclass
class _Chunk:
    """Image-free text tokenized in one call (or, protected, in pieces)."""
    text: str
    starts: list[int]      # start offset of each atom
    trained: list[bool]    # per atom
    markers: list[tuple[int, int, int]] | None  # protected: (start, end, id) of template specials

    def labels(self, ids: list[int], offsets: list[tuple[int, int]]) -> list[int]:
        """A token is trained when the last character it covers is in a trained atom.
        Token ends never decrease, so each trained atom [a, b) holds the tokens whose
        end e satisfies a < e <= b: one slice found by bisection."""
        out = [IGNORE_INDEX] * len(ids)
        ends = None
        bounds = self.starts + [len(self.text)]
        for k, trained in enumerate(self.trained):
            if not trained:
                continue
            if ends is None:
                ends = [e or 1 for _, e in offsets]  # an empty span at 0 covers character 0
            lo, hi = bisect.bisect_right(ends, bounds[k]), bisect.bisect_right(ends, bounds[k + 1])
            out[lo:hi] = ids[lo:hi]
        return out


def _chunks(segments, info: TokenizerInfo) -> list[_Chunk]:
    """Cut the segments at each `<image>` in untrained text; one chunk per side."""
    atoms: list[list[tuple[str, bool, bool | None]]] = [[]]
    for seg in segments:
        text, trained = seg[0], bool(seg[1])
        parts = getattr(seg, "parts", None) or ((text, None),)
        for ptext, content in parts:
            pieces = [ptext] if trained else ptext.split(IMAGE_TOKEN)
            for k, piece in enumerate(pieces):
                if k:
                    atoms.append([])
                if piece:
                    atoms[-1].append((piece, trained, content))
    out = []
    for chunk in atoms:
        starts, pos = [], 0
        for text, _, _ in chunk:
            starts.append(pos)
            pos += len(text)
        markers = None
        if info.special is not None and any(c and info.special.search(t) for t, _, c in chunk):
            markers = [(s + m.start(), s + m.end(), info.special_ids[m.group()])
                       for (t, _, c), s in zip(chunk, starts) if not c
                       for m in info.special.finditer(t)]
        out.append(_Chunk("".join(t for t, _, _ in chunk), starts, [tr for _, tr, _ in chunk], markers))
    return out


def _encode_batch(tokenizer, texts: list[str], split_special: bool):
    """(ids, offsets) per text: one batched call of the tokenizer's Rust backend, as
    `tokenizer(texts, add_special_tokens=False)` makes it (without building a
    BatchEncoding); each distinct text once."""
    unique = list(dict.fromkeys(texts))
    backend = tokenizer.backend_tokenizer
    before = backend.encode_special_tokens
    backend.encode_special_tokens = split_special
    try:
        encs = backend.encode_batch(unique, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = before
    by_text = {t: (e.ids, e.offsets) for t, e in zip(unique, encs)}
    return [by_text[t] for t in texts]


def _tokenize(tokenizer, chunks: list[_Chunk]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, offsets) of each chunk, batched: plain chunks in one call, the pieces of
    protected chunks in another (special-token text split)."""
    out: list = [([], []) for _ in chunks]
    plain = [k for k, c in enumerate(chunks) if c.text and c.markers is None]
    if plain:
        for k, enc in zip(plain, _encode_batch(tokenizer, [chunks[k].text for k in plain], False)):
            out[k] = enc
    pieces: list[tuple[int, str]] = []   # (offset in its chunk, text)
    layout: dict[int, list] = {}         # chunk -> [marker token | piece index]
    for k, c in enumerate(chunks):
        if c.markers is None:
            continue
        items, pos = [], 0
        for s, e, i in c.markers + [(len(c.text), len(c.text), None)]:
            if s > pos:
                items.append(len(pieces))
                pieces.append((pos, c.text[pos:s]))
            if i is not None:
                items.append((i, s, e))
            pos = e
        layout[k] = items
    if pieces:
        encoded = _encode_batch(tokenizer, [t for _, t in pieces], True)
        for k, items in layout.items():
            ids, offsets = [], []
            for item in items:
                if isinstance(item, tuple):
                    ids.append(item[0])
                    offsets.append(item[1:])
                else:
                    base = pieces[item][0]
                    ids += encoded[item][0]
                    offsets += [(base + s, base + e) for s, e in encoded[item][1]]
            out[k] = (ids, offsets)
    return out


def encode_segments(rows, tokenizer, num_image_tokens: int, image_token_id: int,
                    bos: bool) -> list:
    """ids and labels for each row's segments (a ConversationError passes through).

    `bos`: start with what `tokenizer(text)` puts first (the reference templates);
    templates that spell their start marker out pass False."""
    info = tokenizer_info(tokenizer)
    plans = [r if isinstance(r, Exception) else _chunks(r, info) for r in rows]
    flat = [c for p in plans if not isinstance(p, Exception) for c in p]
    tokens = iter(_tokenize(tokenizer, flat))
    start = list(info.bos) if bos else []
    image = [image_token_id] * num_image_tokens
    masked = [IGNORE_INDEX] * num_image_tokens
    results = []
    for plan in plans:
        if isinstance(plan, Exception):
            results.append(plan)
            continue
        ids, labels = list(start), [IGNORE_INDEX] * len(start)
        for k, chunk in enumerate(plan):
            if k:
                ids += image
                labels += masked
            chunk_ids, offsets = next(tokens)
            ids += chunk_ids
            labels += chunk.labels(chunk_ids, offsets)
        results.append((ids, labels))
    return results


def start_text(tokenizer) -> str:
    """The tokenizer's start tokens as text ('<s>' for Llama, '' for Phi-2)."""
    return "".join(tokenizer.convert_ids_to_tokens(list(tokenizer_info(tokenizer).bos)))
