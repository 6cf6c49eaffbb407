"""The sampler settings a LoRA was trained with, recorded beside it, so that the evaluator samples it as it trained.

The trainer writes them (`sampling_settings`, once per run, at argument-check time) into every directory that
holds one of its LoRAs: `draftplus_settings.json` beside the final LoRA (uploaded with it by `--push_to_hub`:
no paths, no secrets) and, in each checkpoint, the `sampling` entry of `draftplus_run.json`. The evaluator
reads them back (`settings_of_runs`) and uses them for every setting its caller leaves out; the model card's
evaluate command is written from the same dict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.evaluation.settings import EvaluationError, python_option
from utils.families.base import ModelFamily, family_option_names

SETTINGS_NAME = "draftplus_settings.json"
RUN_CONFIG_NAME = "draftplus_run.json"  # a checkpoint's run config (utils.run.checkpoints), its `sampling` entry
# The sampler settings every family has, named as both the trainer's options and `EvalSettings`' fields; a
# family's own `options` (FLUX's T5 length, its true CFG scale) come with them.
SAMPLING_SETTINGS = ("scheduler", "num_inference_steps", "guidance_scale", "eta", "negative_prompt", "height", "width")
SIZE_SETTINGS = ("resolution", "height", "width")


def sampling_settings(args: Any, family: type[ModelFamily], denoiser_config: dict | None) -> dict[str, Any]:
    """The run's sampler settings (parsed trainer arguments, the family's defaults filled in) as the evaluator
    takes them: none the family would refuse (no guidance scale for a denoiser that takes none, no empty
    negative prompt)."""
    names = [*SAMPLING_SETTINGS, *family.options]
    settings = {name: getattr(args, name) for name in names}
    if not family.uses_guidance_scale(denoiser_config):
        del settings["guidance_scale"]
    if not settings["negative_prompt"]:
        del settings["negative_prompt"]
    return settings


def write_settings(output_dir: str | os.PathLike, settings: Mapping[str, Any]) -> Path:
    """`draftplus_settings.json` in `output_dir`."""
    path = Path(output_dir) / SETTINGS_NAME
    path.write_text(json.dumps(dict(settings), indent=1) + "\n")
    return path


def read_settings(lora: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """The sampler settings recorded beside a LoRA (its directory, or the directory of a `.safetensors` file),
    and the file they came from; None where the trainer recorded none (a LoRA from elsewhere, the final directory
    of a run older than these files: its checkpoints' recorded arguments serve)."""
    directory = Path(lora) if Path(lora).is_dir() else Path(lora).parent
    for name, entry in ((SETTINGS_NAME, None), (RUN_CONFIG_NAME, "sampling")):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise EvaluationError(f"{path} cannot be read ({e}); give the sampler settings instead") from None
        settings = data.get(entry) if entry else data
        if entry and settings is None and isinstance(data.get("args"), dict):
            settings = older_run_settings(data["args"])
        if isinstance(settings, dict):
            return settings, path
    return None


def older_run_settings(args: Mapping[str, Any]) -> dict[str, Any]:
    """The sampler settings in the recorded arguments of a checkpoint written before its run config had them."""
    names = (*SAMPLING_SETTINGS, *family_option_names())
    return {name: args[name] for name in names if args.get(name) not in (None, "")}


def settings_of_runs(loras: Sequence[str | os.PathLike], given: Mapping[str, Any],
                     spell: Callable[[str], str] = python_option) -> tuple[dict[str, Any], list[Path]]:
    """The recorded sampler settings of the runs that trained `loras`, for those the caller left out of `given`
    (None or absent; a size given in any form keeps the runs' sizes out), and the files they came from. Runs
    that disagree on a setting left out are an EvaluationError: their rows would be sampled differently."""
    runs: list[tuple[dict[str, Any], Path]] = [recorded for lora in dict.fromkeys(str(p) for p in loras)
                                                if (recorded := read_settings(lora)) is not None]
    size_given = any(given.get(name) is not None for name in SIZE_SETTINGS)
    out: dict[str, Any] = {}
    for name in dict.fromkeys(name for settings, _ in runs for name in settings):
        if given.get(name) is not None or (size_given and name in SIZE_SETTINGS):
            continue
        values = {json.dumps(settings.get(name)): (settings.get(name), path) for settings, path in runs}
        if len(values) > 1:
            shown = ", ".join(f"{value!r} ({path})" for value, path in values.values())
            raise EvaluationError(f"the LoRAs were trained with different {name}: {shown}; give {spell(name)}")
        (out[name], _), = values.values()
    return {k: v for k, v in out.items() if v is not None}, [path for _, path in runs]
