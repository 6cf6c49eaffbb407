"""Paired statistics for the reward-diversity trade-off: claims that can come out False.

Every model is evaluated on the same prompts and the same initial noise (seeds), so differences between
two models are taken image by image (rewards) and prompt by prompt (diversities), and their standard
errors are those of the paired differences, which are far smaller than the between-prompt spread.

A `Point` is one evaluated model: its per-image rewards `[prompts, seeds]` and per-prompt diversities
`[prompts]`. A claim about a difference counts only where it exceeds `Z` standard errors; an unmoved model
(whose reward gain over the base is within noise) never counts as evidence for anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Z = 2.0  # a difference counts when |mean| > Z * SE


@dataclass
class Point:
    label: str
    rewards: np.ndarray  # [P, S] per-image rewards, paired across models by (prompt, seed)
    diversities: np.ndarray  # [P] per-prompt diversity, paired across models by prompt
    meta: dict = field(default_factory=dict)

    @property
    def reward(self) -> float:
        return float(self.rewards.mean())

    @property
    def diversity(self) -> float:
        return float(self.diversities.mean())


@dataclass(frozen=True)
class Difference:
    """mean(a - b) over paired units, its standard error, and the verdict at Z standard errors."""

    mean: float
    se: float
    n: int

    @property
    def verdict(self) -> int:
        """+1: a > b, -1: a < b, 0: not resolved."""
        if self.mean > Z * self.se:
            return 1
        if self.mean < -Z * self.se:
            return -1
        return 0

    @property
    def z(self) -> float:
        return self.mean / self.se if self.se > 0 else float("inf") * np.sign(self.mean)

    def as_dict(self) -> dict:
        return {"mean": self.mean, "se": self.se, "n": self.n, "z": self.z, "verdict": self.verdict}


def paired(a: np.ndarray, b: np.ndarray) -> Difference:
    d = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).ravel()
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("inf")
    return Difference(float(d.mean()), se, int(d.size))


def reward_gain(point: Point, base: Point) -> Difference:
    return paired(point.rewards, base.rewards)


def diversity_change(point: Point, base: Point) -> Difference:
    return paired(point.diversities, base.diversities)


def moved(point: Point, base: Point) -> bool:
    """The model's reward differs from the base's beyond noise: only then can it be evidence."""
    return reward_gain(point, base).verdict == 1


def mix(a: Point, b: Point, w: float, label: str | None = None) -> Point:
    """The point a fraction w of the way from a to b (per image and per prompt)."""
    return Point(label or f"{a.label}..{b.label}@{w:.2f}", (1 - w) * a.rewards + w * b.rewards,
                 (1 - w) * a.diversities + w * b.diversities, {"between": (a.label, b.label), "w": w})


def at_reward(curve: Sequence[Point], reward: float) -> Point | None:
    """The curve (points ordered along it) linearly interpolated where its mean reward first equals `reward`;
    None where no segment between two of its points spans that reward (no extrapolation)."""
    for a, b in zip(curve, curve[1:]):
        lo, hi = sorted((a.reward, b.reward))
        if lo <= reward <= hi and hi > lo:
            return mix(a, b, (reward - a.reward) / (b.reward - a.reward))
    for p in curve:
        if p.reward == reward:
            return p
    return None


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both mean reward and mean diversity, by increasing reward."""
    front = [p for p in points
             if not any(q.reward >= p.reward and q.diversity >= p.diversity
                        and (q.reward > p.reward or q.diversity > p.diversity) for q in points)]
    return sorted(front, key=lambda p: p.reward)


def compare_fronts(candidate: Sequence[Point], reference: Sequence[Point], base: Point) -> list[dict]:
    """Diversity of the `candidate` front against the `reference` front at the candidate's rewards.

    Only candidate points that moved (significant reward gain over the base) are compared, and only at
    rewards that the reference front spans between two of its own points that moved too: neither an
    unmoved model nor the base model's position counts as having "reached" a reward.
    """
    ref = [p for p in pareto_front(reference) if moved(p, base)]
    rows = []
    for p in pareto_front(candidate):
        row = {"label": p.label, "reward": p.reward, "diversity": p.diversity, "meta": p.meta,
               "reward_gain": reward_gain(p, base).as_dict()}
        if not moved(p, base):
            rows.append({**row, "status": "unmoved (reward gain within noise): no evidence"})
            continue
        matched = at_reward(ref, p.reward)
        if matched is None:
            rows.append({**row, "status": "outside the reference's range: no comparison"})
            continue
        diff = paired(p.diversities, matched.diversities)
        rows.append({**row, "status": "compared", "reference_diversity": matched.diversity,
                     "diversity_difference": diff.as_dict(),
                     "verdict": {1: "more", -1: "less", 0: "tie"}[diff.verdict]})
    return rows


def claim_from(rows: Sequence[dict]) -> dict:
    """'more' holds only with at least one significant 'more' and no significant 'less'."""
    compared = [r for r in rows if r["status"] == "compared"]
    more = sum(r["verdict"] == "more" for r in compared)
    less = sum(r["verdict"] == "less" for r in compared)
    if not compared:
        holds: bool | None = None
    else:
        holds = more > 0 and less == 0
    return {"compared": len(compared), "more": more, "less": less, "ties": len(compared) - more - less,
            "holds": holds}


def ordering(points: Sequence[Point], key: str) -> list[dict]:
    """Paired differences between neighbours of `points` (already ordered, e.g. by increasing kl_coeff) in
    `key` ('reward' per image, 'diversity' per prompt): a[i] - a[i+1] with its verdict."""
    rows = []
    for a, b in zip(points, points[1:]):
        diff = (paired(a.rewards, b.rewards) if key == "reward" else paired(a.diversities, b.diversities))
        rows.append({"a": a.label, "b": b.label, **diff.as_dict()})
    return rows


def series_at_rewards(series: dict[str, Sequence[Point]], levels: Sequence[float]) -> list[dict]:
    """Which control keeps the most diversity at each matched reward level: every series interpolated at the
    level, the best one named only where it beats each other series by more than Z paired SEs."""
    rows = []
    for level in levels:
        at = {name: at_reward(curve, level) for name, curve in series.items()}
        present = {name: p for name, p in at.items() if p is not None}
        row: dict = {"reward": level, "diversity": {name: p.diversity for name, p in present.items()}}
        if len(present) >= 2:
            leader = max(present, key=lambda name: present[name].diversity)
            diffs = {name: paired(present[leader].diversities, p.diversities).as_dict()
                     for name, p in present.items() if name != leader}
            row.update(leader=leader, leader_vs=diffs,
                       best=leader if all(d["verdict"] == 1 for d in diffs.values()) else None)
        rows.append(row)
    return rows
