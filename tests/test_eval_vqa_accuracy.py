"""VQA accuracy (TextVQA, VQAv2, VizWiz) as m4c_evaluator.py: the EvalAI normalisation and
min(#other humans / 3, 1) averaged over the 10 leave-one-out subsets, worked by hand."""
from __future__ import annotations

import pytest

from mllm.eval.benchmarks.vqa_accuracy import credit, mean, normalize


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),                  # number word -> digit; final period goes
    ("The Cat", "cat"),                       # lower case; article dropped
    ("an apple", "apple"),
    ("3.5", "3.5"),                           # a period before a digit stays
    ("dont", "don't"),                        # contraction restored
    ("don't", "don't"),                       # apostrophes are not punctuation here
    ("yes!", "yes"),                          # '!' inside the text -> space
    ("black-and-white", "black and white"),   # '-' inside a word -> space
    ("a - b", "b"),                           # spaced '-' removed; 'a' is an article
    ("man's hat", "man 's hat"),              # "'s" split off
    ("one, two", "1 2"),                      # ',' removed before anything else
    ("none", "0"),
    ("ten", "10"),
    ("what?", "what"),
    ("New\tYork\n", "new york"),
    ("(left)", "left"),
    ("x." * 40, "x" * 32 + "x." * 8),         # the period rule stops after 32 (re.UNICODE as count)
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_leave_one_out_credit_by_hand():
    humans = ["two", "two", "two"] + ["three"] * 7
    # '2' matches the 3 'two's: leaving one of them out leaves 2 (2/3); leaving a 'three'
    # out leaves 3 (min(3/3, 1) = 1).  Summed in the humans' order, then / 10.
    assert credit("2", humans) == (2 / 3 + 2 / 3 + 2 / 3 + 1 + 1 + 1 + 1 + 1 + 1 + 1) / 10
    assert credit("2", humans) == pytest.approx(0.9)
    assert credit("Three", humans) == 1.0                     # 7 agree: always >= 3 others
    one = ["dog"] + ["cat"] * 9
    # the one "dog" left out: 0 others; a "cat" left out: the one "dog" (1/3)
    assert credit("a dog", one) == (0 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3) / 10
    assert credit("a dog", one) == pytest.approx(0.3)
    two = ["dog", "dog"] + ["cat"] * 8
    assert credit("dog", two) == pytest.approx((1 / 3 * 2 + 2 / 3 * 8) / 10)    # 0.6
    four = ["dog"] * 4 + ["cat"] * 6
    assert credit("dog", four) == 1.0                         # 3 others agree even leaving one out
    assert credit("horse", four) == 0.0


def test_mean_sums_left_to_right():
    values = [0.1] * 10
    total = 0
    for v in values:
        total += v
    assert mean(values) == total / 10 and total != 1.0        # naive sum, as Python <= 3.11's sum()
