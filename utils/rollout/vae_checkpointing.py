"""Gradient checkpointing of the VAE decode, one segment per resnet, upsampler and attention block.

DRaFT+ decodes its last sample with gradients, and at full resolution that backward is the largest item of a
step. diffusers' own `vae.enable_gradient_checkpointing()` checkpoints the decoder per up block, so the backward
of the last up block recomputes, and holds at once, every one of its resnets' full-resolution activations. Here
each block inside the mid block and the up blocks is its own segment instead: the backward holds one at a time.

Blocks whose forward takes a `feat_cache` (the causal 3D VAEs', e.g. Qwen-Image's) mutate that cache list and
its index in place when given one, so a recompute would read and write the wrong cache entries: such a call runs
as is, uncheckpointed. Called without a cache they are pure functions and are checkpointed like the others; a
single-frame decode needs no cache (the Qwen-Image family's `decode` runs one so), so an image decode of such a
VAE is checkpointed whole.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

_WRAPPED = "_draftplus_checkpointed"  # marks a wrapped block, so a second call does not checkpoint twice


def _signature(forward: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):  # no signature to read: the cache cannot be checked, the block is left alone
        return None


def _needs_grad(module: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether this call builds a graph: an input, or one of the block's own weights, requires grad."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())


def _checkpointed(module: torch.nn.Module, signature: inspect.Signature) -> Callable:
    forward = module.forward
    takes_cache = "feat_cache" in signature.parameters

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        # A no-grad call (the rollout's sampling, a validation decode) has nothing to recompute: run it as is;
        # so is a call given a feature cache (module doc).
        if (not torch.is_grad_enabled() or not _needs_grad(module, args, kwargs)
                or takes_cache and signature.bind(*args, **kwargs).arguments.get("feat_cache") is not None):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return wrapped


def _wrap(blocks: list[torch.nn.Module]) -> int:
    """Checkpoint each of `blocks` on its own; returns how many are checkpointed (wrapped now or before)."""
    count = 0
    for block in blocks:
        if getattr(block, _WRAPPED, False):
            count += 1
        elif (signature := _signature(block.forward)) is not None:
            block.forward = _checkpointed(block, signature)
            setattr(block, _WRAPPED, True)
            count += 1
    return count


def decoder_blocks(vae: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's resnet, attention and upsampler blocks: the members of the ModuleLists (`resnets`,
    `attentions`, `upsamplers`) directly under its mid block and each up block, the layout every diffusers
    image VAE decoder shares."""
    return [block for parent in decoder_stages(vae) for child in parent.children()
            if isinstance(child, torch.nn.ModuleList) for block in child]


def decoder_stages(vae: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's mid block and up blocks: the segments of diffusers' own (per up block) checkpointing."""
    decoder = vae.decoder
    return [s for s in (getattr(decoder, "mid_block", None), *getattr(decoder, "up_blocks", [])) if s is not None]


def checkpoint_decoder_blocks(vae: torch.nn.Module) -> int:
    """Checkpoint each resnet, attention and upsampler block of `vae.decoder` on its own (non-reentrant), in
    place of diffusers' per-up-block checkpointing; a feature-cache block only on calls without a cache (module
    doc). Returns how many blocks are checkpointed."""
    return _wrap(decoder_blocks(vae))


def checkpoint_vae(vae: torch.nn.Module, per_block: bool = False) -> str | None:
    """`--gradient_checkpointing` on the VAE: per up block (diffusers' own where the class supports it, else the
    same segments wrapped here, e.g. Qwen-Image's), or per block with `per_block` (`--vae_block_checkpointing`).
    Returns what was checkpointed, as the trainer logs it, or None for a VAE with no decoder blocks."""
    if per_block:
        return "vae (per block)" if checkpoint_decoder_blocks(vae) else None
    if getattr(vae, "_supports_gradient_checkpointing", False):
        vae.enable_gradient_checkpointing()
        return "vae"
    return "vae" if _wrap(decoder_stages(vae)) else None
