"""The evaluator's settings: how every row is sampled and scored, and the resume fingerprint they define.

`EvalSettings` holds every setting of `utils.evaluation.evaluate.evaluate`. Its fields are the fingerprint that
decides whether rows already in an output directory can be reused, except the few listed in
`EvalSettings.NOT_IN_FINGERPRINT`, which change how the work is done but not its numbers: a new field is
part of the fingerprint unless it is added there on purpose.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from utils.errors import UserError
from utils.evaluation.diversity import DEFAULT_DINO_MODEL, DIVERSITY_METRICS
from utils.rollout.schedulers import SCHEDULERS


class EvaluationError(UserError):
    """A problem with an evaluation the user can fix (missing weights, bad LoRA dir, other settings, ...)."""


# How a Python caller names what the command line calls --NAME, where the two differ.
_PYTHON_NAMES = {"lora": "loras", "lora_scale": "lora_scales", "mix": "mixes", "no_base": "include_base=False",
                 "overwrite": "overwrite=True", "pretrained_model_name_or_path": "model"}


def python_option(name: str) -> str:
    """An option as `evaluate(...)` takes it, for messages to Python callers: `overwrite` -> `overwrite=True`."""
    return _PYTHON_NAMES.get(name, name)


def cli_option(name: str) -> str:
    """An option as `python -m utils.evaluation` takes it: `overwrite` -> `--overwrite`."""
    return f"--{name}"


@dataclass(frozen=True)
class EvalSettings:
    """How every row of an evaluation is sampled and scored (the LoRAs and controls are the rows, not settings).

    `model`: the base pipeline (hub id, local dir, or `toy`); `prompts`: the prompts, in order; `reward`:
    a spec for `rewards.build_reward` (or the name of a callable reward) with `reward_options`; image
    (prompt i, seed j) gets a seed derived from (`seed`, i, j), `seeds_per_prompt` >= 2 per prompt; the
    sampler: `scheduler`, `num_inference_steps`, `guidance_scale`, `eta`, `negative_prompt`, the model family's
    own options (`family_options`: {name: value} of `ModelFamily.options`, e.g. FLUX's T5 length), size
    (`resolution`, or `height` x `width`; None: the model's), `dtype`; diversity: `diversity_metric`
    (and `diversity_model` for dino). Outside the fingerprint: `batch_size` (images per pipeline call),
    `device` (None: cuda if available) and `grid_prompts` (prompts shown in the sample grids).
    """

    model: str
    prompts: tuple[str, ...]
    reward: str = "redness"
    reward_options: Mapping[str, Any] = field(default_factory=dict)
    seeds_per_prompt: int = 4
    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    resolution: int | None = None
    height: int | None = None
    width: int | None = None
    scheduler: str = "ddim"
    eta: float = 0.0
    negative_prompt: str | None = None
    family_options: Mapping[str, Any] = field(default_factory=dict)  # the model family's own (ModelFamily.options)
    dtype: Any = "fp32"  # a torch.dtype or its name; kept as torch's name ("float32")
    diversity_metric: str = "lpips"
    diversity_model: str | None = None
    batch_size: int = 16
    device: Any = None
    grid_prompts: int = 0

    # Batching never changes an image (seeds are per image), the grids are pictures of the rows, and the
    # device changes the numbers only at rounding level: an evaluation may be resumed on another machine.
    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset({"batch_size", "device", "grid_prompts"})

    def __post_init__(self) -> None:
        from rewards import resolve_dtype

        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "prompts", tuple(self.prompts))
        set_(self, "reward_options", dict(self.reward_options or {}))
        set_(self, "family_options", dict(sorted((self.family_options or {}).items())))
        if self.seeds_per_prompt < 2:
            raise EvaluationError("seeds_per_prompt must be >= 2: diversity compares images of the same prompt")
        if not self.prompts:
            raise EvaluationError("no prompts to evaluate")
        if self.batch_size < 1:
            raise EvaluationError("batch_size must be >= 1")
        if self.scheduler not in SCHEDULERS:
            raise EvaluationError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.diversity_metric not in DIVERSITY_METRICS:
            raise EvaluationError(f"unknown diversity metric {self.diversity_metric!r}; "
                                  f"choose one of {', '.join(DIVERSITY_METRICS)}")
        try:
            set_(self, "dtype", str(resolve_dtype(self.dtype)).removeprefix("torch."))
        except ValueError as e:
            raise EvaluationError(str(e)) from e
        # Only dino has a model: for the others it is nothing, whatever was passed.
        set_(self, "diversity_model",
             (self.diversity_model or DEFAULT_DINO_MODEL) if self.diversity_metric == "dino" else None)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def fingerprint(self) -> dict[str, Any]:
        """Every field that the numbers depend on, as JSON values: rows of an earlier run are reused only
        when this is equal. The prompts enter as their hash and number."""
        fp = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.NOT_IN_FINGERPRINT}
        prompts = fp.pop("prompts")
        fp["prompts_sha256"] = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
        fp["num_prompts"] = len(prompts)
        fp["reward_options"] = json.dumps(fp["reward_options"], sort_keys=True, default=str)
        if fp["family_options"]:
            fp["family_options"] = json.dumps(fp["family_options"], sort_keys=True, default=str)
        else:  # a family without options (SD, SDXL): results.json written before the field existed still resume
            del fp["family_options"]
        return fp

    def record(self) -> dict[str, Any]:
        """The settings as JSON values, for results.json (prompts by number, not text)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["prompts"] = len(self.prompts)
        out["device"] = None if self.device is None else str(self.device)
        return json.loads(json.dumps(out, default=str))
