"""Per-prompt caching for rewards that encode the prompt: DRaFT+ reuses a few prompts for thousands of steps.

`PromptCache` is a small LRU dict prompt -> tensor; `TextCachedReward` is the base of every reward
that keeps one, which is every model-backed reward (CLIP family, HPSv2, ImageReward): it owns the
cache, the device the cached tensors must live on, the rule that moving the module drops them, and
the check of the `dtype` option they all take.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Reward
from .loading import resolve_dtype


class PromptCache:
    """LRU dict prompt -> tensor (an embedding, or token ids); `max_size <= 0` disables it."""

    def __init__(self, max_size: int = 1024) -> None:
        self.max_size = int(max_size)
        self._data: OrderedDict[str, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()

    def get_many(
        self, keys: Sequence[str], compute: Callable[[list[str]], Tensor], device: torch.device
    ) -> Tensor:
        """Stacked values for `keys`, computing (in one batch) only the missing unique ones."""
        if self.max_size <= 0:
            return compute(list(keys)).to(device)
        missing = [k for k in dict.fromkeys(keys) if k not in self._data]
        if missing:
            for key, value in zip(missing, compute(missing), strict=True):
                self._data[key] = value.detach()
        out = []
        for key in keys:
            self._data.move_to_end(key)
            out.append(self._data[key].to(device))
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)
        return torch.stack(out)


class TextCachedReward(Reward):
    """Base for rewards that encode each prompt once and reuse it; subclasses define `_encode_text`.

    `_encode_text(prompts) -> Tensor[len(prompts), ...]` runs without grad on missing prompts only.
    """

    def __init__(self, cache_size: int = 1024) -> None:
        super().__init__()
        self.text_cache = PromptCache(cache_size)

    @classmethod
    def check_options(cls, **options: Any) -> None:
        super().check_options(**options)
        if "dtype" in options:
            resolve_dtype(options["dtype"])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _encode_text(self, prompts: list[str]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """The cached encoding of each prompt, stacked, on the reward's device."""
        return self.text_cache.get_many(list(prompts), self._encode_text, self.device)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # .to()/.cuda()/.half() move the model; cached tensors must not outlive that.
        self.text_cache.clear()
        return super()._apply(fn, *args, **kwargs)
