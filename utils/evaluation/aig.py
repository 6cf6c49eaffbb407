"""Annealed importance guidance (AIG): move a trained LoRA along the reward-diversity curve at sampling time.

Jena et al. ("Elucidating Optimal Reward-Diversity Tradeoffs in Text-to-Image Diffusion Models", WACV 2025)
mix the base model's and the fine-tuned model's noise predictions with a weight that grows over the
denoising trajectory: at step i of T (i = 0 is the noisiest)

    eps = (1 - w_i) * eps_base + w_i * eps_lora

so the early steps, which fix composition and hence diversity, follow the base model, and the late
steps, which fix the details the reward likes, follow the LoRA. Schedules (`weight_schedule`):

    base       w = 0                 (the base model)
    lora       w = 1                 (the LoRA)
    linear     w = i / T
    power_P    w = (i / T) ** P      e.g. power_2
    step_F     w = 1 if i / T >= F   e.g. step_0.6

It works on any ordinary diffusers SD / SDXL / SD3 / FLUX pipeline that has the LoRA loaded
(`pipe.load_lora_weights`):

    from utils.evaluation.aig import aig_pipeline
    images = aig_pipeline(pipe, "linear")("a photo of a cat", num_inference_steps=30).images

or, for several calls, `with annealed_guidance(pipe, "power_2"): pipe(...)`. While it is active, every
call of the pipeline's denoiser (UNet or transformer) runs twice under no_grad, once with the LoRA adapters
disabled and once with them as they are (set_adapters weights included), and returns the mix. Everything
else is the pipeline's own: its scheduler (any), its classifier-free guidance (linear in the denoiser
output, so mixing before it is mixing after it; FLUX's true CFG alike), its conditioning. The raw output is
mixed: for v- or sample-prediction models that is the same as mixing eps, because the conversion to eps is
affine in the output with coefficients that do not depend on the model; for the flow-matching transformers
(velocity v, eps = x + (1 - sigma) v) a convex mix of the two velocities is the same mix of the noises they
imply, so the wrapper is the same.

The step of a denoiser call is read from its timestep (as the pipeline's scheduler counts it:
`ModelFamily.pipeline_timestep`, which undoes FLUX's division by 1000): its rank among the scheduler's
distinct timesteps, and T their number. For first-order samplers (DDIM, DDPM, Euler, DPM-Solver++,
UniPC, the flow-matching Euler, ...) that is the pipeline's step index and T = num_inference_steps;
PNDM's repeated timestep and Heun's two evaluations per step share their step's weight. Stateless, so it
holds across pipeline calls and batch sizes.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from utils.errors import UserError

Schedule = Callable[[int, int], float]  # (step i, number of steps T) -> weight of the LoRA prediction
SCHEDULE_HELP = "base, lora, linear, power_P (e.g. power_2), step_F (e.g. step_0.6)"


class AIGError(UserError, ValueError):
    """A bad schedule name, or a pipeline AIG cannot run on; the message is one line for the user."""


def weight_schedule(name: str) -> Schedule:
    """The schedule `name` as a function (i, T) -> w_i in [0, 1]."""
    if name == "base":
        return lambda i, n: 0.0
    if name == "lora":
        return lambda i, n: 1.0
    if name == "linear":
        return lambda i, n: i / n
    match = re.fullmatch(r"(power|step)_(\d+(?:\.\d*)?|\.\d+)", name)
    if match is None:
        raise AIGError(f"unknown AIG schedule {name!r}; choose one of {SCHEDULE_HELP}")
    kind, value = match.group(1), float(match.group(2))
    if kind == "power":
        if not 0 < value < math.inf:
            raise AIGError(f"AIG schedule {name!r}: the power must be > 0")
        return lambda i, n: (i / n) ** value
    if value > 1:
        raise AIGError(f"AIG schedule {name!r}: the step fraction must be in [0, 1]")
    return lambda i, n: 1.0 if i / n >= value else 0.0


def check_schedule(name: str) -> str:
    """`name` if it is a valid schedule, else AIGError (for argument checks before any model loads)."""
    weight_schedule(name)
    return name


def schedule_weights(schedule: str | Schedule, num_steps: int) -> list[float]:
    """w_0 ... w_{T-1} of a schedule over `num_steps` steps."""
    fn = weight_schedule(schedule) if isinstance(schedule, str) else schedule
    return [float(fn(i, num_steps)) for i in range(num_steps)]


def step_position(timesteps: torch.Tensor, t: torch.Tensor | float | int) -> tuple[int, int]:
    """(i, T) of a denoiser call at timestep `t` in a scheduler's `timesteps`: the rank of `t` among the
    distinct timesteps (in order) and their number. Timesteps may be floats (Euler): compared by value."""
    distinct = torch.unique_consecutive(timesteps.detach().flatten().cpu().double())
    value = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
    hits = torch.nonzero(torch.isclose(distinct, torch.tensor(value, dtype=torch.float64), rtol=0, atol=1e-4))
    if len(hits) == 0:
        raise RuntimeError(f"AIG: timestep {value} is not one of the scheduler's timesteps; "
                           "was the pipeline's scheduler replaced during the call?")
    return int(hits[0, 0]), len(distinct)


def _lora_layers(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]


def _family(pipe: Any):
    """The pipeline's family class: where its denoiser is, and how its calls' timesteps count."""
    from utils.families import UnsupportedModelError, family_for_class_name

    try:
        return family_for_class_name(type(pipe).__name__)
    except UnsupportedModelError as e:
        raise AIGError(f"AIG: {e}") from None


class AnnealedGuidance:
    """Patches the pipeline's denoiser's `forward` so that each call returns (1 - w) * base + w * lora (see the
    module doc).

    `weights_used` records (i, T, w) for every denoiser call while active: what the schedule did.
    Use it as a context manager; `aig_pipeline` wraps one pipeline call in it.
    """

    def __init__(self, pipe: Any, schedule: str | Schedule) -> None:
        self.pipe = pipe
        self.schedule = weight_schedule(schedule) if isinstance(schedule, str) else schedule
        self.weights_used: list[tuple[int, int, float]] = []
        self._saved: dict[str, Any] | None = None

    def __enter__(self) -> AnnealedGuidance:
        denoiser = _family(self.pipe).denoiser_of(self.pipe)
        layers = _lora_layers(denoiser)
        if not layers:
            raise AIGError("AIG needs a LoRA in the pipeline's denoiser: call pipe.load_lora_weights(...) first")
        if any(layer.disable_adapters for layer in layers):
            raise AIGError("AIG needs the LoRA enabled: the denoiser's adapters are disabled (pipe.enable_lora())")
        if self._saved is not None:
            raise RuntimeError("this AnnealedGuidance is already active")
        # An instance attribute `forward` may already be there (accelerate's offload hooks put one):
        # keep it, wrap it, and put it back on exit.
        # Toggling peft adapters also sets requires_grad on them: put the flags back as they were.
        self._saved = {"had_own": "forward" in denoiser.__dict__, "own": denoiser.__dict__.get("forward"),
                       "requires_grad": [(p, p.requires_grad) for layer in layers for p in layer.parameters()]}
        inner = denoiser.forward
        denoiser.forward = self._wrap(denoiser, inner)
        return self

    def __exit__(self, *exc) -> None:
        denoiser, saved = _family(self.pipe).denoiser_of(self.pipe), self._saved
        self._saved = None
        for p, flag in saved["requires_grad"]:
            p.requires_grad_(flag)
        if saved["had_own"]:
            denoiser.forward = saved["own"]
        else:
            del denoiser.forward

    def _wrap(self, denoiser: torch.nn.Module, inner: Callable) -> Callable:
        from utils.lora import adapters_disabled

        family = _family(self.pipe)

        def forward(*args, **kwargs):
            # UNets are called with (sample, timestep, ...), the transformers with keywords
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            i, n = step_position(self.pipe.scheduler.timesteps, family.pipeline_timestep(self.pipe, timestep))
            w = float(self.schedule(i, n))
            self.weights_used.append((i, n, w))
            with torch.no_grad():
                if w == 1.0:  # exactly the LoRA pipeline: one pass, nothing mixed
                    return inner(*args, **kwargs)
                with adapters_disabled(denoiser):
                    base = inner(*args, **kwargs)
                if w == 0.0:  # exactly the base pipeline
                    return base
                lora = inner(*args, **kwargs)
            return _replace_first(lora, _mix(_first(base), _first(lora), w))

        return forward


def _mix(base, lora, w: float):
    """(1 - w) base + w lora in fp32, in lora's dtype; image by image where the denoiser returns a list of per-image
    outputs (a transformer that takes and returns lists of differently sized images)."""
    if isinstance(lora, list | tuple):
        return [_mix(b, x, w) for b, x in zip(base, lora, strict=True)]
    return ((1 - w) * base.float() + w * lora.float()).to(lora.dtype)


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _replace_first(output, tensor: torch.Tensor):
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    return output.__class__(sample=tensor)


@contextlib.contextmanager
def annealed_guidance(pipe: Any, schedule: str | Schedule) -> Iterator[AnnealedGuidance]:
    """`with annealed_guidance(pipe, "linear"): images = pipe(...).images` (see the module doc)."""
    with AnnealedGuidance(pipe, schedule) as aig:
        yield aig


def aig_pipeline(pipe: Any, schedule: str | Schedule) -> Callable[..., Any]:
    """`pipe`, called with AIG: `aig_pipeline(pipe, "power_2")(prompt, ...)` takes the pipeline's arguments."""
    weight_schedule(schedule) if isinstance(schedule, str) else None  # bad names fail here, not at call time

    def call(*args, **kwargs):
        with AnnealedGuidance(pipe, schedule):
            return pipe(*args, **kwargs)

    return call
