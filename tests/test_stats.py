"""The trade-off checks on synthetic fixtures: an unmoved model is no evidence, a collapsed one counts against."""

import numpy as np
import pytest

from benchmarks.stats import (
    Point,
    at_reward,
    claim_from,
    compare_fronts,
    ordering,
    paired,
    pareto_front,
    series_at_rewards,
)

P, S = 40, 6
RNG = np.random.default_rng(0)
BASE_R = RNG.normal(0.13, 0.2, (P, S))  # per-image rewards vary a lot between prompts and seeds ...
BASE_D = RNG.uniform(0.05, 0.15, P)  # ... and per-prompt diversities between prompts


def model(label, reward_shift, diversity_scale, noise=0.01, seed=1, **meta):
    """A model whose images are the base's shifted in reward and shrunk in diversity, plus paired noise."""
    rng = np.random.default_rng(seed)
    return Point(label, BASE_R + reward_shift + rng.normal(0, noise, (P, S)),
                 BASE_D * diversity_scale + rng.normal(0, noise / 10, P), meta)


BASE = Point("base", BASE_R, BASE_D)
# DRaFT: reward rises fast, diversity collapses along the way
DRAFT = [model(f"draft@{k}", 0.05 * k, 1 - 0.15 * k, seed=10 + k) for k in range(1, 6)]


def test_paired_se_is_the_se_of_the_differences_not_of_the_spread():
    a = model("a", 0.01, 1.0, noise=0.001)
    diff = paired(a.rewards, BASE.rewards)
    assert diff.mean == pytest.approx(0.01, abs=1e-3) and diff.verdict == 1
    unpaired_se = BASE_R.std() / np.sqrt(BASE_R.size)
    assert diff.se < unpaired_se / 50  # the reason the benchmark pairs seeds


def test_an_unmoved_model_is_not_evidence():
    """An identity LoRA, a hair above the base, must not 'keep more diversity than DRaFT'."""
    identity = model("identity", 0.0005, 1.0, noise=0.01, seed=3)
    rows = compare_fronts([identity], DRAFT, BASE)
    assert rows[0]["status"].startswith("unmoved")
    assert claim_from(rows)["holds"] is None


def test_a_collapsed_model_counts_against():
    mid = DRAFT[1].reward  # 2nd DRaFT checkpoint's reward, diversity 0.7x base there
    collapsed = model("collapsed", mid - BASE.reward, 0.3, seed=4)
    rows = compare_fronts([collapsed], DRAFT, BASE)
    assert rows[0]["status"] == "compared" and rows[0]["verdict"] == "less"
    assert claim_from(rows)["holds"] is False


def test_a_model_that_keeps_diversity_at_matched_reward_counts_for():
    keeper = model("keeper", DRAFT[2].reward - BASE.reward, 0.95, seed=5)
    rows = compare_fronts([keeper], DRAFT, BASE)
    assert rows[0]["verdict"] == "more" and claim_from(rows) == {"compared": 1, "more": 1, "less": 0,
                                                                 "ties": 0, "holds": True}


def test_rewards_below_the_references_first_moved_point_are_not_compared():
    """DRaFT's segment from the base to its first checkpoint is not a reward DRaFT 'reached'."""
    small = model("small", 0.02, 0.99, seed=6)  # moved (0.02 >> SE) but below DRaFT's first checkpoint (0.05)
    rows = compare_fronts([small], DRAFT, BASE)
    assert rows[0]["status"].startswith("outside") and claim_from(rows)["holds"] is None


def test_interpolation_and_front():
    a, b = DRAFT[0], DRAFT[1]
    halfway = at_reward([a, b], (a.reward + b.reward) / 2)
    assert halfway.diversity == pytest.approx((a.diversity + b.diversity) / 2)
    assert at_reward([a, b], b.reward + 1.0) is None  # no extrapolation
    dominated = model("dominated", 0.05, 0.5, seed=7)  # same reward as DRAFT[0], less diversity
    assert [p.label for p in pareto_front([*DRAFT, dominated])] == [p.label for p in DRAFT]


def test_ordering_resolves_real_gaps_and_not_noise():
    rows = ordering([DRAFT[3], DRAFT[2], model("twin", 0.15 + 1e-4, 0.55, seed=8)], "reward")
    assert rows[0]["verdict"] == 1  # 0.05 apart: resolved
    assert rows[1]["verdict"] == 0  # 1e-4 apart: within noise


def test_series_comparison_names_a_leader_only_when_significant():
    top = DRAFT[-1]
    good = [BASE, model("g1", 0.1, 0.9, seed=20), model("g2", 0.2, 0.8, seed=21), top]
    bad = [BASE, model("b1", 0.1, 0.6, seed=22), model("b2", 0.2, 0.4, seed=23), top]
    twin = [BASE, model("t1", 0.1, 0.9 + 1e-4, seed=24), model("t2", 0.2, 0.8, seed=25), top]
    level = BASE.reward + 0.15
    (row,) = series_at_rewards({"good": good, "bad": bad}, [level])
    assert row["best"] == "good"
    (row,) = series_at_rewards({"good": good, "twin": twin}, [level])
    assert row["best"] is None  # the same curve twice: no winner
