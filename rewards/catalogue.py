"""The catalogue of registered rewards: name -> class (imported lazily), aliases, and `--reward help`.

Only *where* each reward lives is written here. What it scores, its range and its options live on
the class itself (`Reward.description`, `Reward.score_range`, the `__init__` signature), so the
help text is read from the code that computes the score. Reward modules import only torch at
module level (model libraries are imported inside `__init__`), so reading the classes is cheap.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from .base import option_defaults
from .errors import RewardSpecError

#: Registered name -> "module:Class". Each class's `name` attribute equals its key.
REWARDS: dict[str, str] = {
    "pickscore": "rewards.pickscore:PickScoreReward",
    "hpsv2": "rewards.hpsv2:HPSv2Reward",
    "aesthetic": "rewards.aesthetic:AestheticReward",
    "clip": "rewards.clip_score:ClipScoreReward",
    "imagereward": "rewards.imagereward:ImageRewardReward",
    "hpsv3": "rewards.hpsv3:HPSv3Reward",
    "brightness": "rewards.simple:BrightnessReward",
    "saturation": "rewards.simple:SaturationReward",
    "colorfulness": "rewards.simple:ColorfulnessReward",
    "compressibility": "rewards.simple:CompressibilityReward",
    "color": "rewards.simple:ColorReward",
    "redness": "rewards.simple:RednessReward",
}

#: Alternative spellings users type; they resolve to a registered name.
ALIASES: dict[str, str] = {
    "hps": "hpsv2",
    "hpsv2.1": "hpsv2",
    "image_reward": "imagereward",
    "hps_v3": "hpsv3",
    "clipscore": "clip",
    "clip_score": "clip",
    "laion_aesthetic": "aesthetic",
    "colourfulness": "colorfulness",
    "colour": "color",
}

# Options every model-backed reward shares; `--reward help` explains them once instead of per line.
_MEMORY_OPTIONS = frozenset({"dtype", "device", "gradient_checkpointing", "cache_size"})


def available() -> str:
    return ", ".join(sorted(REWARDS))


def canonical_name(name: str) -> str:
    """The registered name for `name` (case and aliases folded); RewardSpecError if there is none."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in REWARDS:
        return key
    close = difflib.get_close_matches(key, list(REWARDS) + list(ALIASES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise RewardSpecError(
        f"unknown reward {name!r}{hint}; available: {available()}; "
        "or a custom reward path/to/file.py:name or package.module:name"
    )


def reward_class(name: str) -> Any:
    """The class registered as `name` (a registered name, not an alias)."""
    module_name, _, attr = REWARDS[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def unavailable(factory: Any) -> str | None:
    """Why `factory` cannot be built here, if its class says so cheaply (`availability()`); else None."""
    check = getattr(factory, "availability", None)
    return check() if callable(check) else None


def list_rewards() -> str:
    """Human-readable list of registered rewards, one line each (what `--reward help` prints)."""
    width = max(len(n) for n in REWARDS)
    lines = ["Rewards (spec: name | name=w,name=w,... | path/to/file.py:name | package.module:name):"]
    for name in REWARDS:
        cls = reward_class(name)
        text = f"  {name:<{width}}  {cls.description}"
        if cls.score_range:
            text += f"; range {cls.score_range}"
        defaults = {k: v for k, v in option_defaults(cls).items() if k not in _MEMORY_OPTIONS}
        if defaults:
            text += "  [" + " ".join(f"{k}={v}" for k, v in defaults.items()) + "]"
        if unavailable(cls):
            text += "  (unavailable in this environment)"
        lines.append(text)
    lines.append(
        "Options: key=value for all parts that take it, part.key=value for one part of a sum "
        "(e.g. pickscore.model=/local/dir); model-backed rewards also take dtype, "
        "gradient_checkpointing and cache_size."
    )
    return "\n".join(lines)
