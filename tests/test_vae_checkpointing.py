"""Per-block checkpointing of the VAE decode (utils/rollout/vae_checkpointing.py): the same images and latent
gradients as no checkpointing, no-grad decodes untouched, and a lower peak than diffusers' per-up-block one."""

import json

import diffusers
import pytest
import torch

from utils.families import load_family
from utils.memory.trace import MemoryTrace
from utils.rollout.vae_checkpointing import checkpoint_decoder_blocks, decoder_blocks

VAE_FIXTURES = ["tiny_sd_path", "tiny_flux_dev_path", "tiny_flux2_dev_path"]


def load_vae(path) -> torch.nn.Module:
    """The pipeline's VAE, by the class its config names (AutoencoderKL, AutoencoderKLFlux2...)."""
    name = json.loads((path / "vae" / "config.json").read_text())["_class_name"]
    return getattr(diffusers, name).from_pretrained(path / "vae").requires_grad_(False).eval()


def latents_for(vae, size: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(1, vae.config.latent_channels, size, size)


def decode_and_grad(vae, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and d(sum of squares of the image)/d(latents): the DRaFT+ decode and backward in small."""
    latents = latents.clone().requires_grad_(True)
    image = vae.decode(latents).sample
    image.square().sum().backward()
    return image.detach(), latents.grad


@pytest.mark.parametrize("fixture", VAE_FIXTURES)
def test_per_block_checkpointing_decodes_and_differentiates_as_without(fixture, request):
    path = request.getfixturevalue(fixture)
    latents = latents_for(vae := load_vae(path))
    image, grad = decode_and_grad(vae, latents)
    with torch.no_grad():
        plain = vae.decode(latents).sample

    count = checkpoint_decoder_blocks(vae)
    assert count == len(decoder_blocks(vae)) > 0
    assert checkpoint_decoder_blocks(vae) == count  # a second call wraps nothing twice
    assert not vae.decoder.gradient_checkpointing  # no nested per-up-block segments on top
    image_ckpt, grad_ckpt = decode_and_grad(vae, latents)
    torch.testing.assert_close(image_ckpt, image, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_ckpt, grad, rtol=0, atol=1e-6)
    assert grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, plain)


def test_family_checkpoints_the_vae_per_block_when_asked(tiny_sd_path):
    """--vae_block_checkpointing: every decoder block its own segment, diffusers' per-up-block flag off (no nested
    segments); without it, diffusers' own per-up-block checkpointing and no block wrapped."""
    family = load_family(str(tiny_sd_path))
    assert family.enable_gradient_checkpointing(vae_blocks=True) == ["unet", "vae (per block)"]
    assert not family.vae.decoder.gradient_checkpointing
    assert all(getattr(block, "_draftplus_checkpointed", False) for block in decoder_blocks(family.vae))
    plain = load_family(str(tiny_sd_path))
    assert plain.enable_gradient_checkpointing() == ["unet", "vae"] and plain.vae.decoder.gradient_checkpointing
    assert not any(getattr(block, "_draftplus_checkpointed", False) for block in decoder_blocks(plain.vae))


def peak_of_decode_backward(vae, latents: torch.Tensor) -> int:
    """The most bytes alive at once, by the estimator's tracker, over a decode and its backward."""
    latents = latents.clone().requires_grad_(True)
    with MemoryTrace() as trace:
        vae.decode(latents).sample.square().sum().backward()
    return trace.peak.total


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_flux2_dev_path"])
def test_per_block_checkpointing_lowers_the_peak_of_the_backward(fixture, request):
    path = request.getfixturevalue(fixture)
    latents = latents_for(load_vae(path), size=32)  # activations, not weights, make the peak
    per_up_block = load_vae(path)
    per_up_block.enable_gradient_checkpointing()
    per_block = load_vae(path)
    checkpoint_decoder_blocks(per_block)
    none = peak_of_decode_backward(load_vae(path), latents)
    diffusers_peak = peak_of_decode_backward(per_up_block, latents)
    finer_peak = peak_of_decode_backward(per_block, latents)
    assert finer_peak < diffusers_peak < none


def test_feature_cache_blocks_are_left_alone(tiny_qwen_image_path):
    """Qwen-Image's causal VAE mutates a feature cache in its resnets and resamplers, which a recompute would
    corrupt: only its cache-free attention block is wrapped, and the decode and its gradient stay the same."""
    vae = load_vae(tiny_qwen_image_path)
    torch.manual_seed(0)
    latents = torch.randn(1, vae.config.z_dim, 1, 8, 8)
    image, grad = decode_and_grad(vae, latents)
    assert checkpoint_decoder_blocks(vae) == 1
    wrapped = [type(b).__name__ for b in decoder_blocks(vae) if getattr(b, "_draftplus_checkpointed", False)]
    assert wrapped == ["QwenImageAttentionBlock"]
    image_ckpt, grad_ckpt = decode_and_grad(vae, latents)
    torch.testing.assert_close(image_ckpt, image, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_ckpt, grad, rtol=0, atol=1e-6)
