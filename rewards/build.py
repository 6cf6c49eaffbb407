"""Spec + options -> a frozen Reward (`build_reward`), or the same checks without loading (`validate_reward_spec`).

`validate_reward_spec` resolves every part and routes every option without loading any model
weights, so the trainer can fail fast before it spends minutes loading SD.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .base import Reward
from .catalogue import reward_class, unavailable
from .combine import WeightedSumReward
from .custom import FunctionReward, resolve_custom
from .errors import RewardSpecError
from .options import accepted_options, route_options
from .spec import SpecItem, parse_reward_spec


def _factory_of(item: SpecItem) -> Any:
    if item.registered is None:
        return resolve_custom(item.target)
    factory = reward_class(item.registered)
    problem = unavailable(factory)
    if problem:
        raise RewardSpecError(problem)
    return factory


def validate_reward_spec(spec: str, **options: Any) -> None:
    """Check a spec (names, weights, custom targets) and option names without loading any weights."""
    items = parse_reward_spec(spec)
    route_options(items, [_factory_of(it) for it in items], options)


def _build_part(item: SpecItem, factory: Any, opts: dict[str, Any], device: Any, dtype: Any) -> Reward:
    if isinstance(factory, Reward):
        reward = factory
    elif inspect.isclass(factory) and issubclass(factory, Reward):
        names, var_kw = accepted_options(factory)
        kwargs = dict(opts)
        # Model-backed rewards load straight onto the device/dtype if they can; others are moved.
        if dtype is not None and ("dtype" in names or var_kw):
            kwargs.setdefault("dtype", dtype)
        if device is not None and ("device" in names or var_kw):
            kwargs.setdefault("device", device)
        try:
            reward = factory(**kwargs)
        except (ValueError, TypeError) as exc:
            raise RewardSpecError(f"reward {item.label!r}: {exc}") from exc
    elif isinstance(factory, nn.Module) or callable(factory):
        reward = FunctionReward(factory, name=item.label)
    else:  # pragma: no cover - resolve_custom already rejects these
        raise RewardSpecError(f"reward {item.label!r} is not a Reward or a function")
    if device is not None:
        reward = reward.to(device)
    reward.name = item.label
    return reward.freeze()


def build_reward(
    spec: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> Reward:
    """Build the Reward a spec describes (frozen, eval mode); see `rewards.spec` for the grammar.

    `dtype` is the compute dtype of model-backed rewards (fp32 by default); model-free rewards
    always compute in fp32. Scores are float32 `[B]`.
    """
    items = parse_reward_spec(spec)
    factories = [_factory_of(it) for it in items]
    per_part = route_options(items, factories, options)
    parts = [
        (it.label, it.weight, _build_part(it, f, o, device, dtype))
        for it, f, o in zip(items, factories, per_part, strict=True)
    ]
    if len(parts) == 1 and parts[0][1] == 1.0:
        reward = parts[0][2]
    else:
        reward = WeightedSumReward(parts).freeze()
    reward.spec = spec  # type: ignore[attr-defined]  # for logs / model cards
    return reward
