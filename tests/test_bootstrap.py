"""The ablation's statistics on hand-made credits: the paired bootstrap interval, the
rows `compare` builds, and the page."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mllm.eval import ablation


def test_constant_difference_has_a_point_interval():
    a = np.array([1.0, 0.5, 0.0, 1.0])
    d, lo, hi = ablation.paired_bootstrap(a, a - 0.25, n_boot=300, seed=1)
    assert (d, lo, hi) == pytest.approx((0.25, 0.25, 0.25))


def test_interval_matches_the_normal_approximation():
    # 60 of 100 questions right against 0: mean 0.6, standard error sqrt(.24/100) = 0.049
    a = np.array([1.0] * 60 + [0.0] * 40)
    d, lo, hi = ablation.paired_bootstrap(a, np.zeros(100), n_boot=4000, seed=0)
    assert d == 0.6
    assert lo == pytest.approx(0.6 - 1.96 * 0.049, abs=0.015)
    assert hi == pytest.approx(0.6 + 1.96 * 0.049, abs=0.015)


def test_pairing_narrows_the_interval():
    """Arms that agree on most questions: the paired interval is far narrower than the
    spread of either arm (an unpaired bootstrap would be ~0.1 wide here)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 400).astype(float)
    other = base.copy()
    other[:8] = 1 - other[:8]            # the arms differ on 8 of 400 questions
    d, lo, hi = ablation.paired_bootstrap(other, base, n_boot=2000, seed=0)
    assert d == pytest.approx((other - base).mean())
    assert hi - lo < 0.03


def test_same_seed_same_interval_and_no_questions_is_an_error():
    a, b = np.array([1, 0, 1, 1, 0.0]), np.array([0, 0, 1, 0, 1.0])
    assert ablation.paired_bootstrap(a, b, 500, 7) == ablation.paired_bootstrap(a, b, 500, 7)
    with pytest.raises(ValueError, match="no paired questions"):
        ablation.paired_bootstrap(np.zeros(0), np.zeros(0))


def test_compare_pairs_by_question_id_and_scales_to_points():
    arms = {
        "coreset": {"size": 10, "selection": {"select": {}},
                    "benchmarks": {"b": {"credits": {"q1": 1.0, "q2": 1.0, "q3": 0.0, "extra": 1.0},
                                         "headline": ("acc", 66.0)}}},
        "random": {"size": 10, "selection": {"random": True},
                   "benchmarks": {"b": {"credits": {"q3": 0.0, "q2": 0.0, "q1": 1.0},
                                        "headline": ("acc", 33.0)}}},
    }
    rows = {r["arm"]: r for r in ablation.compare(arms, "random", n_boot=500, seed=0)}
    c = rows["coreset"]
    assert c["n"] == 3                               # q1..q3: the baseline's questions
    assert c["credit"] == pytest.approx(100 * 2 / 3)
    assert c["diff"] == pytest.approx(100 / 3)        # differences 0, 1, 0
    assert c["score"] == 66.0 and c["score_diff"] == 33.0 and c["key"] == "acc"
    assert 0.0 <= c["ci_low"] <= c["diff"] <= c["ci_high"] <= 100.0
    assert (rows["random"]["diff"], rows["random"]["ci_low"], rows["random"]["ci_high"]) == (0, 0, 0)
    page = ablation.render_html(list(rows.values()), {"size": 10})
    assert page.count("<svg") == 1 and ("no clear difference" in page or "better" in page)
    assert all(math.isfinite(r[k]) for r in rows.values() for k in ("diff", "ci_low", "ci_high"))
