"""Which model files a spec would load: `model_references(spec, options)`, answered without loading any.

The trainer checks them before it loads anything (a missing local path, or a hub id that an offline
run has not cached), so it needs no knowledge of how a spec is parsed or its options routed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

from .base import Reward, option_defaults
from .build import resolve_parts


class ModelReference(NamedTuple):
    """One file option of one part: `label`'s `key` (e.g. "model", "head") is `value`, given or default."""

    label: str  # the part's spec label, as in "label.key=value" options
    key: str
    value: str  # a local path, a hub repo id, or owner/repo:filename (see `rewards.files`)


def model_references(spec: str, options: Mapping[str, Any] | None = None) -> list[ModelReference]:
    """The weight files each part of `spec` would load, given `options` (as `build_reward` routes them).

    Lists every option a part's class names in `Reward.file_options` (the model-backed rewards:
    `model`, and `head` for aesthetic) whose value, given or default, is a string; model-free and
    function rewards have none. Processors and tokenizers follow the model and are not listed.
    Raises RewardSpecError as `validate_reward_spec` does.
    """
    references: list[ModelReference] = []
    for part in resolve_parts(spec, dict(options or {})):
        cls = part.factory
        if not (inspect.isclass(cls) and issubclass(cls, Reward)):
            continue
        values = {**option_defaults(cls), **part.options}
        references += [
            ModelReference(part.item.label, key, values[key])
            for key in cls.file_options
            if isinstance(values.get(key), str)
        ]
    return references
