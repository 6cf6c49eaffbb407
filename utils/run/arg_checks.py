"""The argument checks of train_draftplus.py: `check_training_args`, run once, before any model loads.

It checks the type, finiteness, range and combination of every argument, the device and launch the run
will get, and whether the model, the reward, the prompts and the output directory are usable; and it
returns what it found out on the way (`CheckedArgs`), so the trainer does not work any of it out again.
Each problem raises a `UserError` (ArgumentError here; the model, sampler, prompt, reward and output
directory modules raise their own) with one line for the user, which the trainer's entry turns into
`error: ...` and exit code 2. The one check that needs the denoiser, LoRA targets that match no module, is
`utils.lora.check_lora_targets`, made when the adapters are added.

The options whose default depends on the model (`--resolution`: its native size; `--scheduler`,
`--num_inference_steps`, `--guidance_scale`, `--max_sequence_length`, `--true_cfg_scale`) are filled in here,
once the family is known (`utils.run.model_checks.apply_family_defaults`, from `ModelFamily.native_size` and
`ModelFamily.rollout_defaults`): every later reader sees the values the run uses.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import accelerate.utils
import torch

import utils.rollout.compile
from rewards import validate_reward_spec
from utils.errors import ArgumentError
from utils.evaluation.run_settings import sampling_settings
from utils.families import ModelFamily, read_native_size
from utils.hub import truthy
from utils.lora import LORA_WEIGHTS_NAME
from utils.prompts import load_prompts
from utils.run.checkpoints import (
    check_resume_compatible,
    checkpoint_problem,
    checkpoint_step,
    denoiser_fingerprint,
    newest_intact_checkpoint,
    read_run_config,
    resolve_resume,
    run_config,
)
from utils.run.model_checks import (
    apply_family_defaults,
    check_denoiser_config,
    check_hub,
    check_model,
    check_reward_reachable,
    check_vae,
    check_variant,
    token_warning,  # noqa: F401  (the trainer's entry calls it as arg_checks.token_warning)
)
from utils.run.objective import describe_changes, objective_differences, objective_of
from utils.run.output_dir import check_not_in_use, previous_run_files
from utils.run.sharding import shard_problem
from utils.run.validation import check_validation_args, check_validation_history

# diffusers.optimization.SchedulerType, less piecewise_constant (it needs step rules we do not take)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class CheckedArgs:
    """What the argument check found out, for the trainer to use as it is."""

    family: type[ModelFamily]  # the model's family, from its model_index.json
    scheduler: str  # the diffusers class of the training rollout's sampler
    family_options: dict[str, Any]  # the options only this family takes (ModelFamily.options), for its load()
    lora_targets: tuple[str, ...]  # --lora_target_modules with the presets expanded
    resume_from: str | None  # the checkpoint directory to resume (None: a fresh start)
    first_step: int  # the step the run continues from (0 on a fresh start)
    prompts: tuple[str, ...]  # the prompts of --prompts, loaded
    run_config: dict  # what each checkpoint records (utils.run.checkpoints.run_config)
    native_size: int | None = None  # the model's own image side (ModelFamily.native_size; None: unknown)
    # how the LoRA samples (utils.evaluation.run_settings): recorded beside it, the card's evaluate command
    sampling_settings: dict = dataclasses.field(default_factory=dict)
    # the objective changes a resume was allowed to make, oldest first: [{"from_step", "changes"}], where
    # changes = {flag: [before, after]}; the last one is this run's when its from_step is first_step + 1
    objective_changes: tuple[dict, ...] = ()

    @property
    def objective_change(self) -> dict | None:
        """The change this resume makes to the objective (None: none)."""
        last = self.objective_changes[-1] if self.objective_changes else None
        return last if last is not None and last["from_step"] == self.first_step + 1 else None


# ----------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------
def check_numbers(args: Any) -> None:
    """Finiteness of every float argument, then ranges and combinations."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ArgumentError(message)

    need(not getattr(args, "vae_block_checkpointing", False) or args.gradient_checkpointing,
         "--vae_block_checkpointing refines --gradient_checkpointing: give both")
    for name in ("resolution", "height", "width"):  # None: the native size; the multiple is the family's
        need(getattr(args, name) is None or getattr(args, name) > 0,
             f"--{name} must be positive, got {getattr(args, name)}")
    need(args.num_inference_steps is None or args.num_inference_steps >= 1, "--num_inference_steps must be at least 1")
    need(args.truncation_steps >= 1, f"--truncation_steps must be at least 1, got {args.truncation_steps}")
    need(args.lv_samples >= 0, "--lv_samples must be >= 0")
    need(not (args.lv_samples and args.truncation_steps != 1),
         "--lv_samples grades a single re-noised step; leave --truncation_steps at 1")
    need(not (args.lv_samples and args.final_latent != "x0"),
         "--lv_samples decodes its step's x0 prediction; leave --final_latent at x0")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "rank",
                 "checkpointing_steps", "num_validation_images"):
        need(getattr(args, name) >= 1, f"--{name} must be at least 1")
    need(args.checkpoints_total_limit is None or args.checkpoints_total_limit >= 1,
         "--checkpoints_total_limit must be at least 1")
    need(0 <= args.lora_dropout < 1, "--lora_dropout must be in [0, 1)")
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ArgumentError(f"--{name} must be a finite number, got {value}")
    need(args.kl_coeff >= 0, f"--kl_coeff must be a finite number >= 0, got {args.kl_coeff}")

    need(args.learning_rate > 0, f"--learning_rate must be > 0, got {args.learning_rate}")
    for name in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(args, name) < 1, f"--{name} must be in [0, 1), got {getattr(args, name)}")
    for name in ("adam_epsilon", "adam_weight_decay", "eta"):
        need(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    need(args.max_grad_norm >= 0, f"--max_grad_norm must be >= 0 (0 = no clipping), got {args.max_grad_norm}")
    need(args.lora_alpha is None or args.lora_alpha > 0, f"--lora_alpha must be > 0, got {args.lora_alpha}")
    need(args.lr_warmup_steps >= 0, f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    need(args.lr_scheduler in LR_SCHEDULERS,
         f"--lr_scheduler {args.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    # --validation_* consistency: utils.run.validation.check_validation_args
    need(0 <= args.seed < 2**32, f"--seed must be in [0, 2**32), got {args.seed}")
    need(args.max_prompts is None or args.max_prompts >= 1, f"--max_prompts must be at least 1, got {args.max_prompts}")
    need(args.max_nonfinite_steps >= 1, f"--max_nonfinite_steps must be at least 1, got {args.max_nonfinite_steps}")
    need(args.true_cfg_scale is None or args.true_cfg_scale >= 1,
         f"--true_cfg_scale must be >= 1 (1: off), got {args.true_cfg_scale}")


# ----------------------------------------------------------------------------------------------
# Device and launch
# ----------------------------------------------------------------------------------------------
def world_size_from_env(env: Mapping[str, str] = os.environ) -> int:
    """How many processes the launcher says this run has (torchrun, mpirun, ...)."""
    sizes = [int(env[v]) for v in WORLD_SIZE_VARS if str(env.get(v, "")).isdigit()]
    return max(sizes, default=1)


def has_accelerator_device() -> bool:
    return (torch.cuda.is_available() or torch.backends.mps.is_available()
            or bool(getattr(torch, "xpu", None) and torch.xpu.is_available()))


def check_launch(env: Mapping[str, str] = os.environ) -> None:
    """Refuse launches that would silently give one independent run per process."""
    world = world_size_from_env(env)
    use_cpu = truthy(env.get("ACCELERATE_USE_CPU"))
    if world > 1 and not use_cpu and not has_accelerator_device():
        raise ArgumentError(
            f"launched as {world} processes on a machine without a GPU, but accelerate joins CPU processes "
            "only with ACCELERATE_USE_CPU=true (without it each would train alone): run "
            "`ACCELERATE_USE_CPU=true torchrun ... train_draftplus.py ...`")
    if world == 1 and "ACCELERATE_DYNAMO_BACKEND" in env and env.get("MASTER_ADDR") and use_cpu:
        raise ArgumentError(
            "accelerate launch asked for several CPU processes or machines but started one process here "
            "(accelerate runs multi-CPU configs only through mpirun), so each launcher would train alone into "
            "the same --output_dir; use `ACCELERATE_USE_CPU=true torchrun --nnodes N --node_rank R "
            "--nproc_per_node P --master_addr HOST --master_port PORT train_draftplus.py ...` (see the README)")


def check_process_count(num_processes: int, env: Mapping[str, str] = os.environ) -> None:
    """After accelerate started: every process the launcher started joined one run."""
    world = world_size_from_env(env)
    if world > 1 and num_processes != world:
        raise ArgumentError(
            f"the launcher started {world} processes but accelerate joined {num_processes}; each would train "
            "alone. On CPU set ACCELERATE_USE_CPU=true; on GPUs launch with accelerate or torchrun as in the README")


def check_device_support(args: Any, env: Mapping[str, str] = os.environ) -> None:
    """fp16 and 8-bit Adam need a device that runs them; the device is known before accelerate starts."""
    on_cpu = truthy(env.get("ACCELERATE_USE_CPU")) or not has_accelerator_device()
    precision = args.mixed_precision or env.get("ACCELERATE_MIXED_PRECISION")
    source = "--mixed_precision fp16" if args.mixed_precision else "mixed_precision: fp16 (accelerate config)"
    if precision == "fp16" and on_cpu:
        raise ArgumentError(f"{source} needs a GPU and this run is on the CPU; use bf16 or no")
    if args.use_8bit_adam:
        check_bitsandbytes("--use_8bit_adam", "bitsandbytes' AdamW8bit", on_cpu)
    # diffusers' bitsandbytes quantizer would only fail once the text encoders have loaded (minutes for T5-XXL).
    if args.quantize_base is not None:
        check_bitsandbytes(f"--quantize_base {args.quantize_base}", "bitsandbytes 4-bit", on_cpu)


def check_bitsandbytes(option: str, what: str, on_cpu: bool) -> None:
    """`option` runs `what`, bitsandbytes' CUDA kernels: it needs a CUDA GPU and the package."""
    if on_cpu or not torch.cuda.is_available():
        raise ArgumentError(f"{option} ({what}) needs a CUDA GPU and this run is not on one; drop {option.split()[0]}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ArgumentError(f"{option} needs bitsandbytes: pip install bitsandbytes")


def check_trackers(report_to: str) -> None:
    if report_to in ("none", "all"):
        return
    if report_to not in TRACKERS:
        raise ArgumentError(f"--report_to {report_to!r} is not one of {', '.join(TRACKERS)}, all, none")
    if not getattr(accelerate.utils, f"is_{report_to}_available", lambda: True)():
        raise ArgumentError(f"--report_to {report_to} needs the {report_to} package (pip install {report_to}), "
                            "or use --report_to none")


# ----------------------------------------------------------------------------------------------
# Output directory and resume
# ----------------------------------------------------------------------------------------------
def check_output_dir(args: Any) -> None:
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ArgumentError(f"--output_dir {out!r} is a file, not a directory")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ArgumentError(f"--output_dir {out!r} cannot be created: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArgumentError(f"--output_dir {out!r} is not writable ({parent!r})")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise ArgumentError("--overwrite_output_dir starts over and --resume_from_checkpoint continues; give one")
    if not os.path.isdir(out):
        return
    check_not_in_use(out)
    found = previous_run_files(out)
    if found and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ArgumentError(f"--output_dir {out!r} holds a previous run ({shown}); continue it with "
                            "--resume_from_checkpoint latest, start over with --overwrite_output_dir, or "
                            "choose another --output_dir")


def check_resume(args: Any, lora_targets: tuple[str, ...], fingerprint: str | None) -> tuple[str | None, int]:
    """The checkpoint to resume (None: a fresh start) and its step: an intact one, trained with this run's
    model and LoRA settings, at or before --max_train_steps."""
    path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if path is None:
        return None, 0  # `latest` without checkpoints starts afresh
    if not os.path.isdir(path):
        raise ArgumentError(f"--resume_from_checkpoint {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, LORA_WEIGHTS_NAME)):
        raise ArgumentError(f"--resume_from_checkpoint {path!r} is not a checkpoint (no {LORA_WEIGHTS_NAME}); "
                            "checkpoints are the checkpoint-N directories of an --output_dir")
    if (step := checkpoint_step(path)) is None:
        raise ArgumentError(f"--resume_from_checkpoint {path!r} is not a checkpoint-N directory, so the step to "
                            "continue from is unknown; give the checkpoint-N directory itself")
    if (problem := checkpoint_problem(path)) is not None:
        intact = newest_intact_checkpoint(os.path.dirname(os.path.normpath(path)), below=step)
        then = (f"resume from the newest intact one with --resume_from_checkpoint {intact}" if intact else
                "no earlier checkpoint is intact; start over with --overwrite_output_dir")
        raise ArgumentError(f"{os.path.basename(os.path.normpath(path))} is damaged ({problem}); {then}")
    check_resume_compatible(path, run_config(args, lora_targets, fingerprint))
    if args.max_train_steps < step:
        raise ArgumentError(f"--max_train_steps {args.max_train_steps} is below the step of {path!r} ({step}): a "
                            f"resumed run trains up to --max_train_steps; give --max_train_steps {step} or more, or "
                            "resume from an earlier checkpoint")
    return path, step


def check_objective(args: Any, resume_from: str | None, first_step: int,
                    objective: dict[str, Any]) -> tuple[dict, ...]:
    """The objective changes of the run so far, this resume's included. A resume that changes the
    objective is refused unless --allow_objective_change says the change is meant."""
    saved = read_run_config(resume_from) if resume_from is not None else None
    if not saved:
        return ()
    history = tuple(saved.get("objective_changes") or ())
    changes = objective_differences(saved.get("objective") or {}, objective)
    if not changes:
        return history
    name = os.path.basename(os.path.normpath(resume_from))
    if not args.allow_objective_change:
        raise ArgumentError(f"{name} was trained for another objective ({describe_changes(changes)}); resume with "
                            f"the values it was trained with, pass --allow_objective_change to train the new "
                            f"objective from step {first_step + 1} on (the model card and metrics.jsonl record "
                            "the change), or start a new --output_dir")
    return (*history, {"from_step": first_step + 1, "changes": changes})


def estimate_checked_args(args: Any, family: type[ModelFamily], scheduler: str, denoiser_config: dict | None,
                          native_size: int | None) -> CheckedArgs:
    """What `--estimate_memory` needs of the checks: the family, the sampler, the LoRA's targets. The run it sizes
    is for another machine: its GPU, bitsandbytes, reward weights, prompts and output directory are not here."""
    return CheckedArgs(family=family, scheduler=scheduler, family_options={k: getattr(args, k) for k in family.options},
                       lora_targets=lora_targets_of(args, family, denoiser_config), resume_from=None, first_step=0,
                       prompts=(), run_config={}, native_size=native_size)


def lora_targets_of(args: Any, family: type[ModelFamily], denoiser_config: dict | None) -> tuple[str, ...]:
    """`--lora_target_modules` with the family's presets expanded."""
    try:
        return tuple(family.target_modules(args.lora_target_modules, denoiser_config))
    except ValueError as e:
        raise ArgumentError(f"--lora_target_modules: {e}") from None


def check_training_args(args: Any, env: Mapping[str, str] = os.environ) -> CheckedArgs:
    """Every check of the command line, in the order a user would want to hear them (the cheap ones first,
    loading the prompts last), and what they found."""
    check_numbers(args)
    if (problem := check_validation_args(args)) is not None:
        raise ArgumentError(problem)
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise ArgumentError("--hub_token with --report_to wandb would expose the token in the run config; "
                            "use `hf auth login`")
    validate_reward_spec(args.reward, **args.reward_options)
    family, scheduler = check_model(args.pretrained_model_name_or_path, args.revision, args.scheduler, env)
    denoiser_config = check_denoiser_config(args.pretrained_model_name_or_path, args.revision)
    native_size = read_native_size(args.pretrained_model_name_or_path, family, denoiser_config, args.revision)
    apply_family_defaults(args, family, denoiser_config, native_size)
    if getattr(args, "estimate_memory", False):  # sizes the run for another machine: no weights, device or files
        return estimate_checked_args(args, family, scheduler, denoiser_config, native_size)
    if args.pretrained_vae_model_name_or_path is not None:
        check_vae(args.pretrained_vae_model_name_or_path)
    check_launch(env)
    check_device_support(args, env)
    if (problem := shard_problem(args, family, world_size_from_env(env), env)) is not None:
        raise ArgumentError(problem)
    check_trackers(args.report_to)
    check_hub(args, env)
    check_output_dir(args)
    if args.pretrained_model_name_or_path != "toy" and os.path.isdir(args.pretrained_model_name_or_path):
        check_variant(args.pretrained_model_name_or_path, args.variant, family)
    check_reward_reachable(args.reward, args.reward_options, env)
    lora_targets = lora_targets_of(args, family, denoiser_config)
    fingerprint = denoiser_fingerprint(args.pretrained_model_name_or_path, denoiser_config)
    resume_from, first_step = check_resume(args, lora_targets, fingerprint)
    if args.compile and (reason := utils.rollout.compile.compile_unsupported_reason()):
        raise ArgumentError(reason)
    prompts = load_prompts(args.prompts, args.prompt_column, args.prompt_split, max_prompts=args.max_prompts)
    objective = objective_of(args, prompts)
    objective_changes = check_objective(args, resume_from, first_step, objective)
    if args.validation_prompts and (problem := check_validation_history(args, first_step)):
        raise ArgumentError(problem)
    sampling = sampling_settings(args, family, denoiser_config)
    # a checkpoint records how its LoRA samples, for the evaluator (utils.evaluation.run_settings)
    config = {**run_config(args, lora_targets, fingerprint, objective, objective_changes), "sampling": sampling}
    return CheckedArgs(family=family, scheduler=scheduler, family_options={k: getattr(args, k) for k in family.options},
                       lora_targets=lora_targets, resume_from=resume_from, first_step=first_step,
                       prompts=tuple(prompts), run_config=config, objective_changes=objective_changes,
                       native_size=native_size, sampling_settings=sampling)
