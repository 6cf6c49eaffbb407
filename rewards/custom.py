"""Custom rewards: import `path/to/file.py:ATTR` or `package.module:ATTR` and wrap plain functions."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from .base import Reward, check_inputs, check_scores
from .errors import RewardSpecError


def _load_module_from_file(path: Path) -> Any:
    # One module object per file (keyed by its resolved path) so validating and then building a
    # spec executes the user's file once and both see the same classes.
    resolved = path.resolve()
    mod_name = "_draftplus_reward_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise RewardSpecError(f"custom reward file {str(path)!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise RewardSpecError(
            f"custom reward file {str(path)!r} failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def resolve_custom(target: str) -> Any:
    """Import `path/to/file.py:attr` or `package.module:attr` and return the attribute."""
    where, _, attr = target.rpartition(":")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise RewardSpecError(f"custom reward file not found: {str(path)!r} (from {target!r})")
        module = _load_module_from_file(path)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise RewardSpecError(
                f"custom reward module {where!r} is not importable: {type(exc).__name__}: {exc}"
            ) from exc
    if not hasattr(module, attr):
        public = sorted(
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and callable(v) and not inspect.ismodule(v)
        )
        raise RewardSpecError(
            f"custom reward {target!r}: {where!r} has no attribute {attr!r}"
            + (f" (it defines: {', '.join(public)})" if public else "")
        )
    obj = getattr(module, attr)
    if inspect.isclass(obj) and not issubclass(obj, Reward):
        # Calling a class would construct it, not score images: only Reward subclasses are built.
        raise RewardSpecError(
            f"custom reward {target!r} is a class but not a rewards.Reward subclass; subclass Reward "
            "or point at a function (images, prompts) -> Tensor[B]"
        )
    if not (isinstance(obj, Reward) or callable(obj)):
        raise RewardSpecError(
            f"custom reward {target!r} is a {type(obj).__name__}, expected a Reward subclass or a "
            "function (images, prompts) -> Tensor[B]"
        )
    return obj


class FunctionReward(Reward):
    """Wraps a plain function `(images, prompts) -> Tensor[B]` (or a non-Reward module) as a Reward."""

    def __init__(self, fn: Callable[[Tensor, Sequence[str]], Tensor], name: str = "custom") -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_inputs(images, prompts)
        return check_scores(self.fn(images, list(prompts)), images.shape[0], f"custom reward {self.name!r}")
