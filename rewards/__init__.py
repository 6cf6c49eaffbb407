"""Differentiable rewards for DRaFT+: `build_reward("pickscore=1.0,aesthetic=0.05")` -> Reward.

Importing this package is cheap: each public name below is imported from its module on first use
(so `rewards.RewardError` or `rewards.looks_like_path` cost no torch import), and model libraries
(transformers, open_clip, ...) only inside the builders of the rewards that need them.

One job per module: `catalogue` (registered names -> classes, `--reward help`), `spec` (the
`--reward` grammar), `custom` (user rewards from files/modules), `options` (parsing and routing
`key=value`), `build` (spec -> Reward, and the checks without loading), `references` (the model
files a spec would load), `combine` (weighted sums); `base` is the contract, `errors` its errors,
`text_cache` the per-prompt cache, `files` where weights are (local or hub), `loading` reading
them, `preprocess` the differentiable image processors, `mlp_head` the linear head two rewards share.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> "module:attribute", imported on first access (PEP 562).
_PUBLIC = {
    "ModelReference": "rewards.references:ModelReference",
    "Reward": "rewards.base:Reward",
    "RewardError": "rewards.errors:RewardError",
    "RewardLoadError": "rewards.errors:RewardLoadError",
    "RewardSpecError": "rewards.errors:RewardSpecError",
    "WeightedSumReward": "rewards.combine:WeightedSumReward",
    "build_reward": "rewards.build:build_reward",
    "build_reward_from_architectures": "rewards.build:build_reward_from_architectures",
    "list_rewards": "rewards.catalogue:list_rewards",
    "looks_like_path": "rewards.files:looks_like_path",
    "model_references": "rewards.references:model_references",
    "parse_reward_options": "rewards.options:parse_reward_options",
    "parse_reward_spec": "rewards.spec:parse_reward_spec",
    "resolve_dtype": "rewards.loading:resolve_dtype",
    "validate_reward_spec": "rewards.build:validate_reward_spec",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attribute = _PUBLIC[name].partition(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
