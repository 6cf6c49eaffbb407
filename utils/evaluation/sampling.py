"""How the evaluator samples a model: the caller's settings, else those the LoRAs' training run recorded
(utils/evaluation/run_settings.py), else the family's defaults; checked as the trainer checks them, before any
model loads."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from utils.evaluation.run_settings import SAMPLING_SETTINGS, SIZE_SETTINGS, settings_of_runs
from utils.evaluation.settings import EvaluationError, python_option
from utils.families.base import ModelFamily, family_option_names
from utils.rollout.schedulers import SCHEDULERS


def family_of_model(model: str) -> type[ModelFamily] | None:
    """The model's family class, read from its model_index.json; None where it cannot be read (the model then
    fails to load, with its own message)."""
    from utils.families import UnsupportedModelError, family_of

    try:
        return family_of(model)
    except (UnsupportedModelError, OSError, ValueError):
        return None


def denoiser_config_of(model: str) -> dict | None:
    """The model's denoiser config (no weights); None where it cannot be read."""
    from utils.families import read_denoiser_config

    try:
        return read_denoiser_config(model)
    except (OSError, ValueError):
        return None


def check_sampler(family: type[ModelFamily], scheduler: str, eta: float,
                  spell: Callable[[str], str] = python_option) -> None:
    """EvaluationError when the family's pipeline cannot sample with `scheduler` (a short name) or takes no `eta`
    (the flow-matching pipelines sample with their own sampler, which has none)."""
    name = SCHEDULERS[scheduler]
    if name is not None and name not in family.rollout_schedulers:
        raise EvaluationError(f"{spell('scheduler')} {scheduler}: {family.pipeline_class_name} models sample with "
                              f"{' or '.join(family.rollout_schedulers)}; use {spell('scheduler')} model")
    if eta and "eta" not in inspect.signature(family.pipeline_class().__call__).parameters:
        raise EvaluationError(f"{spell('eta')} {eta}: {family.pipeline_class_name} takes no eta (its sampler is "
                              f"deterministic); leave it out")


def check_family_options(family: type[ModelFamily], denoiser_config: dict | None, settings: Mapping[str, Any]) -> None:
    """EvaluationError with the trainer's line (`ModelFamily.option_problem`) for a setting the family refuses:
    another family's option, a size off its grid, guidance for a model that takes none, FLUX's negative prompt
    without true CFG. A value equal to the family's default is one the trainer sets itself: never refused."""
    defaults = family.rollout_defaults(denoiser_config)
    named = ("guidance_scale", "negative_prompt", *family_option_names())
    args = SimpleNamespace(**{name: None if settings.get(name) == defaults.get(name, ...) else settings.get(name)
                              for name in named},
                           **{name: settings.get(name) or 0 for name in SIZE_SETTINGS})  # 0: on every grid
    if (problem := family.option_problem(args, denoiser_config)) is not None:
        raise EvaluationError(problem)


def with_family_defaults(family: type[ModelFamily] | None, model: str, settings: Mapping[str, Any],
                         denoiser_config: dict | None = None) -> dict[str, Any]:
    """`settings` (`EvalSettings` fields, and family options by name) with the sampler settings left out (or
    None) taken from the family's evaluation defaults (SD/SDXL: ddim, 20 steps, guidance 7.5; SD3/FLUX: their own
    sampler with the trainer's steps and guidance), and the family's options gathered in `family_options` (the
    trainer's defaults for those left out: FLUX.1-schnell's 256 T5 tokens)."""
    out = {k: v for k, v in settings.items() if k not in family_option_names()}
    given = {k: v for k, v in settings.items() if k in family_option_names() and v is not None}
    if family is None:
        out["family_options"] = given
        return {k: v for k, v in out.items() if v is not None or k not in ("scheduler", "num_inference_steps",
                                                                            "guidance_scale", "eta")}
    denoiser_config = denoiser_config if denoiser_config is not None else denoiser_config_of(model)
    for key, value in family.evaluation_defaults(denoiser_config).items():
        if out.get(key) is None:
            out[key] = value
    if out.get("eta") is None:
        out.pop("eta", None)  # EvalSettings' own: 0
    defaults = family.evaluation_options(denoiser_config)
    out["family_options"] = {name: given.get(name, defaults[name]) for name in family.options}
    return out


def resolve_settings(model: str, family: type[ModelFamily] | None, settings: Mapping[str, Any],
                     loras: Sequence[str | Path], spell: Callable[[str], str] = python_option,
                     log: Callable[[str], None] = lambda _: None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The evaluation's settings (`EvalSettings` fields) from the caller's `settings`, the recorded settings of
    the runs that trained `loras` for those left out (logged: the LoRAs are sampled as they trained), and the
    family's defaults; checked as the trainer checks them. Also returns what was taken from the runs."""
    recorded, sources = settings_of_runs(loras, settings, spell)
    if family is not None:  # a run's options of another family do not apply to this model (its load says so)
        recorded = {k: v for k, v in recorded.items() if k in SAMPLING_SETTINGS or k in family.options}
    if recorded:
        shown = ", ".join(f"{k} {v}" for k, v in recorded.items())
        log(f"sampled as the LoRAs were trained ({', '.join(map(str, sources))}): {shown}; "
            "a setting given here overrides its run's")
    merged = {**settings, **recorded}
    if family is None:
        return with_family_defaults(None, model, merged), recorded
    denoiser_config = denoiser_config_of(model)
    check_family_options(family, denoiser_config, merged)
    return with_family_defaults(family, model, merged, denoiser_config), recorded
