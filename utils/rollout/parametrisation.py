"""How a denoiser's output relates to the noise and the clean latent: the two parametrisations the rollout asks.

The training rollout (`utils.rollout.loop`) is one loop for every model family and sampler. What depends on the
way a model was trained is asked of a small object the family builds for each rollout:

- `timesteps` (one per denoiser call) and `len()` (the number of calls);
- `initial_latents(noise)`: the first latent, from unit Gaussian noise;
- `model_input(latents, i)`: what the denoiser sees at step i;
- `step(prediction, i, latents)`: the sampler's update to the next latent;
- `to_epsilon(prediction, x_t, i)` / `to_x0(prediction, x_t, i)`: the noise and the clean latent the
  prediction implies on the input x_t (the DRaFT+ penalty compares the first, the last step decodes the second);
- `renoise(x0, noise, i)`: x0 noised to step i's level, as a denoiser input (DRaFT-LV).

`VariancePreserving`: the UNet families (SD 1.x/2.x, SDXL), x_t = sqrt(a) x0 + sqrt(1 - a) eps with a the
alpha-bar of the step, epsilon / v / sample predictions, any diffusers sampler (its own `step()`).
`RectifiedFlow`: the flow-matching transformers (SD3/SD3.5, FLUX.1), x_sigma = (1 - sigma) x0 + sigma eps
and a velocity prediction v = eps - x0, sampled by the pipeline's own flow-matching sampler (Euler steps
over the pipeline's sigmas).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

# ---------------------------------------------------------------------------------- variance preserving


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


def _step_kwargs(scheduler, eta: float, generator) -> dict[str, Any]:
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


class VariancePreserving:
    """A diffusers sampler over a UNet trained on x_t = sqrt(a) x0 + sqrt(1 - a) eps (SD 1.x/2.x, SDXL).

    The sampler's own `set_timesteps`, `scale_model_input` and `step` do the sampling; everything that
    depends on the noise level goes through `alpha_bar`, which reads it from discrete (DDIM, DDPM, PNDM)
    and sigma-parametrised (Euler, DPM-Solver++) schedulers alike. Predictions are converted in the
    variance-preserving terms of the scaled model input, so every sampler and prediction type agrees.
    """

    def __init__(self, scheduler, num_inference_steps: int, device: torch.device | str, eta: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        scheduler.set_timesteps(num_inference_steps, device=device)
        if hasattr(scheduler, "set_begin_index"):  # sigma schedulers: else the first step searches for its index
            scheduler.set_begin_index(0)
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps  # on the device, for the UNet
        # The scheduler indexes its (host) tables by t: host numbers spare a device-to-host sync per step.
        self.host_timesteps = self.timesteps.tolist()
        self.prediction_type = scheduler.config.prediction_type
        self.step_kwargs = _step_kwargs(scheduler, eta, generator)

    def __len__(self) -> int:
        return len(self.timesteps)  # PNDM's PLMS schedule has T + 1 entries: count denoiser calls, not T

    def alpha(self, i: int) -> torch.Tensor:
        return alpha_bar(self.scheduler, i)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * self.scheduler.init_noise_sigma

    def model_input(self, latents: torch.Tensor, i: int) -> torch.Tensor:
        return self.scheduler.scale_model_input(latents, self.host_timesteps[i])

    def step(self, prediction: torch.Tensor, i: int, latents: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(prediction, self.host_timesteps[i], latents, **self.step_kwargs,
                                   return_dict=False)[0]

    def to_epsilon(self, prediction: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
        return to_epsilon(self.prediction_type, prediction, x_t, self.alpha(i))

    def to_x0(self, prediction: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
        return to_x0(self.prediction_type, prediction, x_t, self.alpha(i))

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """sqrt(a) x0 + sqrt(1 - a) noise: the UNet's own input at step i, whatever the sampler's scaling."""
        a = self.alpha(i).to(x0.device, x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


# ---------------------------------------------------------------------------------- rectified flow


class RectifiedFlow:
    """A flow-matching pipeline's sampler (SD3/SD3.5, FLUX.1) over its own sigmas: the model predicts the
    velocity v = eps - x0 on x_sigma = (1 - sigma) x0 + sigma eps.

    The family sets the scheduler's timesteps as its pipeline does (SD3's static shift, FLUX's dynamic one);
    the sampler's own `step()` advances (`FlowMatchEulerDiscreteScheduler`: x + (sigma_next - sigma) v, summed
    in fp32 and cast back to v's dtype). x0 = x - sigma v is computed the same way: it is the Euler step to
    sigma 0, so at the last step, whose next sigma is 0, the x0 prediction and the sampler's final sample
    are the same latent.
    """

    def __init__(self, scheduler, generator: torch.Generator | None = None) -> None:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps  # sigma * 1000, as the pipelines pass them
        self.sigmas = scheduler.sigmas  # [T + 1], the last one 0
        if len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError(f"expected one sigma per timestep and a final one, got {len(self.sigmas)} for "
                             f"{len(self.timesteps)} timesteps")
        self.step_kwargs = _step_kwargs(scheduler, 0.0, generator)

    def __len__(self) -> int:
        return len(self.timesteps)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise  # sigma_max = 1: the first latent is the noise itself

    def model_input(self, latents: torch.Tensor, i: int) -> torch.Tensor:
        return latents

    def step(self, prediction: torch.Tensor, i: int, latents: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(prediction, self.timesteps[i], latents, **self.step_kwargs, return_dict=False)[0]

    def to_epsilon(self, prediction: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
        """eps = x_sigma + (1 - sigma) v, in fp32."""
        return x_t.float() + (1 - self.sigmas[i]) * prediction

    def to_x0(self, prediction: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
        """x0 = x_sigma - sigma v, computed as the Euler step to sigma 0 (fp32 sum, cast back)."""
        return (x_t.float() - self.sigmas[i] * prediction).to(prediction.dtype)

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """(1 - sigma) x0 + sigma noise at step i's sigma."""
        sigma = self.sigmas[i]
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)
