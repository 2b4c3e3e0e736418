"""Each benchmark's scorer against scores worked out by hand from its official script,
including the scripts' parsing quirks.

`CASES[name](root)` writes a small benchmark in its published layout under `root` and
returns (answer texts by question id, the expected scores); test_eval_cli.py runs the
same cases through `warren eval score`.
"""
from __future__ import annotations

import json
import random

import pytest

from mllm.eval import scoring
from mllm.eval.benchmarks import fixtures as fx
from mllm.eval.types import REGISTRY
from pipelines.errors import InputError


def bench(name):
    return REGISTRY[name]()


def answer_rows(name, root, texts):
    """LLaVA answers.jsonl rows for `texts` {question_id: text}, in question order."""
    return [{"question_id": q.question_id, "prompt": q.prompt, "text": texts[q.question_id],
             "answer_id": str(i), "model_id": "m", "metadata": {}}
            for i, q in enumerate(bench(name).items(bench(name).root(root)))
            for q in [q.question] if q.question_id in texts]


# ---------------------------------------------------------------- POPE
def case_pope(root):
    rows = [  # category, label, answer; eval_pope.py's reading of it in the comment
        ("adversarial", "yes", "Yes, there is a dog."),   # yes  TP
        ("adversarial", "yes", "No."),                    # no   FN
        ("adversarial", "no", "I am not sure"),           # no ('not')  TN
        ("adversarial", "no", "NO"),                      # yes ('NO' is not a no-word)  FP
        ("adversarial", "no", "Yes. No, there is not."),  # yes (first sentence only)  FP
        ("adversarial", "yes", "No\nYes"),                # yes (the newline sticks: 'No\nYes')  TP
        ("popular", "no", "No, there is not."),           # no   TN
        ("popular", "yes", "Yes"),                        # yes  TP
        ("random", "yes", "no"),                          # no   FN
        ("random", "no", "no"),                           # no   TN
    ]
    fx.write_pope(root, [{"image": f"COCO_val2014_{i:012d}.jpg", "question": f"Is there a thing{i} in the image?",
                          "label": lab, "category": cat} for i, (cat, lab, _) in enumerate(rows)])
    texts = {i + 1: text for i, (_, _, text) in enumerate(rows)}
    p, r = 2 / (2 + 2), 2 / (2 + 1)                       # adversarial: TP 2, FP 2, TN 1, FN 1
    adversarial = {"accuracy": (2 + 1) / 6, "precision": p, "recall": r,
                   "f1": 2 * p * r / (p + r), "yes_ratio": 4 / 6}
    popular = {"accuracy": 2 / 2, "precision": 1 / 1, "recall": 1 / 1, "f1": 2 * 1.0 * 1.0 / 2.0,
               "yes_ratio": 1 / 2}
    # random: TP 0 -> precision divides by zero in eval_pope.py; 0.0 as sklearn's zero_division=0
    rand = {"accuracy": 1 / 2, "precision": 0.0, "recall": 0 / 1, "f1": 0.0, "yes_ratio": 0 / 2}
    expected = {"adversarial": adversarial, "popular": popular, "random": rand,
                "average_f1": (adversarial["f1"] + popular["f1"] + rand["f1"]) / 3}
    return texts, expected


def test_pope_matches_hand_computed(tmp_path):
    texts, expected = case_pope(str(tmp_path))
    assert expected["adversarial"]["f1"] == pytest.approx(4 / 7)
    res = bench("pope").result(str(tmp_path), answer_rows("pope", str(tmp_path), texts))
    assert res.scores == expected and res.n == 10
    # per_question: correctness (F1 is not a mean over questions)
    assert res.credits == {1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 0.0, 6: 1.0, 7: 1.0, 8: 1.0, 9: 0.0, 10: 1.0}


def test_pope_answer_order_does_not_matter_and_holes_are_refused(tmp_path):
    texts, expected = case_pope(str(tmp_path))
    rows = answer_rows("pope", str(tmp_path), texts)
    random.Random(0).shuffle(rows)
    assert bench("pope").score(str(tmp_path), rows) == expected
    with pytest.raises(InputError, match="no answer for 1 of 10 pope questions.*first: 4"):
        bench("pope").score(str(tmp_path), [r for r in rows if r["question_id"] != 4])


def test_pope_label_file_out_of_step_is_an_error(tmp_path):
    case_pope(str(tmp_path))
    path = tmp_path / "pope" / "coco" / "coco_pope_popular.json"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(reversed(lines)) + "\n")        # labels no longer in question order
    with pytest.raises(InputError, match="coco_pope_popular.json: line 1: does not match question 1"):
        bench("pope").score(str(tmp_path), [])
    path.write_text(lines[0] + "\n")
    with pytest.raises(InputError, match="question 2 of category 'popular' has no label"):
        bench("pope").score(str(tmp_path), [])


def test_pope_limit_scores_the_first_questions(tmp_path):
    texts, _ = case_pope(str(tmp_path))
    rows = answer_rows("pope", str(tmp_path), texts)
    res = bench("pope").result(str(tmp_path), rows, limit=2)      # TP + FN, adversarial only
    assert res.n == 2 and set(res.scores) == {"adversarial", "average_f1"}
    assert res.scores["adversarial"] == {"accuracy": 1 / 2, "precision": 1 / 1, "recall": 1 / 2,
                                         "f1": 2 * 1.0 * 0.5 / 1.5, "yes_ratio": 1 / 2}


# ---------------------------------------------------------------- ScienceQA
def case_scienceqa(root):
    P = [  # id, image?, n choices, answer index, answer text (None: unanswered)
        ("1", True, 2, 1, "The answer is B."),            # B: right
        ("2", True, 3, 0, "B. cat"),                      # B: wrong
        ("3", True, 2, 0, "FAILED"),                      # FAILED: wrong
        ("4", False, 4, 2, "C"),                          # C: right
        ("5", True, 2, 1, "E"),                           # E is past 2 choices: wrong
        ("6", True, 2, 0, None),                          # unanswered: wrong, outside IMG
        ("7", False, 4, 3, "The answer is D. The answer is D."),  # pattern twice: FAILED
        ("8", True, 2, 0, "A. The answer is B."),         # "A. " first: A, right
        ("9", True, 2, 1, "The answer is B"),             # pattern needs a char after: FAILED
        ("10", False, 2, 0, None),                        # in the test split, not asked: wrong
    ]
    rows = [{"id": pid, "question": f"Question {pid}?", "choices": [f"c{k}" for k in range(n)],
             "answer": a, "image": "image.png" if img else None, "asked": pid != "10"}
            for pid, img, n, a, _ in P]
    rows.append({"id": "99", "question": "train", "choices": ["a", "b"], "answer": 0, "split": "train"})
    fx.write_scienceqa(root, rows)
    texts = {pid: t for pid, _, _, _, t in P if t is not None}
    # total 10 (the whole test split), right: 1, 4, 8.  IMG: 1 2 3 5 8 9 (answered, image), right 1 8
    return texts, {"accuracy": 3 / 10 * 100, "img_accuracy": 2 / 6 * 100}


def test_scienceqa_matches_hand_computed(tmp_path):
    texts, expected = case_scienceqa(str(tmp_path))
    res = bench("scienceqa").result(str(tmp_path), answer_rows("scienceqa", str(tmp_path), texts))
    assert res.scores == expected and res.n == 10
    assert res.scores["img_accuracy"] == 33.33333333333333         # unrounded, as the script
    assert res.credits == {"1": 1.0, "2": 0.0, "3": 0.0, "5": 0.0, "8": 1.0, "9": 0.0}


# ---------------------------------------------------------------- GQA
def case_gqa(root):
    Q = [  # id, gold, answer, balanced
        ("201", "yes", "Yes.", True),          # rstrip('.').lower(): yes
        ("202", "red", "Red", True),
        ("203", "left", "left ", True),        # trailing space stays: wrong
        ("204", "cup", "The cup.", True),      # articles stay: wrong
        ("205", "circle", "circle...", True),  # all trailing periods go
        ("206", "no", "yes", False),           # not balanced: not counted
    ]
    fx.write_gqa(root, [{"question_id": q, "image": f"n{q}.jpg", "question": f"q{q}?", "answer": g,
                         "balanced": b} for q, g, _, b in Q])
    return {q: a for q, _, a, _ in Q}, {"accuracy": float(1 + 1 + 0 + 0 + 1) / 5 * 100}


def test_gqa_matches_hand_computed(tmp_path):
    texts, expected = case_gqa(str(tmp_path))
    res = bench("gqa").result(str(tmp_path), answer_rows("gqa", str(tmp_path), texts))
    assert res.scores == expected and res.n == 5
    assert res.credits == {"201": 1.0, "202": 1.0, "203": 0.0, "204": 0.0, "205": 1.0}
    rows = answer_rows("gqa", str(tmp_path), texts)
    with pytest.raises(InputError, match="missing predictions"):
        bench("gqa").score(str(tmp_path), rows[1:])
    assert bench("gqa").score(str(tmp_path), rows[:2], limit=2) == {"accuracy": 100.0}
    # eval.py needs predictions for balanced questions only: the unbalanced 206 may be absent
    assert bench("gqa").score(str(tmp_path), rows[:-1]) == expected


def test_gqa_release_question_missing_from_llava_file_is_an_error(tmp_path):
    texts, _ = case_gqa(str(tmp_path))
    qfile = tmp_path / "gqa" / "llava_gqa_testdev_balanced.jsonl"
    qfile.write_text("".join(qfile.read_text().splitlines(True)[1:]))
    with pytest.raises(InputError, match="balanced question '201' is not in"):
        bench("gqa").score(str(tmp_path), answer_rows("gqa", str(tmp_path), texts))


# ---------------------------------------------------------------- TextVQA / VQAv2 / VizWiz
def case_textvqa(root):
    rows = [  # 10 human answers, the model's answer; credit by the leave-one-out rule
        ("img1", "What does the sign say?", ["stop"] * 3 + ["go"] * 7, "STOP!"),     # 3 agree: 0.9
        ("img1", "What color is it?", ["red"] * 10, "Red."),                         # 10 agree: 1
        ("img2", "How many?", ["two"] + ["three"] * 9, "2"),                         # 1 agrees: 0.3
        ("img3", "Brand?", ["coca cola"] * 2 + ["pepsi"] * 8, "Coca-Cola"),          # 'coca cola': 2: 0.6
    ]
    fx.write_textvqa(root, [{"image_id": i, "question": q, "answers": a, "ocr": ["STOP", "3"] if k else []}
                            for k, (i, q, a, _) in enumerate(rows)])
    texts = {"img1#0": rows[0][3], "img1#1": rows[1][3], "img2": rows[2][3], "img3": rows[3][3]}
    c3 = (2 / 3 + 2 / 3 + 2 / 3 + 1 + 1 + 1 + 1 + 1 + 1 + 1) / 10
    c1 = (0 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3) / 10
    c2 = (1 / 3 + 1 / 3 + 2 / 3 + 2 / 3 + 2 / 3 + 2 / 3 + 2 / 3 + 2 / 3 + 2 / 3 + 2 / 3) / 10
    return texts, {"accuracy": 100. * (((((0 + c3) + 1.0) + c1) + c2) / 4)}


def test_textvqa_matches_hand_computed(tmp_path):
    texts, expected = case_textvqa(str(tmp_path))
    res = bench("textvqa").result(str(tmp_path), answer_rows("textvqa", str(tmp_path), texts))
    assert res.scores == expected and res.n == 4
    assert res.credits["img1#0"] == pytest.approx(0.9) and res.credits["img2"] == pytest.approx(0.3)
    assert res.credits["img3"] == pytest.approx(0.6) and res.credits["img1#1"] == 1.0


def test_textvqa_reads_llava_answers_with_repeated_ids_and_skips_unanswered(tmp_path):
    texts, expected = case_textvqa(str(tmp_path))
    rows = answer_rows("textvqa", str(tmp_path), texts)
    for r in rows:                                   # LLaVA's own file: the bare image id
        r["question_id"] = r["question_id"].split("#")[0]
    rows[0], rows[1] = rows[1], rows[0]
    assert bench("textvqa").score(str(tmp_path), rows) == expected
    # eval_textvqa.py scores only the answers it gets: img2 left out of the mean
    res = bench("textvqa").result(str(tmp_path), [r for r in rows if r["question_id"] != "img2"])
    assert res.n == 3 and "img2" not in res.credits
    bad = dict(rows[0], prompt="What is it?\nAnswer the question using a single word or phrase.")
    with pytest.raises(InputError, match="answer 1: question_id 'img1' names several questions"):
        bench("textvqa").score(str(tmp_path), [bad])


def case_vqav2(root):
    rows = [(1, 7, "How many dogs?", ["2"] * 4 + ["3"] * 6, "Two"),            # 'two' -> '2': 4 agree: 1
            (2, 7, "What animal?", ["dog"] + ["cat"] * 9, "a dog"),            # article dropped: 1: 0.3
            (3, 8, "What is it?", ["hot dog"] * 10, "hot-dog")]                # '-' in a word -> ' ': 1
    fx.write_vqav2(root, [{"question_id": q, "image_id": i, "question": t, "answers": a}
                          for q, i, t, a, _ in rows])
    c1 = (0 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3) / 10
    return {q: t for q, _, _, _, t in rows}, {"accuracy": 100. * ((((0 + 1.0) + c1) + 1.0) / 3)}


def test_vqav2_matches_hand_computed(tmp_path):
    texts, expected = case_vqav2(str(tmp_path))
    res = bench("vqav2").result(str(tmp_path), answer_rows("vqav2", str(tmp_path), texts))
    assert res.scores == expected and res.scores["accuracy"] == pytest.approx(100 * 2.3 / 3)
    with pytest.raises(InputError, match="loadRes"):
        bench("vqav2").score(str(tmp_path), answer_rows("vqav2", str(tmp_path), {1: "2"}))


def case_vizwiz(root):
    rows = [("a.jpg", "What is this?", ["unanswerable"] * 10, "Unanswerable"),       # 1
            ("b.jpg", "What soup?", ["unanswerable"] * 2 + ["tomato soup"] * 8, "unanswerable"),  # 2 agree: 0.6
            ("c.jpg", "What soup?", ["unanswerable"] * 2 + ["tomato soup"] * 8, "Tomato soup.")]  # 8: 1
    fx.write_vizwiz(root, [{"image": i, "question": q, "answers": a} for i, q, a, _ in rows])
    c2 = (1 / 3 + 1 / 3 + 2 / 3 + 2 / 3 + 2 / 3 + 2 / 3 + 2 / 3 + 2 / 3 + 2 / 3 + 2 / 3) / 10
    return {k: r[3] for k, r in enumerate(rows)}, {"accuracy": 100. * ((((0 + 1.0) + c2) + 1.0) / 3)}


def test_vizwiz_counts_unanswerable_like_any_answer(tmp_path):
    texts, expected = case_vizwiz(str(tmp_path))
    res = bench("vizwiz").result(str(tmp_path), answer_rows("vizwiz", str(tmp_path), texts))
    assert res.scores == expected and res.credits[1] == pytest.approx(0.6)


# ---------------------------------------------------------------- MME
def case_mme(root):
    R = [  # subtask, image, question, truth, answer: calculation.py's reading
        ("existence", "1.jpg", "Is there a dog?", "Yes", "Yes"),                 # yes: right
        ("existence", "1.jpg", "Is there a cat?", "No", "No, there is not."),    # 'no, ': no: right
        ("existence", "2.jpg", "Is there a car?", "Yes", "yes\nNo"),             # first line only: right
        ("existence", "2.jpg", "Is there a bus?", "No", "I think no"),           # 'i th': other: wrong
        ("existence", "3.jpg", "Is there a cup?", "Yes", "No"),                  # wrong
        ("existence", "3.jpg", "Is there a pen?", "No", "no"),                   # right
        ("artwork", "10.jpg", "Is this by Monet?", "Yes", "Nope, yes"),          # 'nope': no: wrong
        ("artwork", "10.jpg", "Is this by Dali?", "No", "not"),                  # 'not\n': no: right
        ("code_reasoning", "0020.png", "Is a python code shown?", "Yes", "Yes"),
        ("code_reasoning", "0020.png", "Is a c++ code shown?", "No", " no"),     # ' no\n': no: right
    ]
    rows = [{"subtask": s, "image": i, "question": q, "answer": t} for s, i, q, t, _ in R]
    rows[9]["release_question"] = "Is a c++ code shown?  Please answer yes or no."   # two spaces
    fx.write_mme(root, rows)
    ids = ["existence/1.jpg#0", "existence/1.jpg#1", "existence/2.jpg#0", "existence/2.jpg#1",
           "existence/3.jpg#0", "existence/3.jpg#1", "artwork/images/10.jpg#0",
           "artwork/images/10.jpg#1", "code_reasoning/0020.png#0", "code_reasoning/0020.png#1"]
    existence = 0 + (4 / 6) * 100 + (1 / 3) * 100      # acc 4 of 6, acc+ images 1 of 3
    artwork = 0 + (1 / 2) * 100 + (0 / 1) * 100
    code = 0 + (2 / 2) * 100 + (1 / 1) * 100
    expected = {"perception": 0 + existence + artwork, "cognition": 0 + code,
                "existence": existence, "artwork": artwork, "code_reasoning": code}
    return dict(zip(ids, (r[4] for r in R))), expected


def test_mme_acc_plus_needs_both_questions_of_an_image(tmp_path):
    texts, expected = case_mme(str(tmp_path))
    res = bench("mme").result(str(tmp_path), answer_rows("mme", str(tmp_path), texts))
    assert res.scores == expected and res.n == 10
    assert list(res.scores)[:2] == ["perception", "cognition"]
    # credit = (own + image's both-right) / 2, perception questions only
    assert res.credits == {"existence/1.jpg#0": 1.0, "existence/1.jpg#1": 1.0,
                           "existence/2.jpg#0": 0.5, "existence/2.jpg#1": 0.0,
                           "existence/3.jpg#0": 0.0, "existence/3.jpg#1": 0.5,
                           "artwork/images/10.jpg#0": 0.0, "artwork/images/10.jpg#1": 0.5}


def test_mme_reads_llava_answers_by_prompt(tmp_path):
    texts, expected = case_mme(str(tmp_path))
    rows = answer_rows("mme", str(tmp_path), texts)
    for r in rows:
        r["question_id"] = r["question_id"].split("#")[0]    # LLaVA: both questions share the id
    rows.reverse()
    assert bench("mme").score(str(tmp_path), rows) == expected
    rows[0] = dict(rows[0], prompt="Is there a unicorn?")
    with pytest.raises(InputError, match="names several questions and its prompt matches none"):
        bench("mme").score(str(tmp_path), rows)


# ---------------------------------------------------------------- MMBench
MMB = [  # index, options, answer, the model's answer per pass (passes rotate left)
    (0, ["cat", "dog", "cow"], "B", ["B", "The answer is A.", "dog"]),   # A. -> A; 'dog' = C: all right
    (1, ["x", "y"], "A", ["A", "A"]),                                    # 2nd pass wants B: group wrong
    (2, ["red", "blue", "green", "white"], "D",
     ["D", "A dog is in the picture", "B", "C"]),                        # 'A' in >3 words is an article: unread
    (3, ["yes", "no"], "A", ["(A)", "B"]),                               # (A) -> A; pass 2 wants B: right
    (4, ["up", "down"], "B", ["E", "A"]),                                # E is no option: wrong
]


def case_mmbench(root, circular=True):
    fx.write_mmbench(root, [{"index": i, "question": f"Which one {i}?", "hint": "A hint." if i == 1 else None,
                             "options": o, "answer": a} for i, o, a, _ in MMB], circular=circular)
    texts = {i + k * 1_000_000: t for i, _, _, ts in MMB for k, t in enumerate(ts)}
    # circular: groups 0 and 3 of 5; first pass: 0 1 2 3 right, 4 wrong
    return texts, {"circular_accuracy": 2 / 5, "accuracy": 4 / 5}


def test_mmbench_circular_needs_every_pass_right(tmp_path):
    texts, expected = case_mmbench(str(tmp_path))
    res = bench("mmbench").result(str(tmp_path), answer_rows("mmbench", str(tmp_path), texts))
    assert res.scores == expected and res.n == 13
    assert res.credits == {q: float(q % 1_000_000 in (0, 3)) for q in texts}


def test_mmbench_generated_rotations_equal_the_released_passes(tmp_path):
    case_mmbench(str(tmp_path / "a"))
    case_mmbench(str(tmp_path / "b"), circular=False)
    released = list(bench("mmbench").questions(str(tmp_path / "a")))
    generated = list(bench("mmbench").questions(str(tmp_path / "b")))
    assert sorted((q.question_id, q.prompt) for q in released) == \
        sorted((q.question_id, q.prompt) for q in generated)
    assert [q.question_id for q in generated][:4] == [0, 1_000_000, 2_000_000, 1]   # rounds in place
    b = bench("mmbench")
    gold_a = {it.qid: it.gold[0] for it in b.items(b.root(str(tmp_path / "a")), images=False)}
    gold_b = {it.qid: it.gold[0] for it in b.items(b.root(str(tmp_path / "b")), images=False)}
    assert gold_a == gold_b and gold_b[1_000_000] == "A" and gold_b[2_000_000] == "C"
    # LLaVA's --all-rounds answers: question_id = index, round_id = pass
    texts, expected = case_mmbench(str(tmp_path / "b"), circular=False)
    rows = answer_rows("mmbench", str(tmp_path / "b"), texts)
    for r in rows:
        r["round_id"], r["question_id"] = divmod(r["question_id"], 1_000_000)
    assert b.score(str(tmp_path / "b"), rows) == expected


def test_mmbench_prompt_and_matching_rules():
    from mllm.eval.benchmarks.mmbench import infer

    choices = {"A": "cat", "B": "dog", "C": "cow"}
    assert infer("B", choices) == "B" and infer("B.", choices) == "B" and infer("(C)", choices) == "C"
    assert infer("Answer: C", choices) == "C"          # bare C among words
    assert infer("A cow", choices) == "A"              # two words: 'A' is read as the letter
    assert infer("A cow is in the image", choices) == "C"   # >3 words: 'A' an article; text 'cow'
    assert infer("a dog or a cat", choices) is False   # two option texts: unreadable
    assert infer("B or C", choices) is False


# ---------------------------------------------------------------- SEED
def case_seed(root):
    Q = [(1, "Scene Understanding", "A", "A"),            # exact letter: right
         (2, "Scene Understanding", "B", "B."),           # 'B.' is not 'B': wrong
         (3, "Instance Identity", "C", "C"),              # right
         (4, "Instance Identity", "D", None),             # unanswered: wrong
         (5, "Instance Identity", "A", " A"),             # leading space: wrong
         (6, "Action Recognition", "A", "A")]             # video: not asked, not scored
    fx.write_seed(root, [{"question_id": q, "question": f"q{q}?", "choices": ["w", "x", "y", "z"],
                          "answer": a, "dimension": d,
                          "data_type": "video" if d == "Action Recognition" else "image"}
                         for q, d, a, _ in Q])
    return ({q: t for q, _, _, t in Q if t is not None and q != 6},
            {"accuracy": (1 + 1) / (2 + 3) * 100, "Scene Understanding": 1 / 2 * 100,
             "Instance Identity": 1 / 3 * 100})


def test_seed_image_questions_exact_letter(tmp_path):
    texts, expected = case_seed(str(tmp_path))
    b = bench("seed")
    assert [it.qid for it in b.items(b.root(str(tmp_path)))] == [1, 2, 3, 4, 5]
    res = bench("seed").result(str(tmp_path), answer_rows("seed", str(tmp_path), texts))
    assert res.scores == expected and res.n == 5
    assert res.credits == {1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 0.0}


# ---------------------------------------------------------------- VSR / Hateful Memes
def case_vsr(root):
    R = [("True", 1), ("It is not true", 0), ("untrue", 0), ("False.", 0), ("false", 1)]
    fx.write_vsr(root, [{"image": f"{k:012d}.jpg", "caption": f"The cat is left of thing {k}.", "label": l}
                        for k, (_, l) in enumerate(R)])
    # right when the label's word occurs: 'true' in 'true' (1), 'false' in 'false.' (4)
    return {k: t for k, (t, _) in enumerate(R)}, {"accuracy": 2 / 5 * 100}


def test_vsr_substring_rule(tmp_path):
    texts, expected = case_vsr(str(tmp_path))
    res = bench("vsr").result(str(tmp_path), answer_rows("vsr", str(tmp_path), texts))
    assert res.scores == expected and res.credits == {0: 1.0, 1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}


def case_hateful_memes(root):
    R = [(11, 1, "Yes"),            # 1: right                     score 1
         (12, 0, "I don't know"),   # 'no' in 'know': 0: right     score 0
         (13, 1, "no"),             # 0: wrong                     score 0
         (14, 0, "maybe"),          # unreadable: wrong            score 0.5
         (15, 1, "nothing yes")]    # 'yes' first: 1: right        score 1
    fx.write_hateful_memes(root, [{"id": i, "text": f"meme {i}", "label": l} for i, l, _ in R])
    # AUROC: positives (1, 0, 1) vs negatives (0, 0.5): pairs 1>0 1>.5 0=0 0<.5 1>0 1>.5
    return {i: t for i, _, t in R}, {"accuracy": 3 / 5 * 100, "auroc": (2 * 4 + 1) / (2 * 3 * 2)}


def test_hateful_memes_accuracy_and_auroc(tmp_path):
    texts, expected = case_hateful_memes(str(tmp_path))
    res = bench("hateful_memes").result(str(tmp_path), answer_rows("hateful_memes", str(tmp_path), texts))
    assert res.scores == expected and res.scores["auroc"] == 0.75
    assert res.credits == {11: 1.0, 12: 1.0, 13: 0.0, 14: 0.0, 15: 1.0}


CASES = {"pope": case_pope, "scienceqa": case_scienceqa, "gqa": case_gqa, "textvqa": case_textvqa,
         "vqav2": case_vqav2, "vizwiz": case_vizwiz, "mme": case_mme, "mmbench": case_mmbench,
         "seed": case_seed, "vsr": case_vsr, "hateful_memes": case_hateful_memes}


def test_every_benchmark_has_a_case_and_a_headline_in_its_scores(tmp_path):
    assert set(CASES) == set(REGISTRY)
    for name, case in CASES.items():
        root = str(tmp_path / name)
        texts, expected = case(root)
        res = bench(name).result(root, answer_rows(name, root, texts))
        value = scoring.headline(name, res.scores)
        assert isinstance(value, float), name
        credits = list(res.credits.values())
        assert credits and all(0.0 <= c <= 1.0 for c in credits), name
        if name in ("gqa", "textvqa", "vqav2", "vizwiz", "vsr", "seed", "scienceqa"):
            # accuracy-like headlines: the mean credit is the headline (x100 for percents)
            assert sum(credits) / len(credits) * 100 == pytest.approx(value), name
        # per_question agrees with result().credits
        assert bench(name).per_question(root, answer_rows(name, root, texts)) == res.credits
        json.dumps(res.scores)                                   # JSON-ready as is
