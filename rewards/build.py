"""Spec + options -> a frozen Reward (`build_reward`), or the same checks without loading (`validate_reward_spec`).

Both go through `resolve_parts`, which resolves every part and routes and checks every option
without loading any model weights, so the trainer can fail fast before it spends minutes loading SD.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import nn

from .base import Reward, accepted_options
from .catalogue import reward_class, unavailable
from .combine import WeightedSumReward
from .custom import FunctionReward, resolve_custom
from .errors import RewardSpecError
from .options import route_options
from .spec import SpecItem, parse_reward_spec


class Part(NamedTuple):
    """One part of a spec, resolved: its item, what builds it, and the options routed to it."""

    item: SpecItem
    factory: Any  # a Reward subclass, a Reward instance, or a function (images, prompts) -> Tensor[B]
    options: dict[str, Any]


def _factory_of(item: SpecItem) -> Any:
    if item.registered is None:
        return resolve_custom(item.target)
    factory = reward_class(item.registered)
    problem = unavailable(factory)
    if problem:
        raise RewardSpecError(problem)
    return factory


def resolve_parts(spec: str, options: dict[str, Any]) -> list[Part]:
    """Parse `spec`, resolve each part and route `options` to them; every option value a reward
    class can judge without loading (`Reward.check_options`) is checked. Raises RewardSpecError."""
    items = parse_reward_spec(spec)
    factories = [_factory_of(it) for it in items]
    parts = [Part(*p) for p in zip(items, factories, route_options(items, factories, options), strict=True)]
    for part in parts:
        if inspect.isclass(part.factory) and issubclass(part.factory, Reward):
            try:
                part.factory.check_options(**part.options)
            except (ValueError, TypeError) as exc:
                raise RewardSpecError(f"reward {part.item.label!r}: {exc}") from exc
    return parts


def validate_reward_spec(spec: str, **options: Any) -> None:
    """Check a spec (names, weights, custom targets), option names and the option values that can
    be judged without loading any weights."""
    resolve_parts(spec, options)


def _build_part(part: Part, device: Any, dtype: Any) -> Reward:
    item, factory = part.item, part.factory
    if isinstance(factory, Reward):
        reward = factory
    elif inspect.isclass(factory) and issubclass(factory, Reward):
        names, var_kw = accepted_options(factory)
        kwargs = dict(part.options)
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
    parts = [(p.item.label, p.item.weight, _build_part(p, device, dtype)) for p in resolve_parts(spec, options)]
    if len(parts) == 1 and parts[0][1] == 1.0:
        reward = parts[0][2]
    else:
        reward = WeightedSumReward(parts).freeze()
    reward.spec = spec  # type: ignore[attr-defined]  # for logs / model cards
    return reward



def _mean_colour(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.float().mean((1, 2, 3))


def build_reward_from_architectures(
    spec: str, dtype: torch.dtype | None = None, **options: Any
) -> tuple[Reward, list[str]]:
    """The reward a spec describes with every model-backed part built from its published architecture
    (`Reward.architecture`, `Reward.from_architecture`: no weights or files read), for a memory estimate that
    runs it under fake tensors; model-free parts built as `build_reward` builds them. Returns the reward and a
    line for each part it could not build so (that part's memory is then counted in part, or not at all)."""
    built, notes = [], []
    for part in resolve_parts(spec, options):
        factory, label = part.factory, part.item.label
        is_class = inspect.isclass(factory) and issubclass(factory, Reward)
        config = factory.architecture(**part.options) if is_class else None
        reward: Reward
        if config is not None:
            try:
                reward = factory.from_architecture(config, dtype=dtype, **part.options)
            except NotImplementedError:
                from transformers import AutoModel

                reward = FunctionReward(_mean_colour, name=label)
                reward.network = AutoModel.from_config(config, dtype=dtype)  # its weights, counted
                notes.append(f"reward {label!r}: its weights from its architecture; its activations not traced")
        elif is_class and not factory.file_options:  # model-free: nothing to load
            reward = _build_part(part, None, dtype)
        else:
            reward = FunctionReward(_mean_colour, name=label)
            notes.append(f"reward {label!r}: no architecture known; its weights and activations are not counted")
        reward.name = label
        built.append((label, part.item.weight, reward.freeze()))
    if len(built) == 1 and built[0][1] == 1.0:
        return built[0][2], notes
    return WeightedSumReward(built).freeze(), notes
