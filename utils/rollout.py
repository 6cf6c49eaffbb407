"""The differentiable sampling loop of DRaFT / DRaFT+, and the DRaFT+ step built on it.

`StableDiffusionPipeline.__call__` runs under `no_grad`, so training needs its own loop over the
scheduler's `step()`: the first steps without autograd (they keep no activations, so memory does not
grow with T), the last K with gradients into the LoRA weights. At every graded step the same UNet
with its adapters disabled gives the reference prediction for the DRaFT+ penalty.

The loop is the same for every UNet family and sampler: model-specific conditioning (SDXL's pooled
embeddings and time ids) lives in `PromptEmbeds`, and everything that depends on the noise level goes
through `alpha_bar`, which reads it from discrete (DDIM, DDPM, PNDM) and sigma-parametrised (Euler,
DPM-Solver++) schedulers alike. Predictions are converted to eps (the penalty) and to x0 (the decoded
image) in the variance-preserving parametrisation the UNet was trained in.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch.profiler import record_function

from utils.lora import adapters_disabled

FINAL_LATENTS = ("x0", "sample")


@dataclass
class PromptEmbeds:
    """UNet conditioning for a batch; with guidance, the unconditional rows come first."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None  # SDXL: {"text_embeds", "time_ids"}
    guided: bool = True

    def repeat_interleave(self, n: int) -> PromptEmbeds:
        """Repeat each prompt n times, keeping the [uncond..., cond...] layout."""

        def rep(x: torch.Tensor) -> torch.Tensor:
            if not self.guided:
                return x.repeat_interleave(n, dim=0)
            uncond, cond = x.chunk(2)
            return torch.cat([uncond.repeat_interleave(n, dim=0), cond.repeat_interleave(n, dim=0)])

        extra = {k: rep(v) for k, v in self.added_cond_kwargs.items()} if self.added_cond_kwargs else None
        return PromptEmbeds(rep(self.encoder_hidden_states), extra, self.guided)


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
    eps: list[torch.Tensor] = field(default_factory=list)  # guided noise prediction of each graded step
    eps_ref: list[torch.Tensor] = field(default_factory=list)  # same, adapters disabled; empty if unused
    repeats: int = 1  # images per prompt (lv_samples for DRaFT-LV)
    latents: torch.Tensor | None = None  # what was decoded


# ---------------------------------------------------------------------------------- noise levels


def alpha_bar(scheduler, step_index: int) -> torch.Tensor:
    """alpha-bar (signal fraction) at step `step_index` of the scheduler's current timesteps.

    Sigma-parametrised schedulers (Euler, DPM-Solver++, ...) keep `sigmas` with one entry per
    timestep plus the final one, sigma^2 = (1 - alpha_bar) / alpha_bar; their timesteps may be floats,
    so they are indexed by step, never by `t`. Discrete schedulers index `alphas_cumprod` by `t`.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
        return 1.0 / (1.0 + sigmas[step_index].double() ** 2)
    return scheduler.alphas_cumprod[int(scheduler.timesteps[step_index])].double()


def to_epsilon(prediction_type: str, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The noise implied by a model output (epsilon, v or sample prediction) on the variance-preserving
    latent `x_t` the UNet saw, at noise level `alpha` (alpha-bar)."""
    if prediction_type == "epsilon":
        return output
    a = alpha.to(x_t.device, x_t.dtype)
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    return (x_t - a.sqrt() * output) / (1 - a).sqrt()


def to_x0(prediction_type: str, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The clean latent implied by a model output, in the same terms as `to_epsilon`."""
    a = alpha.to(x_t.device, x_t.dtype)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * output
    return output


# ---------------------------------------------------------------------------------- model calls


def guided_prediction(unet, x_t: torch.Tensor, t, cond: PromptEmbeds, guidance_scale: float) -> torch.Tensor:
    """One UNet call on the [uncond, cond] batch at the (scaled) model input x_t, combined with
    classifier-free guidance."""
    out = unet(
        torch.cat([x_t, x_t]) if cond.guided else x_t,
        t,
        encoder_hidden_states=cond.encoder_hidden_states,
        added_cond_kwargs=cond.added_cond_kwargs,
        return_dict=False,
    )[0]
    if not cond.guided:
        return out
    uncond, text = out.chunk(2)
    return uncond + guidance_scale * (text - uncond)


def _reference_eps(raw_unet, no_grad_unet, x_t: torch.Tensor, t, cond: PromptEmbeds, guidance_scale: float,
                   kind: str, alpha: torch.Tensor) -> torch.Tensor:
    """The DRaFT+ reference at a graded step: the guided eps of the same UNet with its adapters disabled,
    without gradient."""
    with torch.no_grad(), adapters_disabled(raw_unet), record_function("draftplus/reference_pass"):
        reference = guided_prediction(no_grad_unet, x_t, t, cond, guidance_scale)
        return to_epsilon(kind, reference, x_t, alpha)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], differentiable, un-normalised as the diffusers pipelines do."""
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, device=latents.device).view(1, -1, 1, 1)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
        if getattr(config, "shift_factor", None):
            latents = latents + config.shift_factor
    # An fp32 VAE under mixed precision was upcast on purpose (SDXL's VAE overflows in fp16):
    # autocast would put its convolutions back in half precision.
    upcast = vae.dtype == torch.float32 and torch.is_autocast_enabled(latents.device.type)
    with torch.autocast(latents.device.type, enabled=False) if upcast else contextlib.nullcontext():
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def _step_kwargs(scheduler, eta: float, generator) -> dict[str, Any]:
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


# ---------------------------------------------------------------------------------- the rollout


def rollout(
    unet,
    scheduler,
    vae,
    cond: PromptEmbeds,
    noise: torch.Tensor,
    config: RolloutConfig,
    *,
    raw_unet=None,
    no_grad_unet: Callable | None = None,
    with_reference: bool = True,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample images from `noise`, with gradients through the last K UNet calls and the VAE decoder.

    `unet` is the model that receives gradients (it may be wrapped, e.g. by DDP); `raw_unet` is the
    same model unwrapped, used for everything that needs no gradient: the step prefix and the
    reference pass with adapters disabled (wrapped calls there would only add DDP overhead).
    `no_grad_unet`, when given, makes those no-grad calls instead of `raw_unet` (a compiled wrapper of
    it: `utils.compile.CompiledUNet`); adapters are still switched on `raw_unet`.
    """
    raw_unet = raw_unet if raw_unet is not None else unet
    no_grad_unet = no_grad_unet if no_grad_unet is not None else raw_unet
    scheduler.set_timesteps(config.num_inference_steps, device=noise.device)
    if hasattr(scheduler, "set_begin_index"):  # sigma schedulers: else the first step searches for its index
        scheduler.set_begin_index(0)
    timesteps = scheduler.timesteps  # on the device, for the UNet
    # The scheduler indexes its (host) tables by t: host numbers spare a device-to-host sync per step.
    host_timesteps = timesteps.tolist()
    n = len(timesteps)  # PNDM's PLMS schedule has T + 1 entries: count UNet calls, not T
    step_kwargs = _step_kwargs(scheduler, config.eta, generator)
    kind = scheduler.config.prediction_type
    latents = noise * scheduler.init_noise_sigma
    graded_from = n if config.lv_samples else n - config.truncation_steps

    def next_latents(prediction, i, latents, x_t):
        if i == n - 1 and config.final_latent == "x0":
            return to_x0(kind, prediction, x_t, alpha_bar(scheduler, i))
        return scheduler.step(prediction, host_timesteps[i], latents, **step_kwargs, return_dict=False)[0]

    with torch.no_grad(), record_function("draftplus/no_grad_prefix"):
        for i in range(graded_from):
            x_t = scheduler.scale_model_input(latents, host_timesteps[i])
            prediction = guided_prediction(no_grad_unet, x_t, timesteps[i], cond, config.guidance_scale)
            latents = next_latents(prediction, i, latents, x_t)

    if config.lv_samples:
        return _lv_graded_step(unet, raw_unet, no_grad_unet, scheduler, vae, cond, latents, config, with_reference,
                               generator)

    out = Rollout(images=None)
    for i in range(graded_from, n):
        t = timesteps[i]
        x_t = scheduler.scale_model_input(latents, host_timesteps[i])
        with record_function("draftplus/graded_step"):
            prediction = guided_prediction(unet, x_t, t, cond, config.guidance_scale)
        a = alpha_bar(scheduler, i)
        out.eps.append(to_epsilon(kind, prediction, x_t, a))
        if with_reference:
            out.eps_ref.append(_reference_eps(raw_unet, no_grad_unet, x_t, t, cond, config.guidance_scale, kind, a))
        latents = next_latents(prediction, i, latents, x_t)
    with record_function("draftplus/vae_decode"):
        out.images, out.latents = decode(vae, latents), latents
    return out


def _lv_graded_step(unet, raw_unet, no_grad_unet, scheduler, vae, cond, x0, config, with_reference,
                    generator) -> Rollout:
    """DRaFT-LV: re-noise the stop-grad x0 n times to the last step's noise level, denoise each
    with one graded step and decode its x0 prediction. The n samples share one batched UNet call.

    The re-noised latent is built in the UNet's own (variance-preserving) terms,
    x_t = sqrt(a) x0 + sqrt(1 - a) noise, so it is the same for every sampler parametrisation."""
    n, last = config.lv_samples, len(scheduler.timesteps) - 1
    t, a = scheduler.timesteps[last], alpha_bar(scheduler, last)
    kind = scheduler.config.prediction_type
    x0 = x0.repeat_interleave(n, dim=0)
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    a_ = a.to(x0.device, x0.dtype)
    x_t = a_.sqrt() * x0 + (1 - a_).sqrt() * noise
    cond = cond.repeat_interleave(n)
    with record_function("draftplus/graded_step"):
        prediction = guided_prediction(unet, x_t, t, cond, config.guidance_scale)
    out = Rollout(images=None, eps=[to_epsilon(kind, prediction, x_t, a)], repeats=n)
    if with_reference:
        out.eps_ref.append(_reference_eps(raw_unet, no_grad_unet, x_t, t, cond, config.guidance_scale, kind, a))
    with record_function("draftplus/vae_decode"):
        out.latents = to_x0(kind, prediction, x_t, a)
        out.images = decode(vae, out.latents)
    return out


def kl_penalty(eps: Sequence[torch.Tensor], eps_ref: Sequence[torch.Tensor]) -> torch.Tensor:
    """DRaFT+ penalty: mean over graded steps of mean over (B, C, H, W) of (eps - eps_ref)^2."""
    return torch.stack([(e.float() - r.float()).pow(2).mean() for e, r in zip(eps, eps_ref, strict=True)]).mean()


# ---------------------------------------------------------------------------------- the DRaFT+ step


@dataclass(kw_only=True)
class Models:
    family: Any  # utils.family.ModelFamily: the frozen text encoders, and the prompt conditioning
    unet: torch.nn.Module  # the LoRA UNet as the optimiser sees it (possibly DDP-wrapped): gradients flow here
    raw_unet: torch.nn.Module  # the same module unwrapped: no-grad prefix and adapters-off reference
    vae: torch.nn.Module
    scheduler: Any  # the training rollout's sampler (its own instance: validation uses another)
    no_grad_unet: Callable | None = None  # raw_unet's no-grad calls, compiled (--compile; utils.compile)


def draftplus_step(models: Models, reward_fn: Callable, prompts: list[str], noise: torch.Tensor,
                   config: RolloutConfig, kl_coeff: float, negative_prompt: str = "",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss = -mean R(x0) + kl_coeff * mean_k mean (eps_theta - eps_ref)^2, for one batch of prompts.

    Returns (loss, per-image rewards, penalty); the last two detached, for logging."""
    height, width = (s * models.family.vae_scale_factor for s in noise.shape[-2:])
    cond = models.family.encode_prompts(prompts, negative_prompt, config.guided, height=height, width=width)
    sample = rollout(models.unet, models.scheduler, models.vae, cond, noise, config,
                     raw_unet=models.raw_unet, no_grad_unet=models.no_grad_unet, with_reference=kl_coeff > 0,
                     generator=generator)
    # The reward runs in its own dtype (--reward_dtype, fp32 by default), not under the UNet's autocast.
    with record_function("draftplus/reward"), torch.autocast(noise.device.type, enabled=False):
        rewards = reward_fn(sample.images, [p for p in prompts for _ in range(sample.repeats)])
    penalty = kl_penalty(sample.eps, sample.eps_ref) if kl_coeff > 0 else rewards.new_zeros(())
    loss = -rewards.mean() + kl_coeff * penalty
    return loss, rewards.detach(), penalty.detach()
