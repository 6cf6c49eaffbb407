"""What a run optimises, recorded in every checkpoint and compared when a run resumes.

A resume continues the same run only if it optimises the same thing: the reward and its options, the
DRaFT+ penalty weight, the prompts (their content, not only their source), and the rollout that makes
the graded images (sampler, T, K, eta, DRaFT-LV, the decoded latent, guidance, negative prompt, size).
Optimiser settings (learning rate, batch size, clipping, ...) are not part of it: changing them on
resume is how a run is tuned. A resume that changes the objective is refused with one line naming the
differences, unless `--allow_objective_change` says the change is meant; then it is recorded (from
which step, what changed) in the checkpoints, in `metrics.jsonl` and in the model card.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

# The arguments that define the objective, with the flag a user knows them by.
OBJECTIVE_FLAGS: dict[str, str] = {
    "reward": "--reward",
    "reward_options": "--reward_options",
    "kl_coeff": "--kl_coeff",
    "scheduler": "--scheduler",
    "num_inference_steps": "--num_inference_steps",
    "truncation_steps": "--truncation_steps",
    "eta": "--eta",
    "lv_samples": "--lv_samples",
    "final_latent": "--final_latent",
    "guidance_scale": "--guidance_scale",
    "true_cfg_scale": "--true_cfg_scale",
    "max_sequence_length": "--max_sequence_length",
    "cfg_normalization": "--cfg_normalization",
    "cfg_truncation": "--cfg_truncation",
    "negative_prompt": "--negative_prompt",
    "height": "--height",
    "width": "--width",
}
# The prompts are compared by content: the same prompts from a moved file are the same objective.
PROMPTS_KEY, PROMPTS_SOURCE_KEY = "prompts_sha256", "prompts"


def prompts_sha256(prompts: Sequence[str]) -> str:
    """The identity of a prompt list: sha256 of the prompts, in order."""
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in sorted(value.items())}
    return value if isinstance(value, int | float | str | bool | type(None)) else str(value)


def objective_of(args: Any, prompts: Sequence[str]) -> dict[str, Any]:
    """The run's objective, as checkpoints record it (JSON-able)."""
    objective = {name: jsonable(getattr(args, name)) for name in OBJECTIVE_FLAGS}
    objective[PROMPTS_SOURCE_KEY] = str(args.prompts)
    objective[PROMPTS_KEY] = prompts_sha256(prompts)
    return objective


def objective_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, list]:
    """{flag: [saved value, current value]} for every part of the objective that differs. Parts a
    checkpoint does not record (written before they were) are not compared."""
    changes: dict[str, list] = {}
    for name, flag in OBJECTIVE_FLAGS.items():
        if name in saved and jsonable(saved[name]) != jsonable(current[name]):
            changes[flag] = [saved[name], current[name]]
    if PROMPTS_KEY in saved and saved[PROMPTS_KEY] != current[PROMPTS_KEY]:
        before, after = saved.get(PROMPTS_SOURCE_KEY), current[PROMPTS_SOURCE_KEY]
        changes["--prompts"] = [before, after if after != before else f"{after} (its content changed)"]
    return changes


def show_value(value: Any) -> str:
    """A value as a user would type it: 0.1, redness, "" for an empty string, target=blue for options."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={show_value(v)}" for k, v in value.items()) or "(none)"
    if value == "":
        return '""'
    return str(value)


def describe_changes(changes: Mapping[str, Sequence[Any]]) -> str:
    """`--reward redness -> brightness, --kl_coeff 0.1 -> 0.5`."""
    return ", ".join(f"{flag} {show_value(before)} -> {show_value(after)}" for flag, (before, after) in changes.items())
