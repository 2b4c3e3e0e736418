"""Small synthetic benchmarks in the exact published layouts, for tests and the demo.

Each `write_<benchmark>(root, rows, images=...)` writes `root/<benchmark folder>/...` as
LLaVA's playground/data/eval/ (or the benchmark's own release) lays it out and returns
that folder. `images`: False (no image files: enough for scoring), True (a tiny
placeholder per image name), or {name: PIL.Image | bytes} (the demo's own pictures;
names not in it get a placeholder). `write_answers` writes a LLaVA answers.jsonl.

The rows are plain dicts; each writer's docstring names its keys.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os

from mllm.eval.benchmarks.base import MCQ, SHORT
from mllm.eval.benchmarks.mme import RELEASE as MME_RELEASE

SEED_DIMENSIONS = {"Scene Understanding": 1, "Instance Identity": 2, "Instance Attributes": 3,
                   "Instance Location": 4, "Instances Counting": 5, "Spatial Relation": 6,
                   "Instance Interaction": 7, "Visual Reasoning": 8, "Text Understanding": 9,
                   "Action Recognition": 10, "Action Prediction": 11, "Procedure Understanding": 12}
# MME subtasks whose release keeps images in images/ and questions in questions_answers_YN/
MME_NESTED = ("artwork", "celebrity", "landmark", "posters", "scene")


def placeholder(name: str = "", size: int = 8):
    from PIL import Image

    shade = sum(name.encode()) % 200 + 30
    return Image.new("RGB", (size, size), (shade, 255 - shade, 128))


def _image_bytes(img, name: str) -> bytes:
    if isinstance(img, (bytes, bytearray)):
        return bytes(img)
    ext = os.path.splitext(name)[1].lower()
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG" if ext in (".jpg", ".jpeg") else "PNG")
    return buf.getvalue()


def _write_images(folder: str, names, images) -> None:
    if not images:
        return
    given = images if isinstance(images, dict) else {}
    for name in dict.fromkeys(names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(_image_bytes(given.get(name) or placeholder(name), name))


def _jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def write_pope(root: str, rows: list[dict], images=False) -> str:
    """rows: {"image", "question" ("Is there a <object> in the image?"), "label" ("yes"|"no"),
    "category" ("adversarial"|"popular"|"random")}. question_id: 1.. over the file, as
    LLaVA's llava_pope_test.jsonl; the label files number their lines from 1 per category."""
    folder = os.path.join(root, "pope")
    per_cat: dict[str, list] = {}
    questions = []
    for i, r in enumerate(rows, 1):
        questions.append({"question_id": i, "image": r["image"],
                          "text": r["question"] + "\n" + SHORT, "category": r["category"]})
        lines = per_cat.setdefault(r["category"], [])
        lines.append({"question_id": len(lines) + 1, "image": r["image"], "text": r["question"],
                      "label": r["label"]})
    _jsonl(os.path.join(folder, "llava_pope_test.jsonl"), questions)
    for cat, lines in per_cat.items():
        _jsonl(os.path.join(folder, "coco", f"coco_pope_{cat}.json"), lines)
    _write_images(os.path.join(folder, "val2014"), [r["image"] for r in rows], images)
    return folder


def write_gqa(root: str, rows: list[dict], images=False) -> str:
    """rows: {"question_id" (str), "image" ("<imageId>.jpg"), "question", "answer",
    "balanced" (default True)}. Writes LLaVA's llava_gqa_testdev_balanced.jsonl and GQA's
    data/testdev_balanced_questions.json."""
    folder = os.path.join(root, "gqa")
    _jsonl(os.path.join(folder, "llava_gqa_testdev_balanced.jsonl"),
           [{"question_id": r["question_id"], "image": r["image"],
             "text": r["question"] + "\n" + SHORT, "category": "default"} for r in rows])
    release = {}
    for r in rows:
        release[str(r["question_id"])] = {
            "imageId": os.path.splitext(r["image"])[0], "question": r["question"],
            "answer": r["answer"], "fullAnswer": r["answer"], "isBalanced": r.get("balanced", True),
            "types": {"structural": "query", "semantic": "attr", "detailed": "colorSimple"},
            "groups": {"global": "color", "local": "10q-color"}, "semantic": [],
            "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
            "equivalent": [str(r["question_id"])], "entailed": []}
    _json(os.path.join(folder, "data", "testdev_balanced_questions.json"), release)
    _write_images(os.path.join(folder, "data", "images"), [r["image"] for r in rows], images)
    return folder


def write_scienceqa(root: str, rows: list[dict], images=False) -> str:
    """rows: {"id" (str), "question", "choices": [...], "answer" (index), "image" (file name
    or None), "split" (default "test"), "asked" (default True: in llava_test_CQM-A.json)}."""
    folder = os.path.join(root, "scienceqa")
    problems, splits, llava = {}, {"train": [], "val": [], "test": []}, []
    for r in rows:
        problems[r["id"]] = {"question": r["question"], "choices": r["choices"],
                             "answer": r["answer"], "image": r.get("image"), "hint": "",
                             "task": "closed choice", "split": r.get("split", "test")}
        splits[r.get("split", "test")].append(r["id"])
        if r.get("split", "test") != "test" or not r.get("asked", True):
            continue
        options = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(r["choices"]))
        value = ("<image>\n" if r.get("image") else "") + r["question"] + "\n" + options
        entry = {"id": r["id"], "conversations": [{"from": "human", "value": value},
                                                  {"from": "gpt", "value": "ABCDE"[r["answer"]]}]}
        if r.get("image"):
            entry["image"] = f"{r['id']}/{r['image']}"
        llava.append(entry)
    _json(os.path.join(folder, "llava_test_CQM-A.json"), llava)
    _json(os.path.join(folder, "problems.json"), problems)
    _json(os.path.join(folder, "pid_splits.json"), splits)
    _write_images(os.path.join(folder, "images", "test"),
                  [e["image"] for e in llava if "image" in e], images)
    return folder


def write_textvqa(root: str, rows: list[dict], images=False) -> str:
    """rows: {"image_id", "question", "answers" (10), "ocr" (tokens; [] for none)}.
    LLaVA's question file names each question by its image id."""
    folder = os.path.join(root, "textvqa")
    llava, data = [], []
    for i, r in enumerate(rows):
        ocr = ("\nReference OCR token: " + ", ".join(r["ocr"])) if r.get("ocr") else ""
        llava.append({"question_id": r["image_id"], "image": f"{r['image_id']}.jpg",
                      "text": r["question"] + ocr + "\n" + SHORT})
        data.append({"question_id": 34602 + i, "image_id": r["image_id"],
                     "question": r["question"], "answers": r["answers"],
                     "image_classes": [], "flickr_original_url": "", "set_name": "val"})
    _jsonl(os.path.join(folder, "llava_textvqa_val_v051_ocr.jsonl"), llava)
    _json(os.path.join(folder, "TextVQA_0.5.1_val.json"),
          {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    _write_images(os.path.join(folder, "train_images"), [q["image"] for q in llava], images)
    return folder


def write_vqav2(root: str, rows: list[dict], images=False) -> str:
    """rows: {"question_id" (int), "image_id" (int), "question", "answers" (10)}."""
    folder = os.path.join(root, "vqav2")
    _json(os.path.join(folder, "v2_OpenEnded_mscoco_val2014_questions.json"),
          {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
           "questions": [{"question_id": r["question_id"], "image_id": r["image_id"],
                          "question": r["question"]} for r in rows]})
    _json(os.path.join(folder, "v2_mscoco_val2014_annotations.json"),
          {"annotations": [{"question_id": r["question_id"], "image_id": r["image_id"],
                            "question_type": "what", "answer_type": "other",
                            "multiple_choice_answer": r["answers"][0],
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                        for k, a in enumerate(r["answers"])]} for r in rows]})
    _write_images(os.path.join(folder, "val2014"),
                  [f"COCO_val2014_{r['image_id']:012d}.jpg" for r in rows], images)
    return folder


def write_vizwiz(root: str, rows: list[dict], images=False) -> str:
    """rows: {"image", "question", "answers" (10)}; "answerable" derived (fewer than 3
    "unanswerable"), as the release marks it."""
    folder = os.path.join(root, "vizwiz")
    entries = []
    for r in rows:
        unans = sum(a == "unanswerable" for a in r["answers"])
        entries.append({"image": r["image"], "question": r["question"],
                        "answers": [{"answer": a, "answer_confidence": "yes"} for a in r["answers"]],
                        "answer_type": "unanswerable" if unans >= 3 else "other",
                        "answerable": int(unans < 3)})
    _json(os.path.join(folder, "val.json"), entries)
    _write_images(os.path.join(folder, "val"), [r["image"] for r in rows], images)
    return folder


def write_mme(root: str, rows: list[dict], images=False) -> str:
    """rows: {"subtask", "image" (file name), "question" (without "Please answer yes or
    no."), "answer" ("Yes"|"No"), "release_question" (optional: the release's exact text)}.
    Two rows per image, as the release has."""
    folder = os.path.join(root, "MME")
    release = os.path.join(folder, MME_RELEASE)
    llava, truth, names = [], {}, []
    for r in rows:
        nested = r["subtask"] in MME_NESTED
        rel = f"{r['subtask']}/images/{r['image']}" if nested else f"{r['subtask']}/{r['image']}"
        llava.append({"question_id": rel, "image": rel, "text": r["question"] + "\n" + SHORT,
                      "category": r["subtask"]})
        stem = os.path.splitext(r["image"])[0]
        txt = os.path.join(release, r["subtask"], "questions_answers_YN" if nested else "", stem + ".txt")
        truth.setdefault(txt, []).append(
            r.get("release_question", r["question"] + " Please answer yes or no.") + "\t" + r["answer"])
        names.append(rel)
    _jsonl(os.path.join(folder, "llava_mme.jsonl"), llava)
    for path, lines in truth.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    for r in rows:                      # the release's folder shape, with or without pictures
        if r["subtask"] in MME_NESTED:
            os.makedirs(os.path.join(release, r["subtask"], "images"), exist_ok=True)
    _write_images(release, names, images)
    return folder


def write_mmbench(root: str, rows: list[dict], circular: bool = True,
                  name: str = "mmbench_dev_20230712.tsv") -> str:
    """rows: {"index" (< 1e6), "question", "hint" (or None), "options" (2-4), "answer"
    (letter), "category", "image" (PIL.Image | bytes | None)}. circular: also write the
    released TSV's circular rows (index + k x 1e6, options rotated left by k, answer moved);
    False writes only the first pass (Warren then generates the rotations)."""
    folder = os.path.join(root, "mmbench")
    os.makedirs(folder, exist_ok=True)
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
            "source", "l2-category", "comment", "split"]
    out = []
    passes = []
    for r in rows:
        n = len(r["options"])
        a = "ABCD".index(r["answer"])
        img = base64.b64encode(_image_bytes(r.get("image") or placeholder(str(r["index"])),
                                            "x.jpg")).decode()
        for k in range(n if circular else 1):
            shown = r["options"][k:] + r["options"][:k]
            row = {"index": r["index"] + k * 1_000_000, "question": r["question"],
                   "hint": r.get("hint") or "", "answer": "ABCD"[(a - k) % n],
                   "category": r.get("category", "object_localization"), "image": img,
                   "source": "synthetic", "l2-category": "finegrained_perception (instance-level)",
                   "comment": "", "split": "dev"}
            for j, letter in enumerate("ABCD"):
                row[letter] = shown[j] if j < n else ""
            (out if k == 0 else passes).append(row)
    with open(os.path.join(folder, name), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, delimiter="\t")
        w.writeheader()
        for row in out + passes:        # the release lists the first passes, then the rest
            w.writerow(row)
    return folder


def write_seed(root: str, rows: list[dict], images=False) -> str:
    """rows: {"question_id" (int), "question", "choices" (4), "answer" (letter),
    "dimension" (a SEED dimension name), "data_type" ("image"|"video", default image)}."""
    folder = os.path.join(root, "seed_bench")
    questions, llava, names = [], [], []
    for r in rows:
        video = r.get("data_type", "image") == "video"
        data_id = f"{r['question_id']}.mp4" if video else f"{r['question_id']}.jpg"
        image = (f"SEED-Bench-video-image/{r['question_id']}.png" if video
                 else f"SEED-Bench-image/{data_id}")
        q = {"answer": r["answer"], "data_id": data_id, "data_type": r.get("data_type", "image"),
             "question": r["question"], "question_id": str(r["question_id"]),
             "question_type_id": SEED_DIMENSIONS[r["dimension"]]}
        for letter, c in zip("abcd", r["choices"]):
            q[f"choice_{letter}"] = c
        questions.append(q)
        options = "".join(f"\n{L}. {c}" for L, c in zip("ABCD", r["choices"]))
        llava.append({"question_id": r["question_id"], "image": image,
                      "text": r["question"] + options + "\n" + MCQ})
        names.append(image)
    _json(os.path.join(folder, "SEED-Bench.json"),
          {"questions": questions, "question_type": SEED_DIMENSIONS})
    _jsonl(os.path.join(folder, "llava-seed-bench.jsonl"), llava)
    _write_images(folder, names, images)
    return folder


def write_vsr(root: str, rows: list[dict], images=False) -> str:
    """rows: {"image", "caption", "label" (0|1), "relation"}: the release's test.jsonl."""
    folder = os.path.join(root, "vsr")
    _jsonl(os.path.join(folder, "test.jsonl"),
           [{"image": r["image"], "image_link": "", "caption": r["caption"], "label": r["label"],
             "relation": r.get("relation", "left of"), "annotator_id": 0,
             "vote_true_validator_id": [], "vote_false_validator_id": []} for r in rows])
    _write_images(os.path.join(folder, "images"), [r["image"] for r in rows], images)
    return folder


def write_hateful_memes(root: str, rows: list[dict], images=False) -> str:
    """rows: {"id" (int), "text", "label" (0|1)}: the release's dev.jsonl, img/<id>.png."""
    folder = os.path.join(root, "hateful_memes")
    _jsonl(os.path.join(folder, "dev.jsonl"),
           [{"id": r["id"], "img": f"img/{r['id']:05d}.png", "label": r["label"], "text": r["text"]}
            for r in rows])
    _write_images(folder, [f"img/{r['id']:05d}.png" for r in rows], images)
    return folder


def write_answers(path: str, questions, texts: dict, model_id: str = "synthetic") -> str:
    """A LLaVA answers.jsonl for `questions` (Question objects, in order): one line per
    question whose id is in `texts`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, q in enumerate(questions):
            if q.question_id in texts:
                f.write(json.dumps({"question_id": q.question_id, "prompt": q.prompt,
                                    "text": texts[q.question_id], "answer_id": f"a{i}",
                                    "model_id": model_id, "metadata": q.metadata}) + "\n")
    return path
