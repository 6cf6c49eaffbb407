#!/usr/bin/env python
"""DRaFT+ : direct reward fine-tuning of Stable Diffusion LoRAs, with a KL-style regulariser.

Each training sample: draw x_T, denoise with the LoRA UNet (no autograd for the first T-K steps),
keep gradients through the last K steps and the VAE decoder, score the image with a differentiable
reward, and minimise

    loss = -mean_b R(x0_b, prompt_b) + kl_coeff * mean_k mean_{b,c,h,w} (eps_theta - eps_ref)^2

where eps_ref is the same UNet with its LoRA disabled, on the same noisy latent. kl_coeff = 0 is
plain DRaFT. Launch with `accelerate launch train_draftplus.py ...`; `--help` lists every option.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from utils import arg_checks
from utils.schedulers import SCHEDULERS


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors (bad type, unknown choice, missing value) as one line, like ours."""

    def error(self, message: str) -> None:
        fail(f"{message} (--help lists the options)")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                   help="Hub id or local directory of a diffusers Stable Diffusion 1.x/2.x or SDXL pipeline\n"
                        "(the family is read from model_index.json). 'toy' uses the built-in pretrained toy\n"
                        "model (CPU demo, no hub needed).")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="A replacement VAE (hub id or local dir), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL\n"
                        "in fp16. Without it, SDXL's own VAE is kept in fp32 under fp16, as its pipeline does.")
    g.add_argument("--revision", type=str, default=None, help="Hub revision of the model.")
    g.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. 'fp16'.")
    g.add_argument("--scheduler", type=str, default="ddim", choices=sorted(SCHEDULERS),
                   help="Sampler used for the training rollout (default: ddim; 'model' = the model's own).")

    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", type=str, default="animals",
                   help="Prompt source: 'animals' (45 animals, built in), 'pickapic' (Pick-a-Pic captions,\n"
                        "from the hub), a .txt file (one prompt per line), a datasets id or local path\n"
                        "(with --prompt_column), or a webdataset .tar of <key>.txt entries.")
    g.add_argument("--prompt_column", type=str, default=None, help="Column holding prompts in a dataset.")
    g.add_argument("--prompt_split", type=str, default="train", help="Dataset split to read prompts from.")
    g.add_argument("--max_prompts", type=int, default=None,
                   help="Use the first N distinct prompts of the source. Hub datasets are streamed, so\n"
                        "'--prompts pickapic --max_prompts 10000' starts in seconds instead of after\n"
                        "downloading every shard.")
    g.add_argument("--negative_prompt", type=str, default="", help="Negative prompt for classifier-free guidance.")
    g.add_argument("--resolution", type=int, default=512,
                   help="Image height and width (multiple of 8); 1024 for SDXL.")
    g.add_argument("--height", type=int, default=None, help="Image height (multiple of 8; default --resolution).")
    g.add_argument("--width", type=int, default=None, help="Image width (multiple of 8; default --resolution).")

    g = p.add_argument_group("rollout")
    g.add_argument("--num_inference_steps", type=int, default=50, help="T: denoising steps per sample.")
    g.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale (<=1: off).")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic sampler).")
    g.add_argument("--truncation_steps", type=int, default=1,
                   help="K: the last K denoising steps get gradients (DRaFT-K). Default 1.")
    g.add_argument("--lv_samples", type=int, default=0,
                   help="DRaFT-LV: re-noise the final latent n times and grade one step on each (0 = off).")
    g.add_argument("--final_latent", type=str, default="x0", choices=["x0", "sample"],
                   help="What the VAE decodes after the last step: the model's x0 prediction (default, as\n"
                        "NeMo-Aligner's DRaFT+, so kl_coeff means what it means in NVIDIA's recipes), or the\n"
                        "scheduler's own final sample (images bit-identical to the diffusers pipeline's).")

    g = p.add_argument_group("objective")
    g.add_argument("--reward", type=str, default="pickscore",
                   help="Reward spec: a name ('pickscore'), a weighted sum ('pickscore=1,aesthetic=0.05'),\n"
                        "or a custom reward 'path/to/file.py:fn' / 'package.module:fn'. '--reward help' lists them.")
    g.add_argument("--reward_options", type=str, nargs="*", default=[], metavar="KEY=VALUE",
                   help="Options for the reward, e.g. 'model=/local/dir' or 'pickscore.model=/path' in a sum.")
    g.add_argument("--reward_dtype", type=str, default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="Dtype of the reward model (fp32 is the most faithful to the official scorer).")
    g.add_argument("--reward_gradient_checkpointing", action="store_true",
                   help="Checkpoint the reward model's activations (less memory, ~30%% more reward compute).")
    g.add_argument("--kl_coeff", type=float, default=0.1,
                   help="Weight of the DRaFT+ penalty mean (eps_lora - eps_base)^2. 0 = plain DRaFT.")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: rank).")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout.")
    g.add_argument("--lora_target_modules", type=str, nargs="+", default=["attention"],
                   help="UNet modules that get LoRA adapters: 'attention' (to_q to_k to_v to_out.0, the default,\n"
                        "as diffusers' scripts), 'attention+ff' (adds ff.net.0.proj ff.net.2, as NeMo-Aligner),\n"
                        "or module names.")

    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate.")
    g.add_argument("--scale_lr", action="store_true",
                   help="Scale the learning rate by processes x batch size x accumulation steps.")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help="One of diffusers' schedules: linear, cosine, cosine_with_restarts, polynomial,\n"
                        "constant, constant_with_warmup.")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up optimisation steps.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-08, help="Adam epsilon.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 = off).")
    g.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="A step whose loss or gradients are NaN/inf is skipped (no update); this many in a\n"
                        "row stop the run (exit code 3). Default 10.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (CUDA only).")
    g.add_argument("--train_batch_size", type=int, default=1, help="Samples per process per micro-step.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimiser step.")
    g.add_argument("--max_train_steps", type=int, default=1000, help="Optimiser steps.")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Overrides accelerate's config. Frozen weights are cast to this dtype; LoRA stays fp32.")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Checkpoint the graded UNet steps and the VAE decoder (memory flat in K).")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the rollout's no-grad UNet calls (the T-K prefix and the adapters-off\n"
                        "reference; CUDA graphs on GPUs); the graded steps stay eager. Opt-in: the first steps\n"
                        "compile (minutes for SD-size UNets). Speed: benchmarks/RESULTS.md.")
    g.add_argument("--seed", type=int, default=0, help="Seed for LoRA init, prompts and noise.")

    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompts", type=str, nargs="*", default=[],
                   help="Prompts rendered before and after training (and every --validation_steps).")
    g.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    g.add_argument("--validation_steps", type=int, default=0,
                   help="Every N steps, render the validation prompts with the current LoRA from the same noise as\n"
                        "the base model (rendered once) and save output_dir/validation/step-N.png (base left,\n"
                        "LoRA right, each image with its reward). 0: only before and after training.")
    g.add_argument("--validation_diversity", type=str, nargs="?", const="auto", default=None,
                   choices=["auto", "lpips", "lpips_random_backbone", "pixel_l2"],
                   help="Also log the validation images' diversity (mean pairwise distance per prompt). Bare flag\n"
                        "= auto: LPIPS if torchvision's AlexNet weights are available, else the LPIPS stand-in on\n"
                        "a fixed random AlexNet (lpips_random_backbone); the metric used is logged.")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", type=str, default="draftplus-lora",
                   help="Where the LoRA and checkpoints go. One run at a time: a directory another run is\n"
                        "using is refused, and so is one holding a previous run unless\n"
                        "--resume_from_checkpoint or --overwrite_output_dir is given.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start over in an --output_dir that holds a previous run: its checkpoints, metrics\n"
                        "and tracker logs are removed first.")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save accelerate state every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="A checkpoint-N directory, or 'latest' (newest in --output_dir; fresh start if none).")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help="accelerate tracker: tensorboard, wandb, comet_ml, all, or none.")
    g.add_argument("--logging_dir", type=str, default="logs", help="Tracker directory, relative to --output_dir.")
    g.add_argument("--export_kohya", action="store_true",
                   help="Also write pytorch_lora_weights_kohya.safetensors (kohya format, for AUTOMATIC1111 and\n"
                        "ComfyUI); `python -m utils.export_kohya DIR` converts an existing output dir.")
    g.add_argument("--push_to_hub", action="store_true",
                   help="Upload the model card, the LoRA (and kohya file), the validation grids and the training\n"
                        "curves to the Hub (never checkpoints or logs).")
    g.add_argument("--hub_model_id", type=str, default=None, help="Hub repo (default: name of --output_dir).")
    g.add_argument("--hub_token", type=str, default=None,
                   help="Hub token (prefer `hf auth login`; the token is never logged or saved).")

    # `--reward help` lists the rewards without asking for anything else.
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--reward")
    if pre.parse_known_args(input_args)[0].reward == "help":
        from rewards import list_rewards

        print(list_rewards())
        raise SystemExit(0)
    args = p.parse_args(input_args)
    check_args(args)
    return args


def fail(message: str, code: int = 2) -> None:
    """Bad input: one line on stderr (from the first process only), exit code 2, nothing loaded or written."""
    if os.environ.get("RANK", "0") == "0":
        print(f"train_draftplus.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model, so bad input fails in a second with one clear line."""
    from rewards import RewardSpecError, parse_reward_options, validate_reward_spec
    from utils.prompts import PromptSourceError, check_prompt_source

    args.height = args.height if args.height is not None else args.resolution
    args.width = args.width if args.width is not None else args.resolution
    from utils.validation import check_validation_args

    if (problem := check_validation_args(args)) is not None:
        fail(problem)
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        fail("--hub_token with --report_to wandb would expose the token in the run config; use `hf auth login`")
    try:
        args.reward_options = parse_reward_options(args.reward_options)
        validate_reward_spec(args.reward, **args.reward_options)
    except RewardSpecError as e:
        fail(str(e))
    try:
        check_prompt_source(args.prompts, args.prompt_column, args.prompt_split)
    except PromptSourceError as e:
        fail(str(e))
    try:  # numbers, model, device, launch, output directory, resume, reward weights (utils/arg_checks.py)
        arg_checks.check_all(args)
    except (arg_checks.ArgumentError, RewardSpecError) as e:
        fail(str(e))
    warning = arg_checks.token_warning(args)
    if warning and os.environ.get("RANK", "0") == "0":
        print(f"train_draftplus.py: {warning}", file=sys.stderr)
    if args.compile:
        import utils.compile

        if reason := utils.compile.compile_unsupported_reason():
            fail(reason)


# ----------------------------------------------------------------------------------------------
# Helpers of the training loop
# ----------------------------------------------------------------------------------------------
def step_seed(seed: int, *keys: int) -> int:
    """A per-(step, micro-step, process) seed: resumed runs draw exactly the same noise."""
    return hash((seed, *keys)) % (2**63)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> None:
    # diffusers imports bitsandbytes for its quantizers; on some CPUs that warns about a 4-bit kernel
    # package this script never uses. Keep the first lines of a CPU run about the run.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import diffusers
    import torch
    import transformers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.utils.torch_utils import randn_tensor
    from tqdm.auto import tqdm

    from rewards import RewardLoadError, build_reward
    from utils import guards
    from utils.checkpoints import (
        CheckpointWriteError,
        resolve_resume,
        run_config,
        save_checkpoint,
        unet_fingerprint,
    )
    from utils.family import UnsupportedModelError, family_for_class_name, read_model_index
    from utils.lora import add_lora, expand_target_modules, load_lora_into_unet, lora_state_dict, save_lora
    from utils.preemption import Preemption, exit_code
    from utils.prompts import PromptSourceError, load_prompts, sample_prompts
    from utils.rollout import Models, RolloutConfig, draftplus_step
    from utils.run_dir import RunDirError, claim_output_dir, truncate_metrics
    from utils.run_outputs import finish_run
    from utils.schedulers import SchedulerError, scheduler_class_name
    from utils.step_metrics import StepMetrics
    from utils.validation import Validation

    preemption = Preemption().install()  # before training: a signal exits at once, releasing the lock
    logger = get_logger("draftplus")
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    for lib in (transformers, diffusers):
        (lib.utils.logging.set_verbosity_warning if accelerator.is_local_main_process
         else lib.utils.logging.set_verbosity_error)()
    set_seed(args.seed)
    try:
        arg_checks.check_process_count(accelerator.num_processes)
        # One run per directory: the main process takes the lock before anything is written (and removes
        # it on exit); all processes learn whether it could, so they exit together when it could not.
        notice = claim_output_dir(accelerator, args.output_dir, args.overwrite_output_dir, args.logging_dir)
    except (arg_checks.ArgumentError, RunDirError) as e:
        fail(str(e))
    if notice:
        logger.warning(notice)
    try:  # before the models: a prompt source that gives no prompts costs seconds, not minutes
        prompts = load_prompts(args.prompts, args.prompt_column, args.prompt_split, max_prompts=args.max_prompts)
    except PromptSourceError as e:
        fail(str(e))

    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import create_repo

        repo_id = create_repo(repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True,
                              token=args.hub_token).repo_id

    # Models. The family (SD 1.x/2.x, SDXL) is read from model_index.json before any weight is loaded.
    # Everything is frozen; only the LoRA adapters added below train.
    try:
        index = read_model_index(args.pretrained_model_name_or_path, args.revision) or {}
        family_cls = family_for_class_name(index.get("_class_name", "?"))
        own_scheduler = (index.get("scheduler") or [None, None])[1]
        scheduler_cls = getattr(diffusers, scheduler_class_name(args.scheduler, own_scheduler))
    except (UnsupportedModelError, SchedulerError) as e:
        fail(str(e))
    try:
        family = family_cls.load(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                                 vae_name_or_path=args.pretrained_vae_model_name_or_path)
    except OSError as e:  # not on the hub, no network, a missing file: say what, not a traceback
        fail(f"could not load the model {args.pretrained_model_name_or_path!r} ({str(e).strip().splitlines()[0]}); "
             "point --pretrained_model_name_or_path at a local copy (a directory saved with save_pretrained)")
    unet, vae = family.unet, family.vae
    scheduler = scheduler_cls.from_config(family.pipe.scheduler.config)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in (*family.text_encoders, unet):
        model.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)
    vae.requires_grad_(False).eval().to(accelerator.device, dtype=family.vae_dtype(weight_dtype))
    try:
        arg_checks.check_lora_targets(unet, expand_target_modules(args.lora_target_modules))
    except arg_checks.ArgumentError as e:
        fail(str(e))
    lora_params = add_lora(unet, args.rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    reward_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.reward_dtype]
    reward_options = dict(args.reward_options)
    if args.reward_gradient_checkpointing:
        reward_options["gradient_checkpointing"] = True
    try:
        reward_fn = build_reward(args.reward, device=accelerator.device, dtype=reward_dtype, **reward_options)
    except RewardLoadError as e:
        fail(str(e))

    # accelerate save/load hooks: checkpoints hold the LoRA (diffusers format), not the whole UNet.
    def save_model_hook(models, weights, output_dir):
        for model in models:
            save_lora(accelerator.unwrap_model(model), output_dir, family, is_main_process=accelerator.is_main_process)
        weights.clear()

    def load_model_hook(models, input_dir):
        while models:
            load_lora_into_unet(accelerator.unwrap_model(models.pop()), input_dir, family)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            fail("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(lora_params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                              weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # The prepared scheduler steps once per process per call, hence the factor (as in diffusers).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    models = Models(family=family, unet=unet, raw_unet=accelerator.unwrap_model(unet), vae=vae, scheduler=scheduler)
    if args.compile:  # after prepare(): weights on their device, in their dtype, for good
        from utils.compile import compile_no_grad_unet

        models.no_grad_unet = compile_no_grad_unet(models.raw_unet, vae)

    if accelerator.is_main_process:
        # Never hand the token to a tracker; lists/None become strings for tensorboard's hparams.
        config = {k: v if isinstance(v, int | float | str | bool) else str(v)
                  for k, v in vars(args).items() if k != "hub_token"}
        accelerator.init_trackers("draftplus", config=config)
    # What each checkpoint records, so that a resume with another model or LoRA shape is refused.
    checkpoint_config = run_config(args, expand_target_modules(args.lora_target_modules),
                                   unet_fingerprint(args.pretrained_model_name_or_path, args.revision))
    rollout_config = RolloutConfig(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                   truncation_steps=args.truncation_steps, eta=args.eta, lv_samples=args.lv_samples,
                                   final_latent=args.final_latent)
    latent_shape = (args.train_batch_size, models.raw_unet.config.in_channels,
                    args.height // family.vae_scale_factor, args.width // family.vae_scale_factor)

    global_step = 0
    if args.resume_from_checkpoint:
        path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
        if path is None:
            accelerator.print("No checkpoint in --output_dir; starting a new training run.")
        else:
            accelerator.print(f"Resuming from {path}")
            accelerator.load_state(path)
            global_step = int(path.rstrip("/").rsplit("-", 1)[-1])
    metrics_file = os.path.join(args.output_dir, "metrics.jsonl")
    if accelerator.is_main_process:  # the history is this run's own: lines past the resumed step go
        truncate_metrics(metrics_file, global_step)

    logger.info(f"***** DRaFT+ : {len(prompts)} prompts, {args.max_train_steps} steps, batch "
                f"{args.train_batch_size} x {args.gradient_accumulation_steps} x {accelerator.num_processes} "
                f"processes, T={args.num_inference_steps}, K={args.truncation_steps}, kl_coeff={args.kl_coeff} *****")
    validation = None
    if accelerator.is_main_process and args.validation_prompts:
        validation = Validation(args, accelerator, models, reward_fn)
        validation.render_base()  # once (also when resuming): every validation is compared with it

    nonfinite = guards.NonFiniteSteps(args.max_nonfinite_steps)
    last_checkpoint = resolve_resume(args.output_dir, args.resume_from_checkpoint)

    def checkpoint(step: int, fatal: bool) -> None:
        """checkpoint-<step>, never with non-finite weights. A failed write (disk full, permissions) is
        reported with the earlier checkpoints intact; it ends the run only when `fatal`."""
        nonlocal last_checkpoint
        try:
            guards.ensure_finite_weights(accelerator, lora_params, f"checkpoint-{step}")
            last_checkpoint = save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit,
                                              checkpoint_config)
        except guards.NonFiniteError as e:
            fail(str(e), guards.EXIT_NONFINITE)
        except CheckpointWriteError as e:
            if fatal:
                fail(str(e), 1)
            logger.error(f"{e}; training goes on")
            return
        logger.info(f"Saved state to {last_checkpoint}")

    preemption.arm()  # from here a signal stops the run at the next step boundary, with a checkpoint
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    step_metrics = StepMetrics(accelerator.device)
    while global_step < args.max_train_steps:
        step_metrics.start()
        totals = torch.zeros(3, device=accelerator.device)  # loss, reward, penalty
        for micro in range(args.gradient_accumulation_steps):
            keys = (global_step, micro, accelerator.process_index)
            batch = sample_prompts(prompts, args.train_batch_size, args.seed, *keys)
            generator = torch.Generator(accelerator.device).manual_seed(step_seed(args.seed, *keys))
            noise = randn_tensor(latent_shape, generator=generator, device=accelerator.device, dtype=torch.float32)
            last = micro == args.gradient_accumulation_steps - 1
            # Only the last micro-step all-reduces gradients across processes.
            with contextlib.nullcontext() if last else accelerator.no_sync(unet), accelerator.autocast():
                loss, rewards, penalty = draftplus_step(models, reward_fn, batch, noise, rollout_config,
                                                        args.kl_coeff, args.negative_prompt, generator)
                accelerator.backward(loss / args.gradient_accumulation_steps)
            totals += torch.stack([loss.detach(), rewards.mean(), penalty]) / args.gradient_accumulation_steps
            step_metrics.add(rewards, reward_fn)
        grad_norm = accelerator.clip_grad_norm_(lora_params, args.max_grad_norm or float("inf"))
        if nonfinite.check(accelerator, totals[0], grad_norm, global_step + 1):  # else: skipped, no update
            optimizer.step()
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        progress.update(1)

        # Each process draws its own prompts and noise: their rewards differ, and are kept apart.
        by_process = accelerator.gather(totals[None])  # [processes, 3]: one collective for both uses
        reward_by_process, totals = by_process[:, 1].tolist(), by_process.mean(0)
        logs = {"loss": totals[0].item(), "reward": totals[1].item(), "kl_penalty": totals[2].item(),
                "grad_norm": float(grad_norm), "lr": lr_scheduler.get_last_lr()[0], "nonfinite_steps": nonfinite.total,
                **step_metrics.collect(accelerator)}  # reward_std, reward/<part>, images_per_s, peak_memory_gib
        progress.set_postfix(reward=f"{logs['reward']:.4f}", kl=f"{logs['kl_penalty']:.2e}")
        accelerator.log(logs, step=global_step)
        if accelerator.is_main_process:
            with open(metrics_file, "a") as f:
                line = guards.finite_or_none({"step": global_step, **logs, "reward_by_process": reward_by_process})
                f.write(json.dumps(line) + "\n")
        if nonfinite.exhausted:
            progress.close()
            fail(nonfinite.stop_message(last_checkpoint), guards.EXIT_NONFINITE)

        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            checkpoint(global_step, fatal=False)
        if validation is not None and args.validation_steps and global_step % args.validation_steps == 0:
            validation(global_step)
        signum = preemption.requested(accelerator)  # agreed by all ranks
        if signum and global_step < args.max_train_steps:
            progress.close()
            if not (last_checkpoint or "").endswith(f"checkpoint-{global_step}"):
                checkpoint(global_step, fatal=True)
            accelerator.print(f"Stopped by {signal.Signals(signum).name} at step {global_step}; saved "
                              f"{last_checkpoint}. Continue with --resume_from_checkpoint latest.")
            accelerator.end_training()
            raise SystemExit(exit_code(signum))

    # Data parallelism must leave every process with the same LoRA; a silent desync would make the
    # saved weights depend on which rank wrote them.
    try:
        guards.ensure_finite_weights(accelerator, lora_params, "the LoRA")
    except guards.NonFiniteError as e:
        fail(str(e), guards.EXIT_NONFINITE)
    digests = guards.lora_digests_across_ranks(accelerator, lora_state_dict(models.raw_unet))
    if len(set(digests)) > 1:
        fail(f"the LoRA weights differ across processes (sha256 {', '.join(d[:12] for d in digests)}), a "
             "data-parallel desync; the LoRA was not written", 1)
    logger.info(f"LoRA sha256 {digests[0]} (process {accelerator.process_index}, equal on all "
                f"{accelerator.num_processes})", main_process_only=False)
    if accelerator.is_main_process:
        try:
            lora_file = save_lora(models.raw_unet, args.output_dir, family)
        except OSError as e:
            fail(f"{e}; the newest checkpoint is {last_checkpoint}", 1)
        # validation after training, kohya export, curves, model card, upload
        accelerator.print(finish_run(args, accelerator, models, validation, repo_id, global_step, lora_file))
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
