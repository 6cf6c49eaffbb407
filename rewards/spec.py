"""The `--reward` spec grammar: text -> items (registered names resolved, weights parsed).

    spec   := item ("," item)*
    item   := target ["=" weight]          weight: a float, default 1.0
    target := NAME                          a registered reward (see `list_rewards()`)
            | path/to/file.py:ATTR          a Reward subclass or a function (images, prompts) -> Tensor[B]
            | package.module:ATTR           the same, imported from an installed/importable module

Parsing imports nothing: custom targets are only split here and resolved by `rewards.custom`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .catalogue import available, canonical_name
from .errors import RewardSpecError


@dataclass(frozen=True)
class SpecItem:
    """One `target[=weight]` item of a spec."""

    label: str  # registered name, or ATTR of a custom reward: what "label.key" options refer to
    weight: float
    target: str  # the text before "=weight"
    registered: str | None  # the registered name; None for a custom reward


def is_custom(target: str) -> bool:
    return ":" in target


def _parse_item(raw: str) -> SpecItem:
    target, weight = raw, 1.0
    head, sep, tail = raw.rpartition("=")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            raise RewardSpecError(
                f"bad weight {tail.strip()!r} in reward spec item {raw!r}: expected name=float"
            ) from None
        if not math.isfinite(weight):
            raise RewardSpecError(f"weight in reward spec item {raw!r} must be finite")
        target = head.strip()
    if not target:
        raise RewardSpecError(f"missing reward name in spec item {raw!r}")
    if is_custom(target):
        path, _, attr = target.rpartition(":")
        if not path or not attr:
            raise RewardSpecError(
                f"bad custom reward {target!r}: expected path/to/file.py:name or package.module:name"
            )
        return SpecItem(label=attr, weight=weight, target=target, registered=None)
    name = canonical_name(target)
    return SpecItem(label=name, weight=weight, target=target, registered=name)


def parse_reward_spec(spec: str) -> list[SpecItem]:
    """Split a spec into items (names resolved, weights parsed); raises RewardSpecError."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"empty reward spec {spec!r}; available: {available()}")
    items: list[SpecItem] = []
    for raw in spec.split(","):
        raw = raw.strip()
        if not raw:
            raise RewardSpecError(f"empty item in reward spec {spec!r} (stray comma?)")
        items.append(_parse_item(raw))
    labels = [it.label.lower() for it in items]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise RewardSpecError(
            f"reward {dupes[0]!r} appears twice in spec {spec!r}; give it one weight (weights add up anyway)"
        )
    return items
