"""Per-block checkpointing of the VAE decode (utils/rollout/vae_checkpointing.py): the same images and latent
gradients as no checkpointing, no-grad decodes untouched, and a lower peak than diffusers' per-up-block one; for
Qwen-Image's causal VAE, the cache-free single-frame decode it relies on, bit for bit."""

import json

import diffusers
import pytest
import torch

from utils.families import load_family
from utils.families.qwen_image import decode_frame
from utils.memory.trace import MemoryTrace
from utils.rollout.vae_checkpointing import checkpoint_decoder_blocks, decoder_blocks

VAE_FIXTURES = ["tiny_sd_path", "tiny_flux_dev_path", "tiny_flux2_dev_path", "tiny_z_image_path"]


def load_vae(path) -> torch.nn.Module:
    """The pipeline's VAE, by the class its config names (AutoencoderKL, AutoencoderKLFlux2...)."""
    name = json.loads((path / "vae" / "config.json").read_text())["_class_name"]
    return getattr(diffusers, name).from_pretrained(path / "vae").requires_grad_(False).eval()


def latents_for(vae, size: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(1, getattr(vae.config, "latent_channels", None) or vae.config.z_dim, size, size)


def decode_and_grad(vae, latents: torch.Tensor, decode=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and d(sum of squares of the image)/d(latents): the DRaFT+ decode and backward in small."""
    latents = latents.clone().requires_grad_(True)
    image = decode(latents) if decode else vae.decode(latents).sample
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


def qwen_vae(path, dtype=torch.float32) -> torch.nn.Module:
    return load_vae(path).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_single_frame_decodes_without_the_feature_cache_bit_for_bit(tiny_qwen_image_path, dtype):
    """Qwen-Image's causal VAE decodes a video with a feature cache; one frame reads nothing from it, so the
    family's cache-free decode gives the image and the latents' gradient of `vae.decode`, bit for bit."""
    vae = qwen_vae(tiny_qwen_image_path, dtype)
    latents = latents_for(vae).to(dtype)
    image, grad = decode_and_grad(vae, latents.unsqueeze(2))
    free_image, free_grad = decode_and_grad(vae, latents.unsqueeze(2),
                                            decode=lambda z: decode_frame(vae, z[:, :, 0]).unsqueeze(2))
    assert torch.equal(free_image, image) and torch.equal(free_grad, grad) and grad.abs().sum() > 0


def test_feature_cache_blocks_are_checkpointed_only_when_called_without_a_cache(tiny_qwen_image_path):
    """Every block of the Qwen-Image decoder is wrapped; the cache-free frame decode is then checkpointed (same
    image bit for bit, same gradient), and a two-frame video, whose second frame reads the cache the first wrote,
    still decodes and differentiates as without the wrapping: a call given a cache runs as is."""
    vae = qwen_vae(tiny_qwen_image_path)
    latents = latents_for(vae)
    torch.manual_seed(1)
    video = torch.randn(1, vae.config.z_dim, 2, 8, 8)
    image, grad = decode_and_grad(vae, latents, decode=lambda z: decode_frame(vae, z))
    video_out, video_grad = decode_and_grad(vae, video)
    assert checkpoint_decoder_blocks(vae) == len(decoder_blocks(vae)) > 4  # resnets and resamplers too
    image_ckpt, grad_ckpt = decode_and_grad(vae, latents, decode=lambda z: decode_frame(vae, z))
    assert torch.equal(image_ckpt, image)
    torch.testing.assert_close(grad_ckpt, grad, rtol=0, atol=1e-6)
    video_ckpt, video_grad_ckpt = decode_and_grad(vae, video)
    assert torch.equal(video_ckpt, video_out)
    torch.testing.assert_close(video_grad_ckpt, video_grad, rtol=0, atol=1e-6)


def test_qwen_image_decode_holds_less_checkpointed_per_up_block_and_less_again_per_block(tiny_qwen_image_path):
    """The family's decode and its backward, traced: `--gradient_checkpointing` (per up block) holds less than
    no checkpointing, `--vae_block_checkpointing` less again; and the cache-free decode alone holds less than
    `vae.decode`, which keeps a copy of every causal conv's input for a next frame."""
    latents = latents_for(qwen_vae(tiny_qwen_image_path), size=32)  # activations, not weights, make the peak

    def peak(vae_blocks: bool | None, decode=None) -> int:
        family = load_family(str(tiny_qwen_image_path))
        family.vae.requires_grad_(False)
        if vae_blocks is not None:
            family.enable_gradient_checkpointing(vae_blocks)
        latents_ = latents.clone().requires_grad_(True)
        with MemoryTrace() as trace:
            (decode or family.decode)(family.vae, latents_).square().sum().backward()
        return trace.peak.total

    none, per_up_block, per_block = peak(None), peak(False), peak(True)
    assert per_block < per_up_block < none
    assert peak(None, decode_frame) < peak(None, lambda vae, z: vae.decode(z.unsqueeze(2)).sample[:, :, 0])
