"""Differentiable rewards for DRaFT+: `build_reward("pickscore=1.0,aesthetic=0.05")` -> Reward.

Importing this package is cheap: model libraries (transformers, open_clip, ...) are imported
only inside the builders of the rewards that need them.

One job per module: `catalogue` (registered names -> classes, `--reward help`), `spec` (the
`--reward` grammar), `custom` (user rewards from files/modules), `options` (parsing and routing
`key=value`), `combine` (weighted sums), `build` (spec -> Reward); `base` is the contract,
`text_cache` the per-prompt cache, `loading`/`preprocess` the shared loading and pixel code.
"""

from .base import Reward
from .build import build_reward, validate_reward_spec
from .catalogue import list_rewards
from .combine import WeightedSumReward
from .errors import RewardError, RewardLoadError, RewardSpecError
from .loading import resolve_dtype
from .options import parse_reward_options
from .spec import parse_reward_spec

__all__ = [
    "Reward",
    "RewardError",
    "RewardLoadError",
    "RewardSpecError",
    "WeightedSumReward",
    "build_reward",
    "list_rewards",
    "parse_reward_options",
    "parse_reward_spec",
    "resolve_dtype",
    "validate_reward_spec",
]
