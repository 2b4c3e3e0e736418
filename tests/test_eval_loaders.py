"""Each benchmark loader on synthetic files in the exact published layout: the questions
it yields (ids, prompts as LLaVA writes them, images, order), both forms of --data, and
one-line errors for bad files."""
from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image

from mllm.eval.benchmarks import fixtures as fx
from mllm.eval.benchmarks.base import MCQ, SHORT
from mllm.eval.types import REGISTRY, Question
from pipelines.errors import InputError


def qs(name, data):
    return list(REGISTRY[name]().questions(str(data)))


def both_forms(name, root, folder):
    """--data as the eval root and as the benchmark's own folder give the same questions."""
    a, b = qs(name, root), qs(name, folder)
    assert a == b and a
    for q in a:
        assert isinstance(q, Question)
        if isinstance(q.image, str):
            assert os.path.isabs(q.image) and os.path.isfile(q.image)
    return a


def test_pope_loader(tmp_path):
    rows = [{"image": "COCO_val2014_000000310196.jpg", "question": "Is there a snowboard in the image?",
             "label": "yes", "category": "adversarial"},
            {"image": "COCO_val2014_000000310196.jpg", "question": "Is there a backpack in the image?",
             "label": "no", "category": "adversarial"},
            {"image": "COCO_val2014_000000210789.jpg", "question": "Is there a dog in the image?",
             "label": "no", "category": "random"}]
    folder = fx.write_pope(str(tmp_path), rows, images=True)
    assert sorted(os.listdir(os.path.join(folder, "coco"))) == ["coco_pope_adversarial.json",
                                                               "coco_pope_random.json"]
    got = both_forms("pope", tmp_path, folder)
    assert [q.question_id for q in got] == [1, 2, 3]
    assert got[0].prompt == "Is there a snowboard in the image?\n" + SHORT
    assert got[2].image == os.path.join(folder, "val2014", "COCO_val2014_000000210789.jpg")
    assert [q.metadata["category"] for q in got] == ["adversarial", "adversarial", "random"]
    # the label files are JSON lines numbered per category, as POPE's release
    lines = open(os.path.join(folder, "coco", "coco_pope_random.json")).read().splitlines()
    assert [json.loads(x) for x in lines] == [{"question_id": 1, "image": "COCO_val2014_000000210789.jpg",
                                              "text": "Is there a dog in the image?", "label": "no"}]


def test_scienceqa_loader(tmp_path):
    folder = fx.write_scienceqa(str(tmp_path), [
        {"id": "5", "question": "Which is a mammal?", "choices": ["frog", "cat"], "answer": 1,
         "image": "image.png"},
        {"id": "4", "question": "Which word rhymes?", "choices": ["a", "b", "c"], "answer": 0, "image": None},
        {"id": "7", "question": "train only", "choices": ["a", "b"], "answer": 0, "split": "train"}],
        images=True)
    got = both_forms("scienceqa", tmp_path, folder)
    assert [q.question_id for q in got] == ["5", "4"]                       # the file's order
    assert got[0].prompt == "Which is a mammal?\nA. frog\nB. cat\n" + MCQ   # '<image>' removed, stripped
    assert got[0].image == os.path.join(folder, "images", "test", "5", "image.png")
    assert got[1].image is None and got[1].prompt == "Which word rhymes?\nA. a\nB. b\nC. c\n" + MCQ


def test_gqa_loader(tmp_path):
    folder = fx.write_gqa(str(tmp_path), [
        {"question_id": "20968379", "image": "n288870.jpg", "question": "Who is wearing the dress?",
         "answer": "woman"},
        {"question_id": "201307251", "image": "n161313.jpg", "question": "Is it overcast?", "answer": "no"}],
        images=True)
    got = both_forms("gqa", tmp_path, folder)
    assert [q.question_id for q in got] == ["20968379", "201307251"]
    assert got[1].prompt == "Is it overcast?\n" + SHORT
    assert got[1].image == os.path.join(folder, "data", "images", "n161313.jpg")
    # Bunny keeps the GQA release next to the question file: accepted too
    os.rename(os.path.join(folder, "data", "testdev_balanced_questions.json"),
              os.path.join(folder, "testdev_balanced_questions.json"))
    assert [q.question_id for q in qs("gqa", folder)] == ["20968379", "201307251"]


def test_textvqa_loader_numbers_repeated_image_ids(tmp_path):
    folder = fx.write_textvqa(str(tmp_path), [
        {"image_id": "003a8ae2ef43b901", "question": "What is the brand of this camera?",
         "answers": ["dakota"] * 10, "ocr": ["DAKOTA", "DIGITAL"]},
        {"image_id": "b9dc400eb20bad64", "question": "What does the text spell?", "answers": ["x"] * 10,
         "ocr": []},
        {"image_id": "003a8ae2ef43b901", "question": "What color is it?", "answers": ["red"] * 10,
         "ocr": ["DAKOTA"]}], images=True)
    got = both_forms("textvqa", tmp_path, folder)
    assert [q.question_id for q in got] == ["003a8ae2ef43b901#0", "b9dc400eb20bad64", "003a8ae2ef43b901#1"]
    assert got[0].prompt == ("What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL\n"
                             + SHORT)
    assert got[1].prompt == "What does the text spell?\n" + SHORT
    assert got[2].image == os.path.join(folder, "train_images", "003a8ae2ef43b901.jpg")


def test_vqav2_loader(tmp_path):
    folder = fx.write_vqav2(str(tmp_path), [
        {"question_id": 262148000, "image_id": 262148, "question": "Where is he looking?",
         "answers": ["down"] * 10}], images=True)
    got = both_forms("vqav2", tmp_path, folder)
    assert got == [Question(262148000, "Where is he looking?\n" + SHORT,
                            os.path.join(folder, "val2014", "COCO_val2014_000000262148.jpg"), {}, 128)]


def test_vizwiz_loader(tmp_path):
    folder = fx.write_vizwiz(str(tmp_path), [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answers": ["unanswerable"] * 10},
        {"image": "VizWiz_val_00000001.jpg", "question": "Which soup?", "answers": ["tomato"] * 10}],
        images=True)
    got = both_forms("vizwiz", tmp_path, folder)
    assert [q.question_id for q in got] == [0, 1]
    assert got[0].prompt == ("What is this?\nWhen the provided information is insufficient, respond "
                             "with 'Unanswerable'.\nAnswer the question using a single word or phrase.")
    assert got[0].metadata == {"answerable": 0} and got[1].metadata == {"answerable": 1}


def test_mme_loader(tmp_path):
    folder = fx.write_mme(str(tmp_path), [
        {"subtask": "code_reasoning", "image": "0020.png", "question": "Is a python code shown in the picture?",
         "answer": "Yes"},
        {"subtask": "code_reasoning", "image": "0020.png", "question": "Is a c++ code shown in the picture?",
         "answer": "No"},
        {"subtask": "artwork", "image": "10002.jpg", "question": "Is this artwork created by Monet?",
         "answer": "No"},
        {"subtask": "artwork", "image": "10002.jpg", "question": "Is this artwork created by Manet?",
         "answer": "Yes"}], images=True)
    release = os.path.join(folder, "MME_Benchmark_release_version")
    assert os.path.isfile(os.path.join(release, "artwork", "questions_answers_YN", "10002.txt"))
    assert os.path.isfile(os.path.join(release, "code_reasoning", "0020.txt"))
    got = both_forms("mme", tmp_path, folder)
    assert [q.question_id for q in got] == ["code_reasoning/0020.png#0", "code_reasoning/0020.png#1",
                                            "artwork/images/10002.jpg#0", "artwork/images/10002.jpg#1"]
    assert got[0].prompt == "Is a python code shown in the picture?\n" + SHORT
    assert got[2].image == os.path.join(release, "artwork", "images", "10002.jpg")


def test_mme_image_needs_two_questions(tmp_path):
    fx.write_mme(str(tmp_path), [{"subtask": "count", "image": "1.jpg", "question": "Two?", "answer": "Yes"}])
    with pytest.raises(InputError, match="image 'count/1.jpg' has 1 questions"):
        qs("mme", tmp_path)


def test_mmbench_loader(tmp_path):
    picture = Image.new("RGB", (6, 4), (10, 200, 30))
    folder = fx.write_mmbench(str(tmp_path), [
        {"index": 7, "question": "What is shown?", "hint": "Look closely.", "options": ["cat", "dog", "cow"],
         "answer": "B", "image": picture},
        {"index": 9, "question": "Is it day?", "hint": None, "options": ["yes", "no"], "answer": "A"}],
        circular=False)
    got = both_forms("mmbench", tmp_path, folder)
    assert [q.question_id for q in got] == [7, 1_000_007, 2_000_007, 9, 1_000_009]
    assert got[0].prompt == "Look closely.\nWhat is shown?\nA. cat\nB. dog\nC. cow\n" + MCQ
    assert got[1].prompt == "Look closely.\nWhat is shown?\nA. dog\nB. cow\nC. cat\n" + MCQ
    assert got[3].prompt == "Is it day?\nA. yes\nB. no\n" + MCQ
    assert Image.open(io.BytesIO(got[0].image)).size == (6, 4)              # base64 decoded
    assert [q.metadata["round"] for q in got] == [0, 1, 2, 0, 1]


def test_seed_loader_asks_image_questions_only(tmp_path):
    folder = fx.write_seed(str(tmp_path), [
        {"question_id": 101669, "question": "How many towels?", "choices": ["1", "2", "3", "4"],
         "answer": "A", "dimension": "Instances Counting"},
        {"question_id": 5, "question": "What happens?", "choices": ["a", "b", "c", "d"], "answer": "B",
         "dimension": "Action Recognition", "data_type": "video"}], images=True)
    got = both_forms("seed", tmp_path, folder)
    assert [q.question_id for q in got] == [101669]
    assert got[0].prompt == "How many towels?\nA. 1\nB. 2\nC. 3\nD. 4\n" + MCQ
    assert got[0].image == os.path.join(folder, "SEED-Bench-image", "101669.jpg")
    assert got[0].metadata == {"dimension": "Instances Counting"}


def test_vsr_loader_finds_coco_images_where_tinygptv_does(tmp_path):
    folder = fx.write_vsr(str(tmp_path), [
        {"image": "000000085637.jpg", "caption": "The umbrella is at the left side of the bench.", "label": 1},
        {"image": "000000000009.jpg", "caption": "The cup is on the table.", "label": 0}], images=True)
    os.makedirs(os.path.join(folder, "val2017"))
    os.rename(os.path.join(folder, "images", "000000000009.jpg"),
              os.path.join(folder, "val2017", "000000000009.jpg"))
    got = both_forms("vsr", tmp_path, folder)
    assert [q.question_id for q in got] == [0, 1]
    assert got[0].prompt == ("Based on the image, is this statement true or false? The umbrella is at the "
                             "left side of the bench.\n" + SHORT)
    assert got[1].image == os.path.join(folder, "val2017", "000000000009.jpg")
    assert got[0].max_new_tokens == 20


def test_hateful_memes_loader(tmp_path):
    folder = fx.write_hateful_memes(str(tmp_path), [{"id": 8291, "text": "white people is this a shooting range",
                                                     "label": 1}], images=True)
    got = both_forms("hateful_memes", tmp_path, folder)
    assert got == [Question(8291, "This is an image writting 'white people is this a shooting range'. "
                                  "Is this image hateful? Answer yes or no.",
                            os.path.join(folder, "img", "08291.png"), {}, 20)]


def test_every_benchmark_loader_is_tested_here():
    tested = {n[len("test_"):].split("_loader")[0] for n in globals()
              if n.startswith("test_") and "_loader" in n}
    assert set(REGISTRY) <= tested, set(REGISTRY) - tested


# ---------------------------------------------------------------- bad files
def test_missing_folder_and_files_name_what_is_expected(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        qs("pope", tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"no pope files: expected pope/llava_pope_test.jsonl"):
        qs("pope", tmp_path)
    (tmp_path / "vizwiz").mkdir()
    (tmp_path / "vizwiz" / "llava_test.jsonl").write_text("")
    with pytest.raises(InputError, match="VizWiz test is scored only by the EvalAI server"):
        qs("vizwiz", tmp_path)


def test_malformed_question_file_line_is_named(tmp_path):
    folder = fx.write_gqa(str(tmp_path), [{"question_id": "1", "image": "n1.jpg", "question": "q?",
                                           "answer": "a"}])
    path = os.path.join(folder, "llava_gqa_testdev_balanced.jsonl")
    with open(path, "a") as f:
        f.write('{"question_id": "2", "image": \n')
    with pytest.raises(InputError, match=r"llava_gqa_testdev_balanced.jsonl: line 2: not valid JSON"):
        qs("gqa", tmp_path)
    with open(path, "w") as f:
        f.write('{"question_id": "1", "text": "q?"}\n')
    with pytest.raises(InputError, match=r"line 1: no 'image'"):
        qs("gqa", tmp_path)


def test_missing_image_is_named(tmp_path):
    fx.write_pope(str(tmp_path), [{"image": "gone.jpg", "question": "Is there a cat in the image?",
                                   "label": "no", "category": "random"}])
    with pytest.raises(InputError, match=r"val2014/gone.jpg: image of question 1 not found"):
        qs("pope", tmp_path)


def test_repeated_question_id_is_an_error(tmp_path):
    fx.write_pope(str(tmp_path), [{"image": "a.jpg", "question": "Is there a cat in the image?",
                                   "label": "no", "category": "random"}] * 2)
    path = os.path.join(str(tmp_path), "pope", "llava_pope_test.jsonl")
    rows = [json.loads(x) for x in open(path)]
    rows[1]["question_id"] = "1"                      # 1 and "1" are one id
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(InputError, match="question_id '1' appears twice"):
        qs("pope", tmp_path)
    with pytest.raises(InputError, match="appears twice"):
        REGISTRY["pope"]().score(str(tmp_path), [])
