"""Reward options: parse `key=value` strings and route them to the parts of a spec.

`key=value` goes to the single reward, or to every part of a weighted sum that accepts `key`;
`"part.key"=value` goes only to that part (`part` is the registered name, or ATTR for a custom
reward). What a reward accepts is read from its `__init__` signature (`base.accepted_options`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .base import accepted_options
from .catalogue import ALIASES
from .errors import RewardSpecError
from .spec import SpecItem

# Options that any reward may be handed by the trainer; parts that do not take them ignore them
# (a model-free reward has nothing to checkpoint). Every other unknown option is an error.
GENERIC_OPTIONS = frozenset({"gradient_checkpointing", "cache_size"})


def route_options(
    items: Sequence[SpecItem], factories: Sequence[Any], options: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per-part keyword arguments; raise RewardSpecError for options no part can take."""
    accepted = [accepted_options(f) for f in factories]
    per_part: list[dict[str, Any]] = [{} for _ in items]
    # Unqualified first, so that "part.key" overrides "key" for that part.
    for key, value in sorted(options.items(), key=lambda kv: "." in kv[0]):
        if "." in key:
            prefix, sub = key.rsplit(".", 1)
            prefix_l = ALIASES.get(prefix.lower(), prefix.lower())
            idx = [i for i, it in enumerate(items) if prefix_l in (it.label.lower(), it.target.lower())]
            if not idx:
                raise RewardSpecError(
                    f"option {key!r} names no part of the reward spec (parts: {', '.join(it.label for it in items)})"
                )
            i = idx[0]
            names, var_kw = accepted[i]
            if sub not in names and not var_kw:
                raise RewardSpecError(
                    f"reward {items[i].label!r} takes no option {sub!r}; it takes: {', '.join(sorted(names)) or 'none'}"
                )
            per_part[i][sub] = value
            continue
        takers = [i for i, (names, var_kw) in enumerate(accepted) if key in names or var_kw]
        if not takers:
            if key in GENERIC_OPTIONS:
                continue
            takes = "; ".join(
                f"{it.label}: {', '.join(sorted(a[0])) or 'none'}"
                for it, a in zip(items, accepted, strict=True)
            )
            raise RewardSpecError(f"no reward in the spec takes option {key!r} (options: {takes})")
        for i in takers:
            per_part[i][key] = value
    return per_part


def parse_reward_options(pairs: Iterable[str]) -> dict[str, Any]:
    """`["pickscore.model=/dir", "gradient_checkpointing=true"]` -> dict with bool/int/float/None coerced."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RewardSpecError(f"bad reward option {pair!r}: expected key=value")
        out[key.strip()] = _coerce(value.strip())
    return out


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
