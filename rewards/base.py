"""The `Reward` contract every reward model implements.

A reward maps a batch of images in [0, 1] (and their prompts) to one float32 score per image,
higher is better, and must be differentiable with respect to the images: DRaFT+ backpropagates
the reward through the VAE decoder into the denoiser's LoRA weights. The reward's own weights are
never trained, so they are frozen and the module is pinned to eval mode (dropout off, and no
train-mode batch statistics), even if the trainer calls `.train()` on every module it owns.

A reward's options are the keyword parameters of its class's `__init__` (`accepted_options`,
`option_defaults`): `--reward help`, option routing and `model_references` all read them there.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RewardSpecError


class Reward(nn.Module):
    """Base class: subclasses implement `forward(images, prompts) -> Tensor[B]`.

    `images` is `[B, 3, H, W]`, float (any dtype) in [0, 1]; `prompts` is a list of B strings.
    The result is `[B]` float32; gradients flow to `images`.
    """

    # Metadata lives on the class (as timm keeps it beside each model) so that `--reward help`,
    # the catalogue and the code cannot drift apart; the options are read from `__init__`.
    #: The registered name; a built instance carries its spec label instead (used in logs).
    name: str = "reward"
    #: One line for `--reward help`: what is scored, and how.
    description: str = ""
    #: The typical range of scores, as `--reward help` and the README table give it.
    score_range: str = ""
    #: The options that name the files the weights load from (a local path, a hub repo id, or
    #: `owner/repo:filename`): what `model_references` lists, so the trainer can check them early.
    file_options: tuple[str, ...] = ()

    # Spelled out so the signature says "no options": nn.Module's own is (*args, **kwargs), which
    # `accepted_options` would read as "takes any option".
    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Raise ValueError for an option value that cannot work, without loading anything.

        Validation calls it with the options routed to this reward, so a value that can be judged
        from the spec alone fails before any model loads. The default checks each value against the
        type of its default: a flag takes true/false, a number a number. Subclasses add their own.
        """
        defaults = option_defaults(cls)
        for key, value in options.items():
            default = defaults.get(key)
            if isinstance(default, bool) and not isinstance(value, bool):
                raise RewardSpecError(f"option {key}={value!r} must be true or false")
            if (
                isinstance(default, (int, float))
                and not isinstance(default, bool)
                and (isinstance(value, bool) or not isinstance(value, (int, float)))
            ):
                raise RewardSpecError(f"option {key}={value!r} must be a number")

    @classmethod
    def architecture(cls, **options: Any) -> Any | None:
        """The published architecture of the reward's network (a transformers config), known without its
        weights or any file: a memory estimate builds the network from it under fake tensors. `options`: the
        reward's options (a reward whose size depends on one reads it). None: a reward without a network, or
        one whose architecture this class cannot name."""
        return None

    @classmethod
    def from_architecture(cls, config: Any, dtype: torch.dtype | None = None, gradient_checkpointing: bool = False,
                          **options: Any) -> Reward:
        """The reward scoring with a network built from `config` (`architecture`) with fresh weights, reading
        no file: what a memory estimate traces (its weights then fake), on the same code path as the loaded
        reward. A reward that gives an architecture without this is counted by its weights alone."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from its architecture")

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def freeze(self) -> Reward:
        """Freeze every parameter and switch to eval mode; returns self."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Reward:
        # A reward is a fixed critic: keep it in eval mode whatever the caller asks, so that a
        # trainer calling `.train()` on all its modules cannot switch dropout on inside it.
        return super().train(False)


def accepted_options(factory: Any) -> tuple[set[str], bool]:
    """(keyword options the factory takes, whether it takes **kwargs); an instance or a plain
    function takes none."""
    if not inspect.isclass(factory):
        return set(), False
    params = inspect.signature(factory).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def option_defaults(cls: type) -> dict[str, Any]:
    """A reward class's options with a default other than None, in signature order."""
    return {
        p.name: p.default
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not inspect.Parameter.empty
        and p.default is not None
    }


def check_inputs(images: Tensor, prompts: Sequence[str] | None = None) -> None:
    """Raise a one-line ValueError if `images`/`prompts` break the Reward contract."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"reward expects images of shape [B, 3, H, W] in [0, 1], got {shape}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"reward got {images.shape[0]} images but {len(prompts)} prompts")


def check_scores(scores: Tensor, batch_size: int, who: str = "reward") -> Tensor:
    """Validate a reward's output and return it as float32 `[B]`.

    A custom reward breaking the contract is the user's to fix, so it is a RewardSpecError (one line).
    """
    if not isinstance(scores, Tensor):
        raise RewardSpecError(f"{who} must return a torch.Tensor of shape [B], got {type(scores).__name__}")
    if scores.ndim == 2 and scores.shape[1] == 1:  # tolerate [B, 1] heads
        scores = scores[:, 0]
    if scores.shape != (batch_size,):
        raise RewardSpecError(f"{who} must return shape [{batch_size}], got {tuple(scores.shape)}")
    return scores.float()


def as_float_images(images: Tensor) -> Tensor:
    """Images as float32: model-free rewards compute in fp32 even when the VAE decodes in bf16."""
    return images if images.dtype == torch.float32 else images.float()
