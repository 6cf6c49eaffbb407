#!/usr/bin/env python
"""DRaFT+ : direct reward fine-tuning of text-to-image diffusion LoRAs, with a KL-style regulariser.

Every model family of utils/families/ (`--help` lists them). Each training sample: draw x_T, denoise
with the LoRA denoiser (UNet or transformer; no autograd for the first T-K steps), keep gradients through
the last K steps and the VAE decoder, score the image with a differentiable reward, and minimise

    loss = -mean_b R(x0_b, prompt_b) + kl_coeff * mean_k mean_{b,c,h,w} (eps_theta - eps_ref)^2

where eps_theta is the noise implied by the guided prediction and eps_ref the same for the same denoiser
with its LoRA disabled, on the same noisy latent. kl_coeff = 0 is plain DRaFT. Launch with
`accelerate launch train_draftplus.py ...`; `--help` lists every option.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

# isort: split
# First, before the slow imports: a Ctrl-C while they run is one line and exit 130 (utils/launchers.py).
from utils.launchers import quiet_interrupt_while_starting, refusals_end_the_launcher

if __name__ == "__main__":  # not when a test imports us
    quiet_interrupt_while_starting("train_draftplus.py")

# isort: split
import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo
from tqdm.auto import tqdm

from rewards import build_reward, list_rewards, parse_reward_options, resolve_dtype
from utils.errors import UserError, fail, first_line, one_line_errors, say
from utils.families import read_model_index
from utils.families.help import family_list, target_presets_help
from utils.families.text_encoders import release_text_encoders, text_encoder_components
from utils.lora import LoraWriteError, adapted_modules, add_lora, lora_state_dict, save_lora
from utils.prompts import sample_prompts
from utils.rollout.compile import compile_no_grad_denoiser
from utils.rollout.loop import Models, RolloutConfig, draftplus_step
from utils.rollout.schedulers import SCHEDULERS
from utils.run import arg_checks, guards, prompt_cache, sharding
from utils.run.checkpoints import Checkpointer, checkpoint_step, public_args, register_lora_hooks
from utils.run.empty_models import empty_sharded_components
from utils.run.end_of_run import finish_run
from utils.run.metrics import StepMetrics
from utils.run.model_card import describe_size
from utils.run.offload import offload_between_calls
from utils.run.output_dir import METRICS_NAME, claim_output_dir, truncate_metrics
from utils.run.preemption import Preemption
from utils.run.validation import DIVERSITY_CHOICES, Validation

PROG = "train_draftplus.py"
logger = get_logger("draftplus")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors (bad type, unknown choice, missing value) as one line, like ours."""

    def error(self, message: str) -> None:
        fail(PROG, f"{message} (--help lists the options)")


@one_line_errors(PROG)
def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (utils/run/arg_checks.py) before any model loads: a problem exits with one line.
    `args.checked` holds what the check found out (the model's family, the prompts, the resume step, ...)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                   help="Hub id or local directory of a diffusers pipeline of a family draftplus trains:\n"
                        f"{family_list()}; the family is read from model_index.json.\n"
                        "The built-in pretrained toys (CPU demos, no hub needed): 'toy' (a UNet, variance-\n"
                        "preserving) and 'toy-flow' (a flow-matching transformer).")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="A replacement VAE (hub id or local dir), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL\n"
                        "in fp16. Without it, SDXL's own VAE is kept in fp32 under fp16, as its pipeline does.")
    g.add_argument("--revision", type=str, default=None, help="Hub revision of the model.")
    g.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. 'fp16'.")
    g.add_argument("--scheduler", type=str, default=None, choices=sorted(SCHEDULERS),
                   help="Sampler used for the training rollout ('model' = the model's own). Default: ddim for\n"
                        "the UNet families; the flow-matching families sample with their pipeline's own\n"
                        "flow-matching Euler sampler (only 'model').")
    g.add_argument("--quantize_base", type=str, default=None, choices=["nf4"],
                   help="QLoRA: load the frozen denoiser in bitsandbytes 4-bit NF4 (computing in the weight dtype)\n"
                        "under the LoRA, as diffusers' FLUX QLoRA example; CUDA only. The DRaFT+ reference\n"
                        "(adapters disabled) is then the quantized base model.")
    g.add_argument("--shard", action="store_true",
                   help="FSDP2: split the frozen denoiser (by transformer blocks) and the largest text encoder\n"
                        "across the processes, the LoRA kept whole on each, for models too big for one GPU\n"
                        "(FLUX.2-dev, Qwen-Image); set by accelerate_configs/fsdp.yaml. docs/scaling.md.")
    g.add_argument("--shard_size", type=int, default=None,
                   help="With --shard on several machines: split the frozen model within groups of N processes\n"
                        "(one machine's GPUs) and replicate it across the groups (hybrid sharding, HSDP); N divides\n"
                        "the process count. Default: one group of all processes (under an accelerate FSDP config\n"
                        "with fsdp_sharding_strategy: HYBRID_SHARD, one machine's processes).")

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
    g.add_argument("--negative_prompt", type=str, default="",
                   help="Negative prompt for classifier-free guidance (where a family guides with true CFG, it\n"
                        "needs --true_cfg_scale > 1: see the family's recipe).")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help=f"{family_list('max_sequence_length')}: prompt tokens of the text encoder\n"
                        "(default: the pipeline's own, as the family's recipe gives it).")
    g.add_argument("--resolution", type=int, default=None,
                   help="Image height and width, a multiple of the family's size unit (its VAE factor x patch\n"
                        "size: 8 or 16). Default: the model's native size, as its pipeline's (its denoiser's\n"
                        "sample_size x the VAE factor, read from the configs; 32 for the toys).")
    g.add_argument("--height", type=int, default=None, help="Image height (multiple of 8 or 16; default --resolution).")
    g.add_argument("--width", type=int, default=None, help="Image width (multiple of 8 or 16; default --resolution).")

    g = p.add_argument_group("rollout")
    g.add_argument("--num_inference_steps", type=int, default=None,
                   help="T: denoising steps per sample (default: the family's, its pipeline's own; 50 for the\n"
                        "UNet families).")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="Classifier-free guidance scale (<=1: off; default: the family's, its pipeline's own).\n"
                        "For a guidance-distilled model, the guidance its transformer takes as an input (one pass\n"
                        "per step); a model without that input takes none.")
    g.add_argument("--true_cfg_scale", type=float, default=None,
                   help=f"{family_list('true_cfg_scale')}: true classifier-free guidance with --negative_prompt\n"
                        "(a second transformer pass per step), on when > 1, as the pipeline's own true_cfg_scale.\n"
                        "Default 1 (off).")
    g.add_argument("--cfg_normalization", type=float, default=None,
                   help=f"{family_list('cfg_normalization')}: cap the guided prediction's norm at this multiple of\n"
                        "the positive prediction's, as the pipeline's cfg_normalization (1 = its True). Default 0 (off).")
    g.add_argument("--cfg_truncation", type=float, default=None,
                   help=f"{family_list('cfg_truncation')}: no guidance at the steps whose (1000 - t) / 1000 exceeds\n"
                        "this, as the pipeline's cfg_truncation. Default 1 (guidance at every step).")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic sampler).")
    g.add_argument("--truncation_steps", type=int, default=1,
                   help="K: the last K denoising steps get gradients (DRaFT-K). Default 1.")
    g.add_argument("--lv_samples", type=int, default=0,
                   help="DRaFT-LV: re-noise the final latent n times and grade one step on each (0 = off).")
    g.add_argument("--final_latent", type=str, default="x0", choices=["x0", "sample"],
                   help="What the VAE decodes after the last step: the model's x0 prediction (default, as\n"
                        "NeMo-Aligner's DRaFT+, so kl_coeff means what it means in NVIDIA's recipes), or the\n"
                        "scheduler's own final sample (images bit-identical to the diffusers pipeline's).\n"
                        "Flow-matching families: the last Euler step lands on sigma 0, so both are the same latent.")

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
                   help="Weight of the DRaFT+ penalty mean (eps_lora - eps_base)^2, eps the noise implied by the\n"
                        "guided prediction (every family alike). 0 = plain DRaFT.")
    g.add_argument("--allow_objective_change", action="store_true",
                   help="Let a resume change the objective (reward and options, kl_coeff, prompts, sampler, T,\n"
                        "K, eta, DRaFT-LV, decoded latent, guidance, negative prompt, size, validation\n"
                        "settings); without it such a resume is refused. The change is recorded in the\n"
                        "checkpoints, metrics.jsonl and the model card (from which step, what changed).")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: rank).")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout.")
    g.add_argument("--lora_target_modules", type=str, nargs="+", default=["attention"],
                   help="Denoiser modules that get LoRA adapters: a preset or module names (PEFT adapts every\n"
                        "module whose name is one of them or ends in '.' + one of them; the model card gives the\n"
                        "count). Default 'attention'. Presets, per family:\n" + target_presets_help(wrap=90))

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
                   help="Checkpoint the graded denoiser steps and the VAE decoder (memory flat in K).")
    g.add_argument("--vae_block_checkpointing", action="store_true",
                   help="With --gradient_checkpointing: checkpoint the VAE decoder per resnet/upsampler/attention\n"
                        "block instead of per up block (diffusers'): less memory in the decode's backward at large\n"
                        "sizes, the same images and gradients. See docs/memory.md.")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--offload_text_encoders", action="store_true",
                   help="Keep the text encoders in CPU memory but while they encode the prompts: they are not on\n"
                        "the GPU at the step's peak (T5-XXL: 9.5 GB in bf16). Same results; slower steps.")
    g.add_argument("--precompute_prompt_embeddings", type=str, nargs="?", const="accelerator", default=None,
                   choices=prompt_cache.MODES,
                   help="Encode the run's prompts (training and validation) once, before the denoiser, VAE and reward\n"
                        "come to the GPU, cache them in output_dir/prompt_embeddings/ (safetensors) and free the text\n"
                        "encoders: none is in memory during training (FLUX.2-dev's Mistral: 48 GB in bf16). Bare\n"
                        "flag = accelerator: each encoder on the GPU only for its forward calls, alone; cpu: they\n"
                        "never leave the CPU (slower; for an encoder the GPU cannot hold). A resume with the same\n"
                        "settings reads the cache and loads no text encoder. Same images and gradients at batch 1.")
    g.add_argument("--estimate_memory", action="store_true",
                   help="Print the estimated peak GPU memory of one training step of this command line, per\n"
                        "process, by part, and exit without training: traced on the CPU under fake tensors,\n"
                        "from the model's configs alone (no weights, no GPU). See docs/memory.md.")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the rollout's no-grad denoiser calls (the T-K prefix and the adapters-off\n"
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
                   choices=DIVERSITY_CHOICES,
                   help="Also log the validation images' diversity (mean pairwise distance per prompt). Bare flag\n"
                        "= auto: LPIPS if torchvision's AlexNet weights are available, else the LPIPS stand-in on\n"
                        "a fixed random AlexNet (lpips_random_backbone); the metric used is logged.")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", type=str, default="draftplus-lora",
                   help="Where the LoRA and checkpoints go. One run at a time: a directory another run is\n"
                        "using is refused, and so is one holding a previous run unless\n"
                        "--resume_from_checkpoint or --overwrite_output_dir is given.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start over in an --output_dir that holds a previous run: everything it wrote\n"
                        "(checkpoints, LoRA files, metrics, validation, curves, model card, tracker logs) is\n"
                        "removed first.")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save accelerate state every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="A checkpoint-N directory, or 'latest' (newest in --output_dir; fresh start if none).")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help=f"accelerate tracker: {', '.join(arg_checks.TRACKERS)},\n"
                        "all (every one installed), or none.")
    g.add_argument("--logging_dir", type=str, default="logs", help="Tracker directory, relative to --output_dir.")
    g.add_argument("--no_kohya_export", dest="export_kohya", action="store_false",
                   help="Do not write the file ComfyUI loads: pytorch_lora_weights_kohya.safetensors for the UNet\n"
                        "families (AUTOMATIC1111 loads it too), pytorch_lora_weights_comfyui.safetensors for the\n"
                        "flow-matching ones (written by default; `python -m utils.run.export DIR` writes it later).")
    g.add_argument("--export_kohya", dest="export_kohya", action="store_true", help=argparse.SUPPRESS)  # the default
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
        print(list_rewards())
        raise SystemExit(0)
    args = p.parse_args(input_args)
    # The values that follow from others, resolved once for every reader (model card, validation, checks).
    # --height and --width default to --resolution, itself the model's native size: both in the argument check
    args.reward_options = parse_reward_options(args.reward_options)
    args.checked = arg_checks.check_training_args(args)
    if warning := arg_checks.token_warning(args):
        say(PROG, warning)
    return args


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def step_seed(seed: int, *keys: int) -> int:
    """A per-(step, micro-step, process) seed: resumed runs draw exactly the same noise."""
    return hash((seed, *keys)) % (2**63)


def accumulate_gradients(accelerator: Accelerator, models: Models, reward_fn: Callable, prompts: Sequence[str],
                         args: argparse.Namespace, config: RolloutConfig, latent_shape: tuple[int, ...], step: int,
                         step_metrics: StepMetrics) -> torch.Tensor:
    """The --gradient_accumulation_steps micro-steps of one optimiser step. Each draws its own prompts and
    noise, keyed by (step, micro-step, process), and backpropagates its loss divided by their count, so the
    gradient is that of the mean loss over all of the step's samples. Returns [loss, reward, penalty] of
    this process, averaged over the micro-steps."""
    totals = torch.zeros(3, device=accelerator.device)
    count = args.gradient_accumulation_steps
    for micro in range(count):
        keys = (step, micro, accelerator.process_index)
        batch = sample_prompts(prompts, args.train_batch_size, args.seed, *keys)
        generator = torch.Generator(accelerator.device).manual_seed(step_seed(args.seed, *keys))
        noise = randn_tensor(latent_shape, generator=generator, device=accelerator.device, dtype=torch.float32)
        # Only the last micro-step all-reduces gradients across processes.
        sync = contextlib.nullcontext() if micro == count - 1 else accelerator.no_sync(models.denoiser)
        with sync, accelerator.autocast():
            loss, rewards, penalty = draftplus_step(models, reward_fn, batch, noise, config, args.kl_coeff,
                                                    args.negative_prompt, generator)
            accelerator.backward(loss / count)
        totals += torch.stack([loss.detach(), rewards.mean(), penalty]) / count
        step_metrics.add(rewards, reward_fn)
    return totals


def given_components(args: argparse.Namespace, checked: arg_checks.CheckedArgs, accelerator: Accelerator,
                     weight_dtype: torch.dtype, loads_text_encoders: bool) -> dict[str, torch.nn.Module | None]:
    """The pipeline components this process does not read from the model's files (name -> module, or None: none):
    off rank 0 with --shard, the modules to shard, built empty (rank 0 broadcasts their weights into the shards:
    utils/run/empty_models.py); the text encoders, when the prompts' cached embeddings stand in for them."""
    given: dict[str, torch.nn.Module | None] = {}
    if args.shard and not accelerator.is_main_process:
        given |= empty_sharded_components(checked.family, args.pretrained_model_name_or_path, args.revision,
                                          weight_dtype)
    if not loads_text_encoders:
        given |= text_encoder_components(read_model_index(args.pretrained_model_name_or_path, args.revision))
    return given


def load_models(args: argparse.Namespace, checked: arg_checks.CheckedArgs, accelerator: Accelerator) -> Models:
    """The model's pipeline, loaded in the run's dtype (the VAE in its family's), frozen, with the training
    rollout's sampler; with --quantize_base the denoiser's base weights in 4-bit; with
    --precompute_prompt_embeddings the prompts' conditioning from the cache (encoded first where it is not this
    run's) and no text encoder. Only the LoRA adapters added later train."""
    mixed = accelerator.mixed_precision
    weight_dtype = resolve_dtype(mixed) if mixed in ("fp16", "bf16") else torch.float32
    cache, guided = None, RolloutConfig(guidance_scale=args.guidance_scale).guided
    if args.precompute_prompt_embeddings:  # only the main process encodes, and only when the cache is not this run's
        cache = prompt_cache.PromptEmbeddingCache(args.output_dir, prompt_cache.fingerprint(
            args, checked, weight_dtype, accelerator.device, guided))
    encode = cache is not None and accelerator.is_main_process and not cache.ready()
    try:
        family = checked.family.load(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                                     vae_name_or_path=args.pretrained_vae_model_name_or_path, dtype=weight_dtype,
                                     vae_dtype=checked.family.vae_load_dtype(weight_dtype),
                                     quantize_base=args.quantize_base, **checked.family_options,
                                     components=given_components(args, checked, accelerator, weight_dtype,
                                                                 loads_text_encoders=cache is None or encode))
    except OSError as e:  # not on the hub, no network, a missing file: say what, not a traceback
        raise UserError(f"could not load the model {args.pretrained_model_name_or_path!r} ({first_line(e)}); "
                        "point --pretrained_model_name_or_path at a local copy (a directory saved with "
                        "save_pretrained)") from e
    if cache is not None:  # before anything else comes to the GPU; then no text encoder is left to move
        if encode:
            device = torch.device("cpu") if args.precompute_prompt_embeddings == "cpu" else accelerator.device
            cache.write(family, args, checked.prompts, guided, device, accelerator.autocast)
        cache.wait()
        released = release_text_encoders(family, accelerator.device)
        logger.info(f"Prompt embeddings from {cache.path}; text encoders {', '.join(released) or 'not loaded'}; "
                    f"validation's {prompt_cache.replay_prompt_encodings(family.pipe, cache.path)} encode_prompt call(s)",
                    main_process_only=False)
    # Text encoders and denoiser were loaded in the weight dtype (as the pipeline loads them: a module it keeps in
    # fp32, such as T5's output projections under fp16, stays so); a 4-bit denoiser was loaded onto its device;
    # with --shard, `fully_shard` moves the modules it shards to the device shard by shard (a sharded text encoder is
    # not offloaded: only its shards stay, and off rank 0 it has no weights to move until then).
    left = sharding.modules_to_shard(family) if args.shard else []
    for model in (*family.text_encoders, family.denoiser):
        model.requires_grad_(False).eval()
        if any(model is m for m in left) or (model is family.denoiser and family.quantized):
            continue
        if args.offload_text_encoders and model is not family.denoiser:
            offload_between_calls(model, accelerator.device)
            family.execution_device = accelerator.device
        else:
            model.to(accelerator.device)
    family.vae.requires_grad_(False).eval().to(accelerator.device)
    if family.vae.dtype != family.vae_dtype(weight_dtype):  # e.g. SDXL's fp16-fix VAE, loaded in fp32 to decide
        family.vae.to(dtype=family.vae_dtype(weight_dtype))
    scheduler = getattr(diffusers, checked.scheduler).from_config(family.pipe.scheduler.config)
    return Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                  scheduler=scheduler, prompt_embeddings=None if cache is None else cache.embeddings(
                      checked.prompts, args, guided, accelerator.device))


def save_final_lora(accelerator: Accelerator, args: argparse.Namespace, models: Models,
                    lora_params: Sequence[torch.Tensor], newest_checkpoint: str | None) -> Path | None:
    """The trained LoRA into --output_dir (by the main process; None elsewhere), once it is known to be
    finite and the same on every process."""
    guards.ensure_finite_weights(accelerator, lora_params, "the LoRA")
    digest = guards.ensure_same_lora_on_all_ranks(accelerator, lora_state_dict(models.raw_denoiser, models.family))
    logger.info(f"LoRA weights digest {digest} (process {accelerator.process_index}, equal on all "
                f"{accelerator.num_processes}): the sha256 of the weights' names and values, not of a file",
                main_process_only=False)
    if not accelerator.is_main_process:
        return None
    try:
        return save_lora(models.raw_denoiser, args.output_dir, models.family)
    except LoraWriteError as e:
        raise LoraWriteError(f"{e}; the newest checkpoint is {newest_checkpoint}") from e


@one_line_errors(PROG)
def main(args: argparse.Namespace) -> None:
    checked: arg_checks.CheckedArgs = args.checked
    if args.estimate_memory:  # before anything loads or is written
        from utils.memory import estimate_memory, render

        print(render(estimate_memory(args, checked)))
        return
    preemption = Preemption().install()  # before training: a signal exits at once, releasing the lock
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
    arg_checks.check_process_count(accelerator.num_processes)
    # One run per directory: the main process takes the lock before anything is written (and removes
    # it on exit); all processes learn whether it could, so they exit together when it could not.
    if notice := claim_output_dir(accelerator, args.output_dir, args.overwrite_output_dir, args.logging_dir):
        logger.warning(notice)
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = create_repo(repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True,
                              token=args.hub_token).repo_id

    models = load_models(args, checked, accelerator)
    lora_params = add_lora(models.denoiser, args.rank, args.lora_alpha, args.lora_dropout, checked.lora_targets)
    sharded: sharding.ShardedModels | None = None
    if args.shard:  # the LoRA is in the blocks before they are sharded; it stays whole (utils/run/sharding.py)
        sharded = sharding.shard_models(models.family, lora_params, accelerator.device,
                                        sharding.reshard_after_forward(accelerator), from_rank0=True,
                                        shard_size=args.shard_size)
        logger.info(f"--shard: {sharded.describe()}")
    if args.gradient_checkpointing:
        checkpointed = models.family.enable_gradient_checkpointing(args.vae_block_checkpointing)
        logger.info(f"Gradient checkpointing: {', '.join(checkpointed)}")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    reward_options = {**args.reward_options, **({"gradient_checkpointing": True}
                                                 if args.reward_gradient_checkpointing else {})}
    reward_fn = build_reward(args.reward, device=accelerator.device, dtype=resolve_dtype(args.reward_dtype),
                             **reward_options)

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if args.use_8bit_adam:
        import bitsandbytes  # optional, CUDA only; the argument check made sure it is installed

        optimizer_cls = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(lora_params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                              weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # The prepared scheduler steps once per process per call, hence the factor (as in diffusers).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    if sharded is None:
        register_lora_hooks(accelerator, models.family)
        models.denoiser, optimizer, lr_scheduler = accelerator.prepare(models.denoiser, optimizer, lr_scheduler)
    else:  # accelerate holds neither the sharded denoiser nor its optimizer; the checkpoint hooks save them
        lr_scheduler = accelerator.prepare(lr_scheduler)
        sharding.register_checkpoint_hooks(accelerator, models.family, sharded, optimizer)
    models.raw_denoiser = accelerator.unwrap_model(models.denoiser)
    if args.compile:  # after prepare(): weights on their device, in their dtype, for good
        models.no_grad_denoiser = compile_no_grad_denoiser(models.raw_denoiser, models.vae)

    if accelerator.is_main_process:
        accelerator.init_trackers("draftplus", config=public_args(args))
    rollout_config = RolloutConfig(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                   truncation_steps=args.truncation_steps, eta=args.eta, lv_samples=args.lv_samples,
                                   final_latent=args.final_latent)
    latent_shape = models.family.latent_shape(args.train_batch_size, args.height, args.width)
    # What each checkpoint records, so that a resume with another model, LoRA shape or objective is refused.
    checkpoints = Checkpointer(accelerator, args.output_dir, args.checkpoints_total_limit, lora_params,
                               checked.run_config, last=checked.resume_from)
    global_step = checked.first_step
    if checked.resume_from is not None:
        accelerator.print(f"Resuming from {checked.resume_from}")
        accelerator.load_state(checked.resume_from)
    elif args.resume_from_checkpoint:
        accelerator.print("No checkpoint in --output_dir; starting a new training run.")
    metrics_file = os.path.join(args.output_dir, METRICS_NAME)
    if accelerator.is_main_process:  # the history is this run's own: lines past the resumed step go
        truncate_metrics(metrics_file, global_step)

    logger.info(f"***** DRaFT+ : {len(checked.prompts)} prompts, {args.max_train_steps} steps, batch "
                f"{args.train_batch_size} x {args.gradient_accumulation_steps} x {accelerator.num_processes} "
                f"processes, T={args.num_inference_steps}, K={args.truncation_steps}, kl_coeff={args.kl_coeff}, "
                f"{describe_size(args.width, args.height, checked.native_size)}, LoRA on "
                f"{len(adapted_modules(models.raw_denoiser))} modules *****")
    validation = None
    # Sharded, every process renders the validation with the main one: each block's forward all-gathers from all.
    if args.validation_prompts and (accelerator.is_main_process or sharded is not None):
        validation = Validation(args, accelerator, models, reward_fn, start_step=global_step)
        validation.render_base()  # once (also when resuming): every validation is compared with it

    nonfinite = guards.NonFiniteSteps(args.max_nonfinite_steps)
    preemption.arm()  # from here a signal stops the run at the next step boundary, with a checkpoint
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    step_metrics = StepMetrics(accelerator.device)
    while global_step < args.max_train_steps:
        step_metrics.start()
        totals = accumulate_gradients(accelerator, models, reward_fn, checked.prompts, args, rollout_config,
                                      latent_shape, global_step, step_metrics)
        if sharded is not None:  # what DDP's all-reduce does in the last micro-step's backward
            sharded.average_gradients()
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
                if checked.objective_change and global_step == checked.objective_change["from_step"]:
                    line["objective_change"] = checked.objective_change["changes"]  # {flag: [before, after]}
                f.write(json.dumps(line) + "\n")
        if nonfinite.exhausted:
            progress.close()
            raise guards.NonFiniteError(nonfinite.stop_message(checkpoints.last))

        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            checkpoints.save(global_step, fatal=False)
        if validation is not None and args.validation_steps and global_step % args.validation_steps == 0:
            validation(global_step)
        signum = preemption.requested(accelerator)  # agreed by all ranks
        if signum and global_step < args.max_train_steps:
            progress.close()
            if checkpoint_step(checkpoints.last or "") != global_step:
                checkpoints.save(global_step, fatal=True)
            accelerator.print(f"Stopped by {signal.Signals(signum).name} at step {global_step}; saved "
                              f"{checkpoints.last}. Continue with --resume_from_checkpoint latest.")
            accelerator.end_training()
            preemption.exit(signum)

    lora_file = save_final_lora(accelerator, args, models, lora_params, checkpoints.last)
    if validation is not None:  # the last render, here for the processes of a sharded run that only render
        validation(global_step)
    if accelerator.is_main_process:  # validation after training, kohya export, curves, model card, upload
        accelerator.print(finish_run(args, accelerator, models, validation, repo_id, global_step, lora_file,
                                     checked.objective_changes))
    accelerator.end_training()


if __name__ == "__main__":
    # A refusal under accelerate launch or torchrun is our one line, not the launcher's traceback too. Once the
    # processes run apart (main), torchrun's agent must stay: it is what stops the other workers.
    with refusals_end_the_launcher():
        parsed = parse_args()
    with refusals_end_the_launcher(elastic=False):
        main(parsed)
