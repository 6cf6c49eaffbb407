"""Gradient checkpointing of the VAE decode, one segment per resnet, upsampler and attention block.

DRaFT+ decodes its last sample with gradients, and at full resolution that backward is the largest item of a
step. diffusers' own `vae.enable_gradient_checkpointing()` checkpoints the decoder per up block, so the backward
of the last up block recomputes, and holds at once, every one of its resnets' full-resolution activations. Here
each block inside the mid block and the up blocks is its own segment instead: the backward holds one at a time.

Blocks whose forward takes a `feat_cache` (the causal 3D VAEs', e.g. Qwen-Image's) are never wrapped: they
mutate that cache list and its index in place, so a recompute would read and write the wrong cache entries.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

_WRAPPED = "_draftplus_checkpointed"  # marks a wrapped block, so a second call does not checkpoint twice


def _takes_feat_cache(forward: Callable) -> bool:
    try:
        return "feat_cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # no signature to read: assume the worst, leave the block alone
        return True


def _needs_grad(module: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether this call builds a graph: an input, or one of the block's own weights, requires grad."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())


def _checkpointed(module: torch.nn.Module) -> Callable:
    forward = module.forward

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        # A no-grad call (the rollout's sampling, a validation decode) has nothing to recompute: run it as is.
        if not torch.is_grad_enabled() or not _needs_grad(module, args, kwargs):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return wrapped


def decoder_blocks(vae: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's resnet, attention and upsampler blocks: the members of the ModuleLists (`resnets`,
    `attentions`, `upsamplers`) directly under its mid block and each up block, the layout every diffusers
    image VAE decoder shares."""
    decoder = vae.decoder
    parents = [getattr(decoder, "mid_block", None), *getattr(decoder, "up_blocks", [])]
    return [block for parent in parents if parent is not None for child in parent.children()
            if isinstance(child, torch.nn.ModuleList) for block in child]


def checkpoint_decoder_blocks(vae: torch.nn.Module) -> int:
    """Checkpoint each resnet, attention and upsampler block of `vae.decoder` on its own (non-reentrant), in
    place of diffusers' per-up-block checkpointing; feature-cache blocks are skipped (module doc). Returns how
    many blocks are checkpointed."""
    count = 0
    for block in decoder_blocks(vae):
        if getattr(block, _WRAPPED, False):
            count += 1
        elif not _takes_feat_cache(block.forward):
            block.forward = _checkpointed(block)
            setattr(block, _WRAPPED, True)
            count += 1
    return count
