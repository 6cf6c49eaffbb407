"""Checkpoints: atomic saves that survive failed writes, `latest`, and what a resume is checked against.

Each `checkpoint-N/` holds accelerate's state (the LoRA in diffusers' format via the trainer's save
hook, optimizer, LR scheduler, RNG states) plus `draftplus_run.json`: the base model, LoRA rank,
alpha and targets it was trained with, and the objective it optimised (utils/run/objective.py), with the
changes a resume was allowed to make (no secrets). A resume with other settings is refused with one
line instead of a wall of size-mismatch errors, and so is a resume from a checkpoint whose files were
cut short (a crash or a full disk during a copy): the line names the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger

from utils.errors import EXIT_RUN_FAILED, UserError
from utils.evaluation.run_settings import RUN_CONFIG_NAME  # the evaluator reads it too
from utils.lora import LORA_WEIGHTS_NAME, load_lora_into_denoiser, save_lora
from utils.run.guards import any_rank, ensure_finite_weights

# Attributes of the parsed arguments that are never recorded (checkpoints, trackers): the hub token is a
# secret, and `checked` holds what the argument check found (classes, prompts), not an argument.
NOT_RECORDED = frozenset({"hub_token", "checked"})
logger = get_logger("draftplus")


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written; the previous ones are intact."""

    exit_code = EXIT_RUN_FAILED


class ResumeMismatchError(UserError, ValueError):
    """The checkpoint to resume was trained with other model/LoRA settings."""


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N of a `checkpoint-N` directory (a name or a path); None for any other name."""
    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def checkpoint_steps(output_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints (checkpoint-N) in `output_dir`, ascending."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(step for name in os.listdir(output_dir) if (step := checkpoint_step(name)) is not None)


def resolve_resume(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """The checkpoint directory a run resumes from: `latest` -> the newest in `output_dir` (None if
    there is none: a fresh start), a path -> itself, None -> None."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        steps = checkpoint_steps(output_dir)
        return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None
    return resume_from_checkpoint


# ----------------------------------------------------------------------------------------------
# The run config saved into every checkpoint
# ----------------------------------------------------------------------------------------------
def public_args(args: Any) -> dict[str, Any]:
    """The arguments as JSON-able values (what checkpoints and trackers record), without secrets."""
    return {k: v if isinstance(v, int | float | str | bool | type(None)) else str(v)
            for k, v in vars(args).items() if k not in NOT_RECORDED}


def denoiser_fingerprint(model: str, denoiser_config: Mapping[str, Any] | None) -> str | None:
    """sha256 of the base model's denoiser config (`unet/config.json` or `transformer/config.json`, as the
    argument check read it; keys without "_"): the same model under another path gives the same fingerprint.
    None without a config (one that cannot be read), and for the built-in toy, which is compared by name."""
    if model == "toy" or denoiser_config is None:
        return None
    config = {k: v for k, v in denoiser_config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def run_config(args: Any, target_modules: Sequence[str], fingerprint: str | None,
               objective: Mapping[str, Any] | None = None,
               objective_changes: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """What a checkpoint records: the model and LoRA shape (a resume must match them), the objective
    (a resume may change it only when told to) and the changes made so far ([{from_step, changes}])."""
    return {
        "base_model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "denoiser_config_sha256": fingerprint,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha if args.lora_alpha is not None else args.rank,
        "target_modules": sorted(target_modules),
        "objective": dict(objective) if objective is not None else None,
        "objective_changes": [dict(c) for c in objective_changes],
        "args": public_args(args),
    }


def read_run_config(checkpoint: str) -> dict[str, Any] | None:
    """The checkpoint's run config; for checkpoints written before it existed, the LoRA settings from
    the LoRA file's metadata (no base model then). None if neither is there."""
    path = os.path.join(checkpoint, RUN_CONFIG_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    lora = os.path.join(checkpoint, LORA_WEIGHTS_NAME)
    if not os.path.isfile(lora):
        return None
    from safetensors import safe_open

    with safe_open(lora, "pt") as f:
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    # diffusers writes the LoraConfig as `<denoiser component>.<field>` keys
    component = next((key.removesuffix(".r") for key in metadata if key.endswith(".r")), None)
    if component is None:
        return None
    rank = metadata[f"{component}.r"]
    return {"rank": rank, "lora_alpha": metadata.get(f"{component}.lora_alpha", rank),
            "target_modules": sorted(metadata.get(f"{component}.target_modules") or [])}


def check_resume_compatible(checkpoint: str, wanted: Mapping[str, Any]) -> None:
    """ResumeMismatchError naming the first setting that differs between `checkpoint` and this run."""
    saved = read_run_config(checkpoint)
    if saved is None:
        return
    name = os.path.basename(checkpoint.rstrip("/"))
    for key, flag in (("rank", "--rank"), ("lora_alpha", "--lora_alpha")):
        if key in saved and float(saved[key]) != float(wanted[key]):
            raise ResumeMismatchError(f"{name} was trained with {flag} {saved[key]:g}, not {wanted[key]:g}; "
                                      f"resume with {flag} {saved[key]:g} or start a new --output_dir")
    if "target_modules" in saved and sorted(saved["target_modules"]) != sorted(wanted["target_modules"]):
        raise ResumeMismatchError(f"{name} has LoRA on {' '.join(sorted(saved['target_modules']))}, not "
                                  f"{' '.join(sorted(wanted['target_modules']))}; resume with the same "
                                  "--lora_target_modules or start a new --output_dir")
    if saved.get("base_model") is None:
        return
    # Checkpoints written before the flow transformers were served name it after the UNet.
    saved_fingerprint = saved.get("denoiser_config_sha256", saved.get("unet_config_sha256"))
    same_denoiser = saved_fingerprint and saved_fingerprint == wanted.get("denoiser_config_sha256")
    if not same_denoiser and (saved["base_model"], saved.get("revision")) != (wanted["base_model"], wanted.get("revision")):
        raise ResumeMismatchError(f"{name} was trained on {saved['base_model']!r}, not "
                                  f"{wanted['base_model']!r}; resume with --pretrained_model_name_or_path "
                                  f"{saved['base_model']!r} or start a new --output_dir")


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------------------------
def _safetensors_problem(path: str) -> str | None:
    """Why a .safetensors file cannot be read whole (None if it can): its header names byte ranges
    that must all lie inside the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "cut short"
        header_len = int.from_bytes(head, "little")
        if 8 + header_len > size:
            return "cut short"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return "unreadable header"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return "cut short" if 8 + header_len + max(ends, default=0) > size else None


def _torch_file_problem(path: str) -> str | None:
    """Why a torch.save file (a zip archive) cannot be read (None if it can): a cut-short archive has
    no central directory; a member's CRC is checked only when it is read, which torch.load does."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError):
        return "cut short or not a torch file"
    return None


def checkpoint_problem(checkpoint: str) -> str | None:
    """What is damaged in a checkpoint directory ("optimizer.bin: cut short"), None if nothing is.
    Reads headers and archive directories only, not the weights."""
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(path)
        elif name.endswith((".bin", ".pkl")):  # accelerate's optimizer, scheduler and RNG states (torch.save)
            problem = _torch_file_problem(path)
        elif name == RUN_CONFIG_NAME:
            try:
                with open(path) as f:
                    json.load(f)
                problem = None
            except ValueError:
                problem = "not valid JSON"
        else:
            continue
        if problem is not None:
            return f"{name}: {problem}"
    return None


def newest_intact_checkpoint(output_dir: str, below: int | None = None) -> str | None:
    """The newest checkpoint-N in `output_dir` (with N < `below`, if given) whose files are whole."""
    for step in reversed(checkpoint_steps(output_dir)):
        path = os.path.join(output_dir, f"checkpoint-{step}")
        if (below is None or step < below) and checkpoint_problem(path) is None:
            return path
    return None


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None,
                    config: Mapping[str, Any] | None = None) -> str:
    """accelerate state into checkpoint-N, written under a temporary name and renamed when complete;
    old checkpoints are rotated out only after the new one exists.

    A write that fails on any rank (disk full, permissions) removes the partial directory and raises
    CheckpointWriteError on every rank, leaving the earlier checkpoints as they were.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = final + ".partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    error: Exception | None = None
    try:
        accelerator.save_state(partial)
        if accelerator.is_main_process and config is not None:
            with open(os.path.join(partial, RUN_CONFIG_NAME), "w") as f:
                json.dump(config, f, indent=1)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        error = e
    if any_rank(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        while error is not None and error.__cause__ is not None:  # the write that failed, not its wrappers
            error = error.__cause__
        reason = f"{type(error).__name__}: {error}" if error else "it failed on another process"
        previous = [s for s in checkpoint_steps(output_dir) if s != step]
        kept = f"checkpoint-{previous[-1]} is intact" if previous else "no earlier checkpoint"
        raise CheckpointWriteError(f"could not write checkpoint-{step} ({reason}); {kept}")
    if accelerator.is_main_process:
        if os.path.isdir(final):  # same step saved again after a resume: keep the old one until replaced
            os.replace(final, final + ".old")
        os.replace(partial, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
        if total_limit is not None:
            for old in checkpoint_steps(output_dir)[:-total_limit]:
                shutil.rmtree(os.path.join(output_dir, f"checkpoint-{old}"))
    accelerator.wait_for_everyone()
    return final


@dataclass
class Checkpointer:
    """The training loop's checkpoints: `save(step)` writes checkpoint-<step> (never with non-finite LoRA
    weights: NonFiniteError); `last` is the newest one written (or resumed from)."""

    accelerator: Any
    output_dir: str
    total_limit: int | None
    lora_params: Sequence[torch.Tensor]
    config: Mapping[str, Any]  # `run_config`: what a resume is checked against
    last: str | None = None

    def save(self, step: int, fatal: bool) -> None:
        """A failed write (disk full, permissions) leaves the earlier checkpoints intact; it ends the run
        (CheckpointWriteError) only when `fatal`, and is logged otherwise."""
        ensure_finite_weights(self.accelerator, self.lora_params, f"checkpoint-{step}")
        try:
            self.last = save_checkpoint(self.accelerator, self.output_dir, step, self.total_limit, self.config)
        except CheckpointWriteError as e:
            if fatal:
                raise
            logger.error(f"{e}; training goes on")
            return
        logger.info(f"Saved state to {self.last}")


def register_lora_hooks(accelerator, family) -> None:
    """accelerate's save/load hooks: checkpoints hold the LoRA (diffusers format), not the whole denoiser."""

    def save_model_hook(models, weights, output_dir):
        for model in models:
            save_lora(accelerator.unwrap_model(model), output_dir, family, is_main_process=accelerator.is_main_process)
        weights.clear()

    def load_model_hook(models, input_dir):
        while models:
            load_lora_into_denoiser(accelerator.unwrap_model(models.pop()), input_dir, family)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
