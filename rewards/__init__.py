"""Differentiable rewards for DRaFT+: `build_reward("pickscore=1.0,aesthetic=0.05")` -> Reward.

Importing this package is cheap: model libraries (transformers, open_clip, ...) are imported
only inside the builders of the rewards that need them.
"""

from .base import Reward
from .loading import RewardLoadError
from .registry import (
    RewardSpecError,
    WeightedSumReward,
    build_reward,
    list_rewards,
    parse_reward_options,
    parse_reward_spec,
    validate_reward_spec,
)

__all__ = [
    "Reward",
    "RewardLoadError",
    "RewardSpecError",
    "WeightedSumReward",
    "build_reward",
    "list_rewards",
    "parse_reward_options",
    "parse_reward_spec",
    "validate_reward_spec",
]
