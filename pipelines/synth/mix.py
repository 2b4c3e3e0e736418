"""Small synthetic instruction sources in the real release formats, with known truth.

What is written under `out_dir` (file names as the real releases, so the recipes in
configs/mix/ run on it with `--data-root out_dir`):

    SVIT_mix_665K.json              JSON list, LLaVA format. Image records with ids like
                                    the real ones (coco "000000033471", VG/GQA numbers,
                                    OCR-VQA, TextVQA hex), the SVIT core part on VG
                                    images, then the ShareGPT text-only part at the tail:
                                    no "image" key, ids like "i6IyJda_0" (as in LLaVA-665K,
                                    which SVIT-mix keeps).
    WizardLM_evol_instruct_70k.json JSON list of {"instruction", "output"} (no id).
    llava_v1_5_mix665k.json         JSON list, LLaVA format: the LLaVA-Instruct part on
                                    coco, the VQA parts identical to SVIT-mix's (same ids
                                    and text, as in the real pair), the same ShareGPT part.
    WizardLM_evol_instruct_V2.jsonl JSON Lines of {"idx", "conversations"} (the V2 form),
                                    not in the Bunny recipes; carries the malformed lines.
    images/                         tiny JPEGs under coco/train2017, vg/VG_100K, gqa/images,
                                    ocr_vqa/images, textvqa/train_images
    truth.json                      the counts per part and every planted bad record
                                    (file, row, id, expected reason code)

Counts at `scale` s: 625,000 s image records and 40,000 s ShareGPT records per 665K file,
70,000 s WizardLM records; so Bunny-695K keeps 625,000 s + 70,000 s. Planted bad records
come on top of these counts, a fixed set per file, one per reason code.
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


_IMAGE_KINDS = (  # (folder, id form, share of the shared VQA part)
    ("coco/train2017", "coco", 0.45), ("gqa/images", "gqa", 0.2),
    ("ocr_vqa/images", "ocr", 0.2), ("textvqa/train_images", "textvqa", 0.15))


def _image_ref(kind: str, n: int) -> tuple[str, str]:
    """(record id, image path) in the style of each real part."""
    if kind == "coco":
        return f"{n:012d}", f"coco/train2017/{n:012d}.jpg"
    if kind == "vg":
        return str(1_000_000 + n), f"vg/VG_100K/{1_000_000 + n}.jpg"
    if kind == "gqa":
        return str(2_300_000 + n), f"gqa/images/{2_300_000 + n}.jpg"
    if kind == "ocr":
        return f"{7_100_000_000 + n}", f"ocr_vqa/images/{7_100_000_000 + n}.jpg"
    h = f"{(n * 2654435761) & 0xFFFFFFFFFFFFFFFF:016x}"
    return h, f"textvqa/train_images/{h}.jpg"


def _write_json_list(path: str, items: list) -> None:
    with storage.atomic_open(path, "wb") as f:
        f.write(b"[\n")
        for i, obj in enumerate(items):
            f.write((("" if i == 0 else ",\n") + json.dumps(obj, ensure_ascii=False)).encode())
        f.write(b"\n]\n")


def _insert(rng, items: list, planted: list, fname: str, truth: list) -> list:
    """Insert planted (reason, obj-or-raw) at seeded positions after the first record;
    record each one's final row, id and expected reason."""
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
            reason, obj, rid = it
            truth.append({"file": fname, "row": row, "id": rid, "reason": reason})
            rows.append(obj)
        else:
            rows.append(it)
    return rows


def write_sources(out_dir: str, scale: float = 0.001, seed: int = 0, *, words: int = 12,
                  max_images: int = 4000, progress: bool = False) -> dict[str, str]:
    """Write the synthetic sources (see the module docstring) under `out_dir` and return
    their paths: root, image_root, svit, wizardlm, llava, own, truth.

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

    # image pool, per kind
    n_pool = max(8, min(max_images, c["image"]))
    pools: dict[str, list[str]] = {}
    jpegs = _tiny_jpegs(16, seed)
    kinds = ["coco", "vg", "gqa", "ocr", "textvqa"]
    for k_i, kind in enumerate(kinds):
        refs = [_image_ref(kind, n)[1] for n in range(max(2, n_pool // len(kinds)))]
        pools[kind] = refs
        for n, ref in enumerate(refs):
            p = os.path.join(img_root, ref)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(jpegs[(n + k_i) % len(jpegs)])

    def image_record(kind: str, n: int, tag: str) -> dict:
        rid, _ = _image_ref(kind, n)
        pool = pools[kind]
        return {"id": f"{rid}" if tag == "" else f"{rid}_{tag}",
                "image": pool[n % len(pool)],
                "conversations": g.image_conv(int(rng.integers(1, 4)))}

    # shared VQA part (identical in SVIT-mix and LLaVA-665K), SVIT core, LLaVA-Instruct
    n_core = c["svit_core"]
    n_shared = c["image"] - n_core
    shared = []
    cuts = np.cumsum([0] + [int(round(share * n_shared)) for _, _, share in _IMAGE_KINDS])
    cuts[-1] = n_shared
    for (_, kind, _), lo, hi in zip(_IMAGE_KINDS, cuts[:-1], cuts[1:]):
        shared += [image_record(kind, n, "") for n in range(lo, hi)]
    svit_core = [image_record("vg", n, "svit") for n in range(n_core)]
    llava_instruct = [image_record("coco", n, "instruct") for n in range(n_core)]
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

    first = (shared + svit_core)[0]        # row 0 of SVIT: planted rows all come after it
    some_image = first["image"]
    hi = lambda v: {"from": "human", "value": v}   # noqa: E731
    gp = lambda v: {"from": "gpt", "value": v}     # noqa: E731
    svit_bad = [
        ("missing_field", {"id": "bad-no-conversations", "image": some_image}, "bad-no-conversations"),
        ("missing_field", {"image": some_image, "conversations": [hi("<image>\nQ?"), gp("A.")]}, None),
        ("not_an_object", "just a string", None),
        ("bad_field", {"id": "bad-int-value", "conversations": [hi("Q?"), gp(42)]}, "bad-int-value"),
        ("bad_field", {"id": "bad-image-list", "image": [some_image, some_image],
                       "conversations": [hi("<image>\nQ?"), gp("A.")]}, "bad-image-list"),
        ("bad_role", {"id": "bad-role", "conversations": [{"from": "system", "value": "S."}, hi("Q?"),
                                                          gp("A.")]}, "bad-role"),
        ("image_tag_missing", {"id": "bad-no-tag", "image": some_image,
                               "conversations": [hi("What is it?"), gp("A dog.")]}, "bad-no-tag"),
        ("image_tag_misplaced", {"id": "bad-tag-in-gpt", "image": some_image,
                                 "conversations": [hi("<image>\nQ?"), gp("<image> A.")]}, "bad-tag-in-gpt"),
        ("image_tag_misplaced", {"id": "bad-two-tags", "image": some_image,
                                 "conversations": [hi("<image>\n<image>\nQ?"), gp("A.")]}, "bad-two-tags"),
        ("image_tag_without_image", {"id": "bad-tag-no-image",
                                     "conversations": [hi("<image>\nQ?"), gp("A.")]}, "bad-tag-no-image"),
        ("not_alternating", {"id": "bad-human-human", "image": some_image,
                             "conversations": [hi("<image>\nQ?"), hi("Q2?")]}, "bad-human-human"),
        ("not_alternating", {"id": "bad-odd-turns", "image": some_image,
                             "conversations": [hi("<image>\nQ?"), gp("A."), hi("Q2?")]}, "bad-odd-turns"),
        ("empty_turn", {"id": "bad-empty-answer", "image": some_image,
                        "conversations": [hi("<image>\nQ?"), gp("  \n")]}, "bad-empty-answer"),
        ("too_few_turns", {"id": "bad-one-turn", "conversations": [hi("Q?")]}, "bad-one-turn"),
        ("image_not_found", {"id": "bad-missing-file", "image": "coco/train2017/999999999999.jpg",
                             "conversations": [hi("<image>\nQ?"), gp("A.")]}, "bad-missing-file"),
        ("bad_image_path", {"id": "bad-escapes-root", "image": "../outside.jpg",
                            "conversations": [hi("<image>\nQ?"), gp("A.")]}, "bad-escapes-root"),
        ("too_long", {"id": "bad-too-long", "conversations": [hi("Q?"), gp("x " * 70_000)]}, "bad-too-long"),
        ("duplicate_id", {"id": first["id"], "image": some_image,
                          "conversations": [hi("<image>\nA different question?"), gp("Yes.")]}, first["id"]),
        ("duplicate", {"id": "bad-same-content", "image": first["image"],
                       "conversations": [{"from": t["from"], "value": "  " + t["value"].replace(" ", "   ") + " "}
                                         for t in first["conversations"]]}, "bad-same-content"),
    ]
    wizard_bad = [
        ("missing_field", {"instruction": "Write a poem."}, None),
        ("bad_field", {"instruction": 7, "output": "Seven."}, None),
        ("empty_turn", {"instruction": "Say nothing.", "output": ""}, None),
        ("not_an_object", None, None),
        ("image_tag_without_image", {"instruction": "Look at <image> please.", "output": "I cannot."}, None),
    ]
    llava_bad = [
        ("missing_field", {"id": "bad-llava-no-conversations", "image": some_image},
         "llava665k/bad-llava-no-conversations"),
        ("image_not_found", {"id": "bad-llava-missing-file", "image": "vg/VG_100K/nope.jpg",
                             "conversations": [hi("<image>\nQ?"), gp("A.")]}, "llava665k/bad-llava-missing-file"),
    ]
    truth_rows: list[dict] = []
    svit_rows = _insert(rng, shared + svit_core + sharegpt, svit_bad, SVIT, truth_rows)
    wizard_rows = _insert(rng, wizard, wizard_bad, WIZARD, truth_rows)
    llava_rows = _insert(rng, llava_instruct + shared + sharegpt, llava_bad, LLAVA, truth_rows)
    # the WizardLM rows without an id get "<source>-<row>": fill those in the truth
    for t in truth_rows:
        if t["file"] == WIZARD and t["reason"] not in ("not_an_object",):
            t["id"] = f"wizardlm-evol-instruct-70k-{t['row']}"

    paths = {"root": root, "image_root": img_root, "svit": os.path.join(root, SVIT),
             "wizardlm": os.path.join(root, WIZARD), "llava": os.path.join(root, LLAVA),
             "own": os.path.join(root, OWN), "truth": os.path.join(root, "truth.json")}
    _write_json_list(paths["svit"], svit_rows)
    _write_json_list(paths["wizardlm"], wizard_rows)
    _write_json_list(paths["llava"], llava_rows)

    # JSON Lines with malformed lines (the V2 conversations form)
    own_bad = [
        ("malformed_json", '{"idx": "own_broken", "conversations": [', None),
        ("malformed_json", "this is not json", None),
        ("not_an_object", "[1, 2, 3]", None),
        ("missing_field", json.dumps({"idx": "own_no_conversations"}), "own_no_conversations"),
        ("not_alternating", json.dumps({"idx": "own_gpt_first", "conversations": [gp("A."), hi("Q?")]}),
         "own_gpt_first"),
    ]
    own_lines = _insert(rng, [json.dumps(o, ensure_ascii=False) for o in own], own_bad, OWN, truth_rows)
    with storage.atomic_open(paths["own"], "wb") as f:
        f.write(("\n".join(own_lines) + "\n").encode())

    storage.write_json(paths["truth"], {
        "scale": scale, "seed": seed, "counts": {**c, "svit_records": len(svit_rows),
                                                 "wizardlm_records": len(wizard_rows),
                                                 "llava_records": len(llava_rows), "own_records": len(own_lines)},
        "planted": truth_rows})
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
