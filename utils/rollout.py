"""The differentiable sampling loop of DRaFT / DRaFT+.

`StableDiffusionPipeline.__call__` runs under `no_grad`, so training needs its own loop over the
scheduler's `step()`: the first T-K steps without autograd (they keep no activations, so memory
does not grow with T), the last K with gradients into the LoRA weights. At every graded step the
same UNet with its adapters disabled gives the reference prediction for the DRaFT+ penalty.

Model-specific conditioning (SD 1.x/2.x one text encoder; SDXL pooled embeddings and time ids)
lives in `PromptEmbeds`, so the loop itself is the same for every UNet-based model.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch.profiler import record_function

from utils.lora import adapters_disabled


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


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder, prompts: Sequence[str], negative_prompt: str = "", guided: bool = True
) -> PromptEmbeds:
    """SD 1.x/2.x text conditioning, computed once per batch (the text encoder is frozen)."""
    texts = ([negative_prompt] * len(prompts) if guided else []) + list(prompts)
    ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    return PromptEmbeds(text_encoder(ids)[0], guided=guided)


@dataclass
class RolloutConfig:
    num_inference_steps: int = 50
    guidance_scale: float | Sequence[float] = 7.5  # a sequence gives one scale per step
    truncation_steps: int = 1  # K: how many final steps get gradients
    eta: float = 0.0
    lv_samples: int = 0  # DRaFT-LV: re-noised copies of x0 graded with one step each (0 = off)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on when any step's scale exceeds 1 (diffusers' convention)."""
        return max(self.guidance_at(i) for i in range(self.num_inference_steps)) > 1.0

    def guidance_at(self, step: int) -> float:
        if isinstance(self.guidance_scale, int | float):
            return float(self.guidance_scale)
        return float(self.guidance_scale[step])


@dataclass
class Rollout:
    images: torch.Tensor  # [N, 3, H, W] in [0, 1], differentiable w.r.t. the LoRA weights
    eps: list[torch.Tensor] = field(default_factory=list)  # guided noise prediction of each graded step
    eps_ref: list[torch.Tensor] = field(default_factory=list)  # same, adapters disabled; empty if unused
    repeats: int = 1  # images per prompt (lv_samples for DRaFT-LV)


def guided_prediction(unet, scheduler, latents, t, cond: PromptEmbeds, guidance_scale: float) -> torch.Tensor:
    """One UNet call on the [uncond, cond] batch, combined with classifier-free guidance."""
    model_input = torch.cat([latents, latents]) if cond.guided else latents
    model_input = scheduler.scale_model_input(model_input, t)
    out = unet(
        model_input,
        t,
        encoder_hidden_states=cond.encoder_hidden_states,
        added_cond_kwargs=cond.added_cond_kwargs,
        return_dict=False,
    )[0]
    if not cond.guided:
        return out
    uncond, text = out.chunk(2)
    return uncond + guidance_scale * (text - uncond)


def predict_epsilon(scheduler, model_output, t, latents) -> torch.Tensor:
    """The noise eps implied by the model output (epsilon, v or sample prediction): the DRaFT+ penalty
    compares noise predictions whatever the model predicts. v and x0 relate to eps through the scaled
    latent the UNet saw (variance-preserving for every scheduler, sigma-parametrised ones included)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return model_output
    x_t = scheduler.scale_model_input(latents, t)
    alpha = scheduler.alphas_cumprod.to(x_t.device)[t].to(x_t.dtype)
    if kind == "v_prediction":
        return alpha.sqrt() * model_output + (1 - alpha).sqrt() * x_t
    return (x_t - alpha.sqrt() * model_output) / (1 - alpha).sqrt()


def predict_x0(scheduler, model_output, t, x_t) -> torch.Tensor:
    """x0 implied by the model output at noise level t (epsilon, v or sample prediction)."""
    alpha = scheduler.alphas_cumprod.to(x_t.device)[t].to(x_t.dtype)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - alpha).sqrt() * model_output) / alpha.sqrt()
    if kind == "v_prediction":
        return alpha.sqrt() * x_t - (1 - alpha).sqrt() * model_output
    return model_output


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], differentiable."""
    latents = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def _step_kwargs(scheduler, eta: float, generator) -> dict:
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def rollout(
    unet,
    scheduler,
    vae,
    cond: PromptEmbeds,
    noise: torch.Tensor,
    config: RolloutConfig,
    *,
    base_unet=None,
    with_reference: bool = True,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample images from `noise`, with gradients through the last K steps and the VAE decoder.

    `unet` is the model that receives gradients (it may be wrapped, e.g. by DDP); `base_unet` is the
    same model unwrapped, used for everything that needs no gradient: the T-K step prefix and the
    reference pass with adapters disabled (wrapped calls there would only add DDP overhead).
    """
    base_unet = base_unet if base_unet is not None else unet
    T, K = config.num_inference_steps, config.truncation_steps
    scheduler.set_timesteps(T, device=noise.device)
    timesteps = scheduler.timesteps
    step_kwargs = _step_kwargs(scheduler, config.eta, generator)
    latents = noise * scheduler.init_noise_sigma
    graded_from = T if config.lv_samples else T - K

    with torch.no_grad(), record_function("draftplus/no_grad_prefix"):
        for i, t in enumerate(timesteps[:graded_from]):
            eps = guided_prediction(base_unet, scheduler, latents, t, cond, config.guidance_at(i))
            latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]

    if config.lv_samples:
        return _lv_graded_step(unet, base_unet, scheduler, vae, cond, latents, config, with_reference, generator)

    out = Rollout(images=None)
    for i, t in enumerate(timesteps[graded_from:], start=graded_from):
        with record_function("draftplus/graded_step"):
            prediction = guided_prediction(unet, scheduler, latents, t, cond, config.guidance_at(i))
        out.eps.append(predict_epsilon(scheduler, prediction, t, latents))
        if with_reference:
            with torch.no_grad(), adapters_disabled(base_unet), record_function("draftplus/reference_pass"):
                reference = guided_prediction(base_unet, scheduler, latents, t, cond, config.guidance_at(i))
                out.eps_ref.append(predict_epsilon(scheduler, reference, t, latents))
        latents = scheduler.step(prediction, t, latents, **step_kwargs, return_dict=False)[0]
    with record_function("draftplus/vae_decode"):
        out.images = decode(vae, latents)
    return out


def _lv_graded_step(unet, base_unet, scheduler, vae, cond, x0, config, with_reference, generator) -> Rollout:
    """DRaFT-LV: re-noise the stop-grad x0 n times to the last step's noise level, denoise each
    with one graded step. The n samples share one batched UNet call."""
    n, last = config.lv_samples, len(scheduler.timesteps) - 1
    t = scheduler.timesteps[last]
    x0 = x0.repeat_interleave(n, dim=0)
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t.reshape(1))
    cond = cond.repeat_interleave(n)
    with record_function("draftplus/graded_step"):
        prediction = guided_prediction(unet, scheduler, x_t, t, cond, config.guidance_at(last))
    with record_function("draftplus/vae_decode"):
        out = Rollout(images=decode(vae, predict_x0(scheduler, prediction, t, x_t)),
                      eps=[predict_epsilon(scheduler, prediction, t, x_t)], repeats=n)
    if with_reference:
        with torch.no_grad(), adapters_disabled(base_unet), record_function("draftplus/reference_pass"):
            reference = guided_prediction(base_unet, scheduler, x_t, t, cond, config.guidance_at(last))
            out.eps_ref.append(predict_epsilon(scheduler, reference, t, x_t))
    return out


def kl_penalty(eps: Sequence[torch.Tensor], eps_ref: Sequence[torch.Tensor]) -> torch.Tensor:
    """DRaFT+ penalty: mean over graded steps of mean over (B, C, H, W) of (eps - eps_ref)^2."""
    return torch.stack([(e.float() - r.float()).pow(2).mean() for e, r in zip(eps, eps_ref, strict=True)]).mean()
