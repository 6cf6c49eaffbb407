"""The differentiable sampling loop of DRaFT / DRaFT+, and the DRaFT+ step built on it.

The diffusers pipelines' `__call__` runs under `no_grad`, so training needs its own loop: the first steps
without autograd (they keep no activations, so memory does not grow with T), the last K with gradients
into the LoRA weights. At every graded step the same denoiser with its adapters disabled gives the
reference prediction for the DRaFT+ penalty.

One loop serves every model family and sampler. It asks the family (`utils.families`) for what differs:
the prompt conditioning, the guided denoiser call (a UNet with classifier-free guidance; SD3's transformer;
FLUX's with its distilled guidance and packed latents) and the noise parametrisation of the rollout
(`utils.rollout.parametrisation`: a variance-preserving sampler for the UNets, rectified flow over the pipeline's
sigmas for the flow transformers), which turns each prediction into the next latent, the clean latent
x0 (decoded) and the noise it implies (the penalty). Latents are [B, C, h, w] throughout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch.profiler import record_function

from utils.lora import adapters_disabled

FINAL_LATENTS = ("x0", "sample")


@dataclass(kw_only=True)
class RolloutConfig:
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    truncation_steps: int = 1  # K: how many final steps get gradients
    eta: float = 0.0
    lv_samples: int = 0  # DRaFT-LV: re-noised copies of x0 graded with one step each (0 = off)
    # What the last step hands to the VAE: the model's x0 prediction (as NeMo-Aligner's DRaFT+), or
    # the scheduler's own final sample (bit-identical to the diffusers pipeline's images).
    final_latent: str = "x0"

    def __post_init__(self) -> None:
        if self.final_latent not in FINAL_LATENTS:
            raise ValueError(f"final_latent must be one of {FINAL_LATENTS}, got {self.final_latent!r}")
        # DRaFT-LV's step starts from a re-noised x0, off the sampled trajectory: a multistep scheduler's
        # history (DPM-Solver++, PLMS) and a sigma scheduler's step index belong to that trajectory, so
        # the scheduler's sample of it is not defined; the x0 prediction is, for every sampler.
        if self.lv_samples and self.final_latent != "x0":
            raise ValueError("lv_samples decodes its step's x0 prediction; final_latent must be 'x0'")

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on when the scale exceeds 1 (diffusers' convention)."""
        return self.guidance_scale > 1.0


@dataclass
class Rollout:
    images: torch.Tensor  # [N, 3, H, W] in [0, 1], differentiable w.r.t. the LoRA weights
    eps: list[torch.Tensor] = field(default_factory=list)  # noise implied by each graded step's guided prediction
    eps_ref: list[torch.Tensor] = field(default_factory=list)  # same, adapters disabled; empty if unused
    repeats: int = 1  # images per prompt (lv_samples for DRaFT-LV)
    latents: torch.Tensor | None = None  # what was decoded


@dataclass(kw_only=True)
class Models:
    family: Any  # utils.families.ModelFamily: text encoders, conditioning, denoiser call, parametrisation
    denoiser: torch.nn.Module  # the LoRA UNet/transformer as the optimiser sees it (possibly DDP-wrapped)
    raw_denoiser: torch.nn.Module  # the same module unwrapped: no-grad prefix and adapters-off reference
    vae: torch.nn.Module
    scheduler: Any  # the training rollout's sampler (its own instance: validation uses another)
    no_grad_denoiser: Callable | None = None  # raw_denoiser's no-grad calls, compiled (--compile; utils.rollout.compile)
    # The prompts' conditioning computed before the run (--precompute_prompt_embeddings; utils.run.prompt_cache),
    # called as `family.encode_prompts`; None: the family encodes each batch.
    prompt_embeddings: Callable | None = None


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], differentiable, un-normalised as the diffusers pipelines do (the families
    whose pipelines decode otherwise say so in `ModelFamily.decode`)."""
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, device=latents.device).view(1, -1, 1, 1)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
        if getattr(config, "shift_factor", None):
            latents = latents + config.shift_factor
    return vae_images(vae, latents)


def vae_images(vae, latents: torch.Tensor, vae_decode: Callable | None = None) -> torch.Tensor:
    """Un-normalised latents -> images in [0, 1] through the VAE's decoder (`vae_decode(latents)`, default
    `vae.decode`), differentiable."""
    # An fp32 VAE under mixed precision was upcast on purpose (SDXL's VAE overflows in fp16):
    # autocast would put its convolutions back in half precision.
    upcast = vae.dtype == torch.float32 and torch.is_autocast_enabled(latents.device.type)
    with torch.autocast(latents.device.type, enabled=False) if upcast else contextlib.nullcontext():
        latents = latents.to(vae.dtype)
        images = vae_decode(latents) if vae_decode else vae.decode(latents, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def _reference_eps(models: Models, steps, x_t: torch.Tensor, i: int, cond, guidance_scale: float) -> torch.Tensor:
    """The DRaFT+ reference at a graded step: the noise implied by the guided prediction of the same denoiser
    with its adapters disabled, on the same x_t, without gradient."""
    no_grad_denoiser = models.no_grad_denoiser or models.raw_denoiser
    t = steps.timesteps[i]
    with torch.no_grad(), adapters_disabled(models.raw_denoiser), record_function("draftplus/reference_pass"):
        reference = models.family.predict(no_grad_denoiser, x_t, t, cond, guidance_scale)
        return steps.to_epsilon(reference, x_t, i)


# ---------------------------------------------------------------------------------- the rollout


def rollout(
    models: Models,
    cond,
    noise: torch.Tensor,
    config: RolloutConfig,
    *,
    with_reference: bool = True,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample images from `noise` ([B, C, h, w]) under the conditioning `cond` (`family.encode_prompts`),
    with gradients through the last K denoiser calls and the VAE decoder.

    `models.denoiser` is the model that receives gradients (it may be wrapped, e.g. by DDP);
    `models.raw_denoiser` is the same model unwrapped, used for everything that needs no gradient: the
    step prefix and the reference pass with adapters disabled (wrapped calls there would only add DDP
    overhead). `models.no_grad_denoiser`, when set, makes those no-grad calls instead (a compiled wrapper
    of the raw denoiser: `utils.rollout.compile.CompiledDenoiser`); adapters are still switched on the raw denoiser.
    """
    family = models.family
    no_grad_denoiser = models.no_grad_denoiser or models.raw_denoiser
    steps = family.parametrisation(models.scheduler, config, tuple(noise.shape[-2:]), noise.device, generator)
    n = len(steps)
    latents = steps.initial_latents(noise)
    graded_from = n if config.lv_samples else n - config.truncation_steps

    def next_latents(prediction, i, latents, x_t):
        if i == n - 1 and config.final_latent == "x0":
            return steps.to_x0(prediction, x_t, i)
        return steps.step(prediction, i, latents)

    with torch.no_grad(), record_function("draftplus/no_grad_prefix"):
        for i in range(graded_from):
            x_t = steps.model_input(latents, i)
            prediction = family.predict(no_grad_denoiser, x_t, steps.timesteps[i], cond, config.guidance_scale)
            latents = next_latents(prediction, i, latents, x_t)

    if config.lv_samples:
        return _lv_graded_step(models, steps, cond, latents, config, with_reference, generator)

    out = Rollout(images=None)
    for i in range(graded_from, n):
        x_t = steps.model_input(latents, i)
        with record_function("draftplus/graded_step"):
            prediction = family.predict(models.denoiser, x_t, steps.timesteps[i], cond, config.guidance_scale)
        out.eps.append(steps.to_epsilon(prediction, x_t, i))
        if with_reference:
            out.eps_ref.append(_reference_eps(models, steps, x_t, i, cond, config.guidance_scale))
        latents = next_latents(prediction, i, latents, x_t)
    with record_function("draftplus/vae_decode"):
        out.images, out.latents = models.family.decode(models.vae, latents), latents
    return out


def _lv_graded_step(models: Models, steps, cond, x0: torch.Tensor, config: RolloutConfig, with_reference: bool,
                    generator: torch.Generator | None) -> Rollout:
    """DRaFT-LV: re-noise the stop-grad x0 n times to the last step's noise level, denoise each
    with one graded step and decode its x0 prediction. The n samples share one batched denoiser call.

    The re-noised latent is built in the model's own terms (`steps.renoise`: sqrt(a) x0 + sqrt(1 - a) noise
    for the UNets, (1 - sigma) x0 + sigma noise for rectified flow), so it is the same for every sampler."""
    n, last = config.lv_samples, len(steps) - 1
    x0 = x0.repeat_interleave(n, dim=0)
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = steps.renoise(x0, noise, last)
    cond = cond.repeat_interleave(n)
    with record_function("draftplus/graded_step"):
        prediction = models.family.predict(models.denoiser, x_t, steps.timesteps[last], cond, config.guidance_scale)
    out = Rollout(images=None, eps=[steps.to_epsilon(prediction, x_t, last)], repeats=n)
    if with_reference:
        out.eps_ref.append(_reference_eps(models, steps, x_t, last, cond, config.guidance_scale))
    with record_function("draftplus/vae_decode"):
        out.latents = steps.to_x0(prediction, x_t, last)
        out.images = models.family.decode(models.vae, out.latents)
    return out


def kl_penalty(eps: Sequence[torch.Tensor], eps_ref: Sequence[torch.Tensor]) -> torch.Tensor:
    """DRaFT+ penalty: mean over graded steps of mean over (B, C, H, W) of (eps - eps_ref)^2, eps the noise
    implied by each guided prediction (for rectified flow, (1 - sigma)^2 times the velocity MSE)."""
    return torch.stack([(e.float() - r.float()).pow(2).mean() for e, r in zip(eps, eps_ref, strict=True)]).mean()


# ---------------------------------------------------------------------------------- the DRaFT+ step


def draftplus_step(models: Models, reward_fn: Callable, prompts: list[str], noise: torch.Tensor,
                   config: RolloutConfig, kl_coeff: float, negative_prompt: str = "",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss = -mean R(x0) + kl_coeff * mean_k mean (eps_theta - eps_ref)^2, for one batch of prompts.

    Returns (loss, per-image rewards, penalty); the last two detached, for logging."""
    height, width = (s * models.family.vae_scale_factor for s in noise.shape[-2:])
    encode = models.prompt_embeddings or models.family.encode_prompts
    cond = encode(prompts, negative_prompt, config.guided, height=height, width=width)
    sample = rollout(models, cond, noise, config, with_reference=kl_coeff > 0, generator=generator)
    # The reward runs in its own dtype (--reward_dtype, fp32 by default), not under the denoiser's autocast.
    with record_function("draftplus/reward"), torch.autocast(noise.device.type, enabled=False):
        rewards = reward_fn(sample.images, [p for p in prompts for _ in range(sample.repeats)])
    penalty = kl_penalty(sample.eps, sample.eps_ref) if kl_coeff > 0 else rewards.new_zeros(())
    loss = -rewards.mean() + kl_coeff * penalty
    return loss, rewards.detach(), penalty.detach()
