"""The samplers the trainer and the evaluator offer, by short name (diffusers scheduler class names).

Kept free of heavy imports: the trainer validates `--scheduler` before any library is loaded.
"""

SCHEDULERS: dict[str, str | None] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "model": None,  # whatever the model ships in its scheduler/ folder
}
VARIANCE_EXPLODING = ("euler",)  # latents are x0 + sigma * eps: DRaFT-LV's re-noising assumes VP
