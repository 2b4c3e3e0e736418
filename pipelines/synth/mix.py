"""Small synthetic instruction sources in the real release formats, with known truth.

What is written under `out_dir` (file names as the real releases, so the recipes in
configs/mix/ run on it with `--data-root out_dir`):

    SVIT_mix_665K.json              JSON list, LLaVA format. Image records (the shared
                                    VQA part on coco/gqa/ocr_vqa/textvqa images, the
                                    SVIT core part on VG images), then the ShareGPT
                                    text-only part at the tail: no "image" key, ids like
                                    "i6IyJda_0" (as in LLaVA-665K, which SVIT-mix keeps).
    WizardLM_evol_instruct_70k.json JSON list of {"instruction", "output"} (no id).
    llava_v1_5_mix665k.json         JSON list, LLaVA format: the LLaVA-Instruct part on
                                    coco, the VQA parts identical to SVIT-mix's (same ids
                                    and text, as in the real pair), the same ShareGPT part.
    WizardLM_evol_instruct_V2.jsonl JSON Lines of {"idx", "conversations"} (the V2 form),
                                    not in the Bunny recipes; carries the malformed lines.
    sharegpt_messages.jsonl         JSON Lines in the OpenAI-style ShareGPT form
                                    ({"id", "messages": [{"role", "content"}]}, system
                                    roles, top-level "system"), read with format sharegpt.
    images/                         tiny JPEGs under coco/train2017, vg/VG_100K, gqa/images,
                                    ocr_vqa/images, textvqa/train_images, plus the damaged
                                    and odd files of the real releases (0-byte, truncated,
                                    an HTML error page, a GIF named .jpg, trailing bytes)
    truth.json                      the counts per part and every planted record (file,
                                    row, id, and the expected reason code, or "kept" with
                                    what the mix must store)

The real files' quirks are there: as in LLaVA-665K, an image record's id is its
image's file stem, so records on one image share their id while their conversations
differ (all of them are kept); ShareGPT records that start with a gpt turn, end with a
human turn or carry a system turn; image paths with backslashes or "./"; lone
surrogates ("\\ud83d", valid JSON); bytes that are not UTF-8; roles LLaVA cannot read
("bing", "chatgpt"); exact duplicates with other whitespace.

Counts at `scale` s: 625,000 s image records and 40,000 s ShareGPT records per 665K file,
70,000 s WizardLM records; so Bunny-695K keeps 625,000 s + 70,000 s. Planted records
come on top of these counts, a fixed set per file. The records planted in the two files
of Bunny-695K (SVIT-mix, WizardLM-70K) are all rejected (so the recipe's count stays
625,000 s + 70,000 s); the kept quirks are planted in LLaVA-665K and the JSON Lines
files.
"""
from __future__ import annotations

import io
import json
import os
import string

import numpy as np

from pipelines import storage
from pipelines.errors import ConfigError

SVIT = "SVIT_mix_665K.json"
WIZARD = "WizardLM_evol_instruct_70k.json"
LLAVA = "llava_v1_5_mix665k.json"
OWN = "WizardLM_evol_instruct_V2.jsonl"
SHAREGPT_FILE = "sharegpt_messages.jsonl"
IMAGES = "images"

# Parts of the real files, per 665K (LLaVA-665K paper, Table 7, rounded).
IMAGE_RECORDS = 625_000
SHAREGPT = 40_000
WIZARDLM = 70_000
OWN_RECORDS = 2_000
SVIT_CORE_SHARE = 0.24          # SVIT core-150K replaces LLaVA-Instruct-150K (~24% of 625K)

_WORDS = ("the a image shows person dog cat street table red blue green small large left right "
          "two three what where is are on in of with near behind holding wearing sign text color "
          "describe answer question explain why how many people car tree building water sky "
          "function code python list value return number example step first then result").split()
_PROMPTS = ("What is in the image?", "Describe the image in detail.", "What color is the {w}?",
            "How many {w}s are there?", "What is written on the {w}?", "Where is the {w}?")

RECIPES = {
    "bunny-695k": {
        "name": "bunny-695k", "seed": 0, "dedup": "exact", "image_root": IMAGES,
        "sources": [
            {"name": "svit-mix-665k", "path": SVIT, "format": "llava",
             "exclude": [{"name": "sharegpt", "has_image": False}]},
            {"name": "wizardlm-evol-instruct-70k", "path": WIZARD, "format": "wizardlm"},
        ]},
    "bunny-llava-1.4m": {
        "name": "bunny-llava-1.4m", "seed": 0, "dedup": "none", "image_root": IMAGES,
        "sources": [
            {"name": "svit-mix-665k", "path": SVIT, "format": "llava",
             "exclude": [{"name": "sharegpt", "has_image": False}]},
            {"name": "wizardlm-evol-instruct-70k", "path": WIZARD, "format": "wizardlm"},
            {"name": "llava-665k", "path": LLAVA, "format": "llava", "id_prefix": "llava665k/"},
        ]},
}


def counts(scale: float) -> dict[str, int]:
    """The clean records per part at `scale` (planted bad records not included)."""
    n_img = int(round(IMAGE_RECORDS * scale))
    return {"image": n_img, "svit_core": int(round(n_img * SVIT_CORE_SHARE)),
            "sharegpt": int(round(SHAREGPT * scale)), "wizardlm": int(round(WIZARDLM * scale)),
            "own": max(8, int(round(OWN_RECORDS * scale)))}


class _Gen:
    def __init__(self, seed: int, words: int):
        self.rng = np.random.default_rng(seed)
        self.words = words

    def text(self, mean: int | None = None) -> str:
        n = max(1, int(self.rng.poisson(mean or self.words)))
        return " ".join(_WORDS[i] for i in self.rng.integers(0, len(_WORDS), n)).capitalize() + "."

    def question(self) -> str:
        q = _PROMPTS[int(self.rng.integers(0, len(_PROMPTS)))]
        return q.format(w=_WORDS[int(self.rng.integers(0, len(_WORDS)))])

    def image_conv(self, pairs: int) -> list[dict]:
        conv = []
        for k in range(pairs):
            q = self.question()
            if k == 0:
                q = "<image>\n" + q if self.rng.random() < 0.5 else q + "\n<image>"
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": self.text()}]
        return conv

    def chat(self, pairs: int) -> list[dict]:
        conv = []
        for _ in range(pairs):
            conv += [{"from": "human", "value": self.text(self.words // 2 + 1)},
                     {"from": "gpt", "value": self.text(self.words * 2)}]
        return conv

    def sharegpt_id(self, k: int) -> str:
        chars = string.ascii_letters + string.digits
        return "".join(chars[i] for i in self.rng.integers(0, len(chars), 7)) + f"_{k % 3}"


def _tiny_jpegs(n: int, seed: int) -> list[bytes]:
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=70)
        out.append(buf.getvalue())
    return out


# The damaged and odd image files of the real releases (relative path -> what it is).
# LLaVA's issue tracker reports a corrupt OCR-VQA JPEG, OCR-VQA GIFs named .jpg, and
# images missing from the downloads; an interrupted download leaves 0-byte or cut files,
# and a failed one an HTML error page under the image's name.
BAD_IMAGES = {
    "coco/train2017/000000999990.jpg": "empty",
    "coco/train2017/000000999991.jpg": "truncated JPEG",
    "ocr_vqa/images/7199999990.jpg": "HTML error page",
    "vg/VG_100K/2999990.jpg": "truncated PNG",
}
ODD_IMAGES = {                  # readable: the trainer (Pillow) decodes them
    "ocr_vqa/images/7199999991.jpg": "GIF named .jpg",
    "coco/train2017/000000999992.jpg": "JPEG with 1,500 bytes after its end marker",
}


def _odd_image_bytes(seed: int) -> dict[str, bytes]:
    from PIL import Image
    rng = np.random.default_rng(seed + 7)
    arr = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    enc = {}
    for fmt in ("JPEG", "PNG", "GIF"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        enc[fmt] = buf.getvalue()
    return {"coco/train2017/000000999990.jpg": b"",
            "coco/train2017/000000999991.jpg": enc["JPEG"][:len(enc["JPEG"]) // 2],
            "ocr_vqa/images/7199999990.jpg": b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n",
            "vg/VG_100K/2999990.jpg": enc["PNG"][:len(enc["PNG"]) // 2],
            "ocr_vqa/images/7199999991.jpg": enc["GIF"],
            "coco/train2017/000000999992.jpg": enc["JPEG"] + b"\x00" * 1500}


_IMAGE_KINDS = (  # (folder, id form, share of the shared VQA part)
    ("coco/train2017", "coco", 0.45), ("gqa/images", "gqa", 0.2),
    ("ocr_vqa/images", "ocr", 0.2), ("textvqa/train_images", "textvqa", 0.15))


def _image_path(kind: str, n: int) -> str:
    """The n-th image file of a kind, named as in the real releases."""
    if kind == "coco":
        return f"coco/train2017/{n:012d}.jpg"
    if kind == "vg":
        return f"vg/VG_100K/{1_000_000 + n}.jpg"
    if kind == "gqa":
        return f"gqa/images/{2_300_000 + n}.jpg"
    if kind == "ocr":
        return f"ocr_vqa/images/{7_100_000_000 + n}.jpg"
    return f"textvqa/train_images/{(n * 2654435761) & 0xFFFFFFFFFFFFFFFF:016x}.jpg"


def stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


class Raw(bytes):
    """A planted record written verbatim (text JSON cannot make: lone surrogate escapes,
    bytes that are not UTF-8)."""


def _write_json_list(path: str, items: list) -> None:
    with storage.atomic_open(path, "wb") as f:
        f.write(b"[\n")
        for i, obj in enumerate(items):
            f.write(b"" if i == 0 else b",\n")
            f.write(bytes(obj) if isinstance(obj, Raw) else json.dumps(obj, ensure_ascii=False).encode())
        f.write(b"\n]\n")


def _write_jsonl(path: str, lines: list) -> None:
    with storage.atomic_open(path, "wb") as f:
        for line in lines:
            f.write((bytes(line) if isinstance(line, Raw) else line.encode()) + b"\n")


def _insert(rng, items: list, planted: list[dict], fname: str, truth: list) -> list:
    """Insert planted records at seeded positions after the first record; record each
    one's final row, id and expectation (a reason code, or "kept" with what to store)."""
    pos = sorted(rng.choice(np.arange(1, len(items) + 1), size=len(planted), replace=True).tolist())
    out, j = [], 0
    for i, it in enumerate(items + [None]):
        while j < len(planted) and pos[j] == i:
            out.append(("planted", planted[j]))
            j += 1
        if it is not None:
            out.append(("ok", it))
    rows = []
    for row, (kind, it) in enumerate(out):
        if kind == "planted":
            truth.append({"file": fname, "row": row, "id": it.get("id"), "reason": it["reason"],
                          "quirk": it.get("quirk", it["reason"]), "has_image": it.get("has_image"),
                          "expect": it.get("expect")})
            rows.append(it["obj"])
        else:
            rows.append(it)
    return rows


def _plant(reason: str, obj, rid: str | None = None, quirk: str | None = None, **expect) -> dict:
    """A planted record. For reason "kept", `expect` says what the mix stores: image,
    system, n_turns and the normalisations applied."""
    has_image = isinstance(obj, dict) and isinstance(obj.get("image"), str) if not isinstance(obj, Raw) \
        else expect.pop("has_image", None)
    return {"reason": reason, "obj": obj, "id": rid, "quirk": quirk or reason, "has_image": has_image,
            "expect": expect or None}


def write_sources(out_dir: str, scale: float = 0.001, seed: int = 0, *, words: int = 12,
                  max_images: int = 4000, progress: bool = False) -> dict[str, str]:
    """Write the synthetic sources (see the module docstring) under `out_dir` and return
    their paths: root, image_root, svit, wizardlm, llava, own, sharegpt, truth.

    `words` is the mean words per answer (~6 characters each): 12 gives ~0.3 KB records,
    60 ~1.4 KB (the benchmark's ~1 GB at 700K records). Image records share a pool of
    at most `max_images` image files."""
    if not 0 < scale <= 2:
        raise ConfigError(f"scale must be in (0, 2] (got {scale})")
    if words < 1 or max_images < 8:
        raise ConfigError("words must be >= 1 and max_images >= 8")
    c = counts(scale)
    g = _Gen(seed, words)
    rng = np.random.default_rng(seed + 1)
    root = str(out_dir)
    img_root = os.path.join(root, IMAGES)
    storage.makedirs(root)

    # image pool, per kind, and the damaged / odd files
    n_pool = max(8, min(max_images, c["image"]))
    pools: dict[str, list[str]] = {}
    jpegs = _tiny_jpegs(16, seed)
    kinds = ["coco", "vg", "gqa", "ocr", "textvqa"]
    files = {}
    for k_i, kind in enumerate(kinds):
        refs = [_image_path(kind, n) for n in range(max(2, n_pool // len(kinds)))]
        pools[kind] = refs
        files.update((ref, jpegs[(n + k_i) % len(jpegs)]) for n, ref in enumerate(refs))
    files.update(_odd_image_bytes(seed))
    for ref, data in files.items():
        p = os.path.join(img_root, ref)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)

    def image_record(kind: str, n: int) -> dict:
        # As in LLaVA-665K: the id is the image's file stem, so records on one image
        # (several VQA parts, several questions) share their id.
        image = pools[kind][n % len(pools[kind])]
        return {"id": stem(image), "image": image, "conversations": g.image_conv(int(rng.integers(1, 4)))}

    # shared VQA part (identical in SVIT-mix and LLaVA-665K), SVIT core, LLaVA-Instruct
    n_core = c["svit_core"]
    n_shared = c["image"] - n_core
    shared = []
    cuts = np.cumsum([0] + [int(round(share * n_shared)) for _, _, share in _IMAGE_KINDS])
    cuts[-1] = n_shared
    for (_, kind, _), lo, hi in zip(_IMAGE_KINDS, cuts[:-1], cuts[1:]):
        shared += [image_record(kind, n) for n in range(lo, hi)]
    svit_core = [image_record("vg", n) for n in range(n_core)]
    llava_instruct = [image_record("coco", n) for n in range(n_core)]
    sharegpt = [{"id": g.sharegpt_id(n), "conversations": g.chat(int(rng.integers(1, 4)))}
                for n in range(c["sharegpt"])]
    seen = set()
    for r in sharegpt:                       # keep the ShareGPT ids unique
        while r["id"] in seen:
            r["id"] = g.sharegpt_id(0)
        seen.add(r["id"])
    wizard = [{"instruction": g.text(g.words // 2 + 1), "output": g.text(g.words * 3)}
              for _ in range(c["wizardlm"])]
    own = [{"idx": f"own_{n}", "conversations": g.chat(int(rng.integers(1, 3)))}
           for n in range(c["own"])]
    messages = [{"id": f"msg_{n}", **({"system": "You are a concise assistant."} if n % 4 == 1 else {}),
                 "messages": ([{"role": "system", "content": "Answer in one line."}] if n % 4 == 2 else [])
                 + [{"role": "user" if k % 2 == 0 else "assistant", "content": g.text(g.words)}
                    for k in range(2 * int(rng.integers(1, 3)))]}
                for n in range(max(8, c["own"]))]

    first = (shared + svit_core)[0]        # row 0 of SVIT: planted rows all come after it
    some_image = first["image"]
    coco_image, gqa_image = pools["coco"][1], pools["gqa"][1]
    hi = lambda v: {"from": "human", "value": v}   # noqa: E731
    gp = lambda v: {"from": "gpt", "value": v}     # noqa: E731
    q = [hi("<image>\nWhat is shown?"), gp("A red square.")]

    # SVIT-mix: every planted record is rejected (see the module docstring)
    svit_bad = [
        _plant("missing_field", {"id": "bad-no-conversations", "image": some_image}, "bad-no-conversations"),
        _plant("missing_field", {"image": some_image, "conversations": q}),
        _plant("not_an_object", "just a string"),
        _plant("bad_field", {"id": "bad-int-value", "conversations": [hi("Q?"), gp(42)]}, "bad-int-value"),
        _plant("bad_field", {"id": "bad-image-list", "image": [some_image, some_image], "conversations": q},
               "bad-image-list"),
        _plant("bad_role", {"id": "bad-bing", "image": some_image,
                            "conversations": [q[0], {"from": "bing", "value": "A square."}]}, "bad-bing",
               quirk="ShareGPT role 'bing'"),
        _plant("bad_role", {"id": "bad-user-assistant", "image": some_image,
                            "conversations": [{"from": "user", "value": "<image>\nQ?"},
                                              {"from": "assistant", "value": "A."}]}, "bad-user-assistant",
               quirk="OpenAI roles in a llava-format file"),
        _plant("bad_role", {"id": "bad-system-inside", "conversations": [
            hi("Q?"), gp("A."), {"from": "system", "value": "Be brief."}, hi("Q2?"), gp("A2.")]},
            "bad-system-inside", quirk="system turn inside the conversation"),
        _plant("image_tag_missing", {"id": "bad-no-tag", "image": some_image,
                                     "conversations": [hi("What is it?"), gp("A dog.")]}, "bad-no-tag"),
        _plant("image_tag_misplaced", {"id": "bad-tag-in-gpt", "image": some_image,
                                       "conversations": [q[0], gp("<image> A.")]}, "bad-tag-in-gpt"),
        _plant("image_tag_misplaced", {"id": "bad-two-tags", "image": some_image,
                                       "conversations": [hi("<image>\n<image>\nQ?"), gp("A.")]}, "bad-two-tags"),
        _plant("image_tag_without_image", {"id": "bad-tag-no-image", "conversations": q}, "bad-tag-no-image"),
        _plant("not_alternating", {"id": "bad-human-human", "image": some_image,
                                   "conversations": [q[0], hi("Q2?"), gp("A.")]}, "bad-human-human"),
        _plant("not_alternating", {"id": "bad-two-leading-gpt", "image": some_image,
                                   "conversations": [gp("Hi."), gp("Hello."), q[0], gp("A.")]},
               "bad-two-leading-gpt", quirk="two leading gpt turns (only one is dropped)"),
        _plant("empty_turn", {"id": "bad-empty-answer", "image": some_image,
                              "conversations": [q[0], gp("  \n")]}, "bad-empty-answer"),
        _plant("too_few_turns", {"id": "bad-one-turn", "conversations": [hi("Q?")]}, "bad-one-turn"),
        _plant("image_not_found", {"id": "bad-missing-file", "image": "coco/train2017/999999999999.jpg",
                                   "conversations": q}, "bad-missing-file"),
        _plant("bad_image_path", {"id": "bad-escapes-root", "image": "../outside.jpg", "conversations": q},
               "bad-escapes-root"),
        _plant("bad_image_path", {"id": "bad-windows-absolute", "image": "C:\\data\\coco\\x.jpg",
                                  "conversations": q}, "bad-windows-absolute", quirk="Windows absolute path"),
        _plant("too_long", {"id": "bad-too-long", "conversations": [hi("Q?"), gp("x " * 70_000)]}, "bad-too-long"),
        _plant("duplicate", {"id": "bad-same-content", "image": first["image"],
                             "conversations": [{"from": t["from"], "value": "  " + t["value"].replace(" ", "   ") + " "}
                                               for t in first["conversations"]]}, "bad-same-content",
               quirk="exact duplicate (other whitespace)"),
    ]
    svit_bad += [_plant("image_unreadable", {"id": stem(ref), "image": ref, "conversations": q}, stem(ref),
                        quirk=what) for ref, what in BAD_IMAGES.items()]
    svit_bad += [
        _plant("bad_text", Raw(b'{"id": "bad-lone-surrogate", "image": "' + some_image.encode()
                               + b'", "conversations": [{"from": "human", "value": "<image>\\nQ?"}, '
                                 b'{"from": "gpt", "value": "Smile \\ud83d"}]}'),
               "bad-lone-surrogate", quirk="lone surrogate \\ud83d (valid JSON)", has_image=True),
        _plant("bad_text", Raw(b'{"id": "bad-latin1", "image": "' + some_image.encode()
                               + b'", "conversations": [{"from": "human", "value": "<image>\\nCaf\xe9?"}, '
                                 b'{"from": "gpt", "value": "Yes."}]}'),
               "bad-latin1", quirk="a byte that is not UTF-8", has_image=True),
    ]
    wizard_bad = [
        _plant("missing_field", {"instruction": "Write a poem."}),
        _plant("bad_field", {"instruction": 7, "output": "Seven."}),
        _plant("empty_turn", {"instruction": "Say nothing.", "output": ""}),
        _plant("not_an_object", None),
        _plant("image_tag_without_image", {"instruction": "Look at <image> please.", "output": "I cannot."}),
        _plant("bad_text", Raw(b'{"instruction": "Repeat \\udc00 please.", "output": "No."}'),
               quirk="lone low surrogate", has_image=False),
    ]
    # LLaVA-665K: the kept quirks (and a few rejects)
    llava_first = llava_instruct[0] if llava_instruct else shared[0]
    kept_ex = {"image": None, "system": None, "n_turns": 2, "normalised": []}

    def kept(obj, quirk, **over):
        rid = obj["id"]
        exp = dict(kept_ex)
        if isinstance(obj.get("image"), str):
            exp["image"] = obj["image"]
        exp.update(over)
        return _plant("kept", obj, rid, quirk, **exp)

    llava_bad = [
        kept({"id": llava_first["id"], "image": llava_first["image"],
              "conversations": [hi("<image>\nA different question about the same image?"), gp("Yes.")]},
             "id shared with another record, different conversation"),
        kept({"id": stem(coco_image), "image": coco_image,
              "conversations": [gp("Hello! Ask me about the picture."), hi("<image>\nWhat is it?"), gp("A cat.")]},
             "leading gpt turn", normalised=["leading_gpt_dropped"]),
        kept({"id": stem(coco_image), "image": coco_image,
              "conversations": [hi("<image>\nWhat color?"), gp("Blue."), hi("Thanks!")]},
             "trailing human turn", normalised=["trailing_human_dropped"]),
        kept({"id": stem(gqa_image), "image": gqa_image,
              "conversations": [{"from": "system", "value": "You describe images."}, hi("<image>\nWhere?"),
                                gp("On the left.")]},
             "system turn", system="You describe images.", normalised=["system_kept"]),
        kept({"id": stem(coco_image), "image": coco_image.replace("/", "\\"),
              "conversations": [hi("<image>\nIs it big?"), gp("No.")]},
             "backslash path", image=coco_image, normalised=["image_path_normalised"]),
        kept({"id": stem(gqa_image), "image": "./" + gqa_image, "conversations": [hi("Count them.\n<image>"), gp("Two.")]},
             "./ path", image=gqa_image, normalised=["image_path_normalised"]),
        kept({"id": stem(gqa_image), "image": gqa_image.replace("/", "//", 1).replace("images/", "images/./"),
              "conversations": [hi("<image>\nAny text?"), gp("None.")]},
             "// and /./ in the path", image=gqa_image, normalised=["image_path_normalised"]),
    ]
    llava_bad += [kept({"id": stem(ref), "image": ref, "conversations": [hi("<image>\nWhat is it?"), gp("A square.")]},
                       what) for ref, what in ODD_IMAGES.items()]
    llava_bad += [
        kept({"id": "sgLead01_0", "conversations": [gp("How can I help?"), hi("Name a fruit."), gp("Apple.")]},
             "ShareGPT: leading gpt turn", normalised=["leading_gpt_dropped"]),
        kept({"id": "sgTrail1_0", "conversations": [hi("Name a color."), gp("Red."), hi("And another?")]},
             "ShareGPT: trailing human turn", normalised=["trailing_human_dropped"]),
        kept({"id": "sgBoth01_1", "conversations": [gp("Hi."), hi("Q?"), gp("A."), hi("Q2?"), gp("A2."), hi("Bye")]},
             "ShareGPT: leading gpt and trailing human", n_turns=4,
             normalised=["leading_gpt_dropped", "trailing_human_dropped"]),
        kept({"id": "sgSyst01_0", "conversations": [{"from": "system", "value": "Be kind."}, hi("Hello?"), gp("Hi!")]},
             "ShareGPT: system turn", system="Be kind.", normalised=["system_kept"]),
        _plant("missing_field", {"id": "bad-llava-no-conversations", "image": some_image},
               "bad-llava-no-conversations"),
        _plant("image_not_found", {"id": "bad-llava-missing-file", "image": "vg/VG_100K/nope.jpg",
                                   "conversations": q}, "bad-llava-missing-file"),
        _plant("bad_role", {"id": "sgChatgpt_0", "conversations": [hi("Q?"), {"from": "chatgpt", "value": "A."}]},
               "sgChatgpt_0", quirk="ShareGPT role 'chatgpt'"),
        _plant("too_few_turns", {"id": "sgGptHuman_0", "conversations": [gp("Hi."), hi("Q?")]}, "sgGptHuman_0",
               quirk="gpt then human: nothing left after normalisation"),
        _plant("bad_text", Raw(b'{"id": "sgSurr01_0", "conversations": [{"from": "human", "value": "Emoji?"}, '
                               b'{"from": "gpt", "value": "\\ud83d and more"}]}'),
               "sgSurr01_0", quirk="lone surrogate \\ud83d (valid JSON)", has_image=False),
    ]
    truth_rows: list[dict] = []
    svit_rows = _insert(rng, shared + svit_core + sharegpt, svit_bad, SVIT, truth_rows)
    wizard_rows = _insert(rng, wizard, wizard_bad, WIZARD, truth_rows)
    llava_rows = _insert(rng, llava_instruct + shared + sharegpt, llava_bad, LLAVA, truth_rows)
    # the WizardLM rows without an id get "<source>-<row>": fill those in the truth
    for t in truth_rows:
        if t["file"] == WIZARD and t["reason"] != "not_an_object":
            t["id"] = f"wizardlm-evol-instruct-70k-{t['row']}"

    paths = {"root": root, "image_root": img_root, "svit": os.path.join(root, SVIT),
             "wizardlm": os.path.join(root, WIZARD), "llava": os.path.join(root, LLAVA),
             "own": os.path.join(root, OWN), "sharegpt": os.path.join(root, SHAREGPT_FILE),
             "truth": os.path.join(root, "truth.json")}
    _write_json_list(paths["svit"], svit_rows)
    _write_json_list(paths["wizardlm"], wizard_rows)
    _write_json_list(paths["llava"], llava_rows)

    # JSON Lines with malformed lines (the V2 conversations form)
    own_bad = [
        _plant("malformed_json", '{"idx": "own_broken", "conversations": ['),
        _plant("malformed_json", "this is not json"),
        _plant("not_an_object", "[1, 2, 3]"),
        _plant("missing_field", json.dumps({"idx": "own_no_conversations"}), "own_no_conversations"),
        _plant("too_few_turns", json.dumps({"idx": "own_gpt_first", "conversations": [gp("A."), hi("Q?")]}),
               "own_gpt_first"),
        _plant("bad_text", Raw(b'{"idx": "own_latin1", "conversations": [{"from": "human", "value": "Caf\xe9?"}, '
                               b'{"from": "gpt", "value": "Yes."}]}'), quirk="a line that is not UTF-8",
               has_image=False),
    ]
    own_lines = _insert(rng, [json.dumps(o, ensure_ascii=False) for o in own], own_bad, OWN, truth_rows)
    _write_jsonl(paths["own"], own_lines)

    # ShareGPT in the OpenAI messages form
    u = lambda v: {"role": "user", "content": v}        # noqa: E731
    a = lambda v: {"role": "assistant", "content": v}   # noqa: E731

    def msg_kept(obj, quirk, **over):
        exp = {"image": None, "system": None, "n_turns": 2, "normalised": []}
        exp.update(over)
        return _plant("kept", json.dumps(obj), obj["id"], quirk, **exp)

    msg_bad = [
        msg_kept({"id": "m-lead", "messages": [a("Welcome."), u("Q?"), a("A.")]}, "leading assistant turn",
                 normalised=["leading_gpt_dropped"]),
        msg_kept({"id": "m-trail", "messages": [u("Why?"), a("Because."), u("More?")]}, "trailing user turn",
                 normalised=["trailing_human_dropped"]),
        msg_kept({"id": "m-system", "messages": [{"role": "system", "content": "Be brief."}, u("When?"), a("Now.")]},
                 "system role", system="Be brief.", normalised=["system_kept"]),
        msg_kept({"id": "m-top-system", "system": "Speak French.", "messages": [u("Hello?"), a("Bonjour.")]},
                 "top-level system field", system="Speak French.", normalised=["system_kept"]),
        msg_kept({"id": "m-from-value", "conversations": [hi("Who?"), gp("Me.")]}, "from/value turns"),
        _plant("bad_role", json.dumps({"id": "m-bing", "messages": [u("Q?"), {"role": "bing", "content": "A."}]}),
               "m-bing", quirk="role 'bing'"),
        _plant("bad_role", json.dumps({"id": "m-system-inside", "messages": [u("Q?"), a("A."),
                                                                            {"role": "system", "content": "S."},
                                                                            u("Q2?"), a("A2.")]}),
               "m-system-inside", quirk="system turn inside the conversation"),
        _plant("bad_field", json.dumps({"id": "m-two-systems", "system": "A.", "messages": [
            {"role": "system", "content": "B."}, u("Q?"), a("A.")]}), "m-two-systems",
            quirk="a system field and a system turn"),
        _plant("bad_text", Raw(b'{"id": "m-surrogate", "messages": [{"role": "user", "content": "\\ud83d"}, '
                               b'{"role": "assistant", "content": "?"}]}'), "m-surrogate",
               quirk="lone surrogate \\ud83d (valid JSON)", has_image=False),
        _plant("bad_text", Raw(b'{"id": "m-latin1", "messages": [{"role": "user", "content": "\xff\xfe?"}, '
                               b'{"role": "assistant", "content": "?"}]}'), "m-latin1",
               quirk="a line that is not UTF-8", has_image=False),
    ]
    msg_lines = _insert(rng, [json.dumps(o, ensure_ascii=False) for o in messages], msg_bad, SHAREGPT_FILE,
                        truth_rows)
    _write_jsonl(paths["sharegpt"], msg_lines)

    storage.write_json(paths["truth"], {
        "scale": scale, "seed": seed, "counts": {**c, "svit_records": len(svit_rows),
                                                 "wizardlm_records": len(wizard_rows),
                                                 "llava_records": len(llava_rows), "own_records": len(own_lines),
                                                 "sharegpt_records": len(msg_lines)},
        "bad_images": BAD_IMAGES, "odd_images": ODD_IMAGES, "planted": truth_rows})
    return paths


def recipe_yaml(name: str, data_root: str = ".") -> str:
    """The YAML text of a built-in recipe (same content as configs/mix/<name>.yaml)
    pointing at synthetic sources under `data_root` (relative to the YAML file)."""
    import yaml
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r} (known: {', '.join(sorted(RECIPES))})")
    doc = {"name": RECIPES[name]["name"], "seed": RECIPES[name]["seed"], "dedup": RECIPES[name]["dedup"],
           "data_root": data_root, "image_root": RECIPES[name]["image_root"],
           "sources": RECIPES[name]["sources"]}
    head = f"# warren mix --recipe {name}.yaml --output runs/mix-{name}\n"
    return head + yaml.safe_dump(doc, sort_keys=False)


def write_recipe(out_dir: str, name: str = "bunny-695k") -> str:
    """Write `<out_dir>/<name>.yaml` pointing at the sources in `out_dir`; return its path."""
    path = os.path.join(str(out_dir), f"{name}.yaml")
    storage.write_bytes(path, recipe_yaml(name).encode())
    return path
