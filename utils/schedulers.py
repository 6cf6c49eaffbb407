"""The samplers the trainer and the evaluator offer, by short name (diffusers scheduler class names)."""

from __future__ import annotations

from utils.errors import UserError

SCHEDULERS: dict[str, str | None] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",  # DPM-Solver++ 2M with diffusers' defaults
    "euler": "EulerDiscreteScheduler",
    "model": None,  # whatever the model ships in its scheduler/ folder
}

# Schedulers whose `step()` the training rollout is tested with (every one on epsilon and v-prediction
# models): one UNet call per step, a noise level per step that `utils.rollout.alpha_bar` can read, and
# an update that autograd can follow. `--scheduler model` must resolve to one of these.
ROLLOUT_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "PNDMScheduler",  # SD 1.x's own (PLMS)
)


class SchedulerError(UserError, ValueError):
    """A sampler that cannot serve a training rollout; the message is one line for the user."""


def scheduler_class_name(choice: str, model_scheduler: str | None) -> str:
    """The diffusers class for `--scheduler choice`; `model_scheduler` is the model's own class name."""
    name = SCHEDULERS[choice] or model_scheduler
    if name is None:
        raise SchedulerError("the model has no scheduler config; choose --scheduler ddim, dpmsolver, euler or ddpm")
    if name not in ROLLOUT_SCHEDULERS:
        raise SchedulerError(
            f"--scheduler {choice}: {name} cannot serve a training rollout (supported: {', '.join(ROLLOUT_SCHEDULERS)}); "
            "choose --scheduler ddim, ddpm, dpmsolver or euler")
    return name
