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

# Schedulers whose `step()` the UNet families' training rollout is tested with (every one on epsilon and
# v-prediction models): one UNet call per step, a noise level per step that `utils.rollout.parametrisation.alpha_bar`
# can read, and an update that autograd can follow. `--scheduler model` must resolve to one of these (the
# flow-matching families step their pipeline's own FlowMatchEulerDiscreteScheduler: `utils.families`).
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


def scheduler_class_name(choice: str, model_scheduler: str | None,
                         allowed: tuple[str, ...] = ROLLOUT_SCHEDULERS) -> str:
    """The diffusers class for `--scheduler choice`; `model_scheduler` is the model's own class name, `allowed`
    the samplers its family's rollout can step (`ModelFamily.rollout_schedulers`)."""
    name = SCHEDULERS[choice] or model_scheduler
    choices = [short for short, cls in SCHEDULERS.items() if cls in allowed]
    if model_scheduler in allowed:
        choices.append("model")
    hint = "choose --scheduler " + (", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0])
    if name is None:
        raise SchedulerError(f"the model has no scheduler config; {hint}")
    if name not in allowed:
        raise SchedulerError(
            f"--scheduler {choice}: {name} cannot serve a training rollout (supported: {', '.join(allowed)}); {hint}")
    return name
