"""Shared loading helpers for model-backed rewards: dtypes, state dicts, `from_pretrained`, checkpointing.

Safety rules: weights come from safetensors, or from `torch.load(..., weights_only=True)` for
legacy `.pt`/`.pth` files; `trust_remote_code` is never used. Where the files are (a local path or
the hub) is `rewards.files`' job.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import RewardLoadError, RewardSpecError

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """`None` -> fp32 (rewards default to fp32: their gradients feed the LoRA update)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise RewardSpecError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return _DTYPES[key]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors from a `.safetensors` file, or a `.pt`/`.pth`/`.bin` loaded with `weights_only=True`.

    A checkpoint wrapping its tensors in `{"state_dict": ...}` (HPS, many `.pth` heads) is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RewardLoadError(
            f"{str(path)!r} is not loadable with torch.load(weights_only=True) ({type(exc).__name__}); "
            "convert it to safetensors -- arbitrary pickles are never unpickled"
        ) from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise RewardLoadError(f"{str(path)!r} does not hold a state dict of tensors")
    return obj


def hf_from_pretrained(cls: Any, name_or_path: str, what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` with a one-line error that says how to run offline."""
    try:
        return cls.from_pretrained(str(name_or_path), **kwargs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RewardLoadError(
            f"could not load {what} from {str(name_or_path)!r} ({type(exc).__name__}: {first}); "
            "pass a local directory saved with save_pretrained"
        ) from exc


def pooled(output: Any) -> Tensor:
    """The projected embedding from `get_image_features`/`get_text_features`.

    transformers 5 returns a `BaseModelOutputWithPooling` whose `pooler_output` is the projected
    embedding; transformers 4 returned the tensor itself. Accept both.
    """
    if isinstance(output, Tensor):
        return output
    for attr in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, attr, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"cannot find the embedding in {type(output).__name__}")


def checkpoint_layers(layers: Iterable[nn.Module]) -> int:
    """Activation-checkpoint each layer's forward (non-reentrant); returns how many were wrapped.

    transformers only checkpoints modules in training mode, but a reward model stays in eval
    mode, so we wrap the layers ourselves. Wrap the towers that carry gradients to the image: the
    image tower everywhere, and ImageReward's text tower too (it cross-attends to the image).
    """
    count = 0
    for layer in layers:
        forward: Callable[..., Any] = layer.forward

        def wrapped(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = wrapped  # type: ignore[method-assign]
        count += 1
    return count
