"""The model card (README.md) of a trained LoRA, and what `--push_to_hub` uploads.

Everything in the card is known at the end of training: the base model (a hub id, a local directory,
or draftplus's built-in toy), the objective (the full reward spec with its options, and any change a
resume was allowed to make), the validation reward of the base model and of the LoRA on the same fixed
prompts and noise, which file each tool loads, and commands that run as printed: loading the LoRA with
its family's pipeline class, turning it down, and measuring it with the evaluator. No template
placeholders, never a token (the card is built from the arguments minus `hub_token`, which it never
sees), and no directory of the machine that trained it: local paths are written relative to the
directory the run started in, or shortened to their last part where they lie outside it.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from utils.evaluation.run_settings import SETTINGS_NAME, sampling_settings
from utils.families import ModelFamily, family_for_class_name
from utils.lora import COMFYUI_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from utils.run.card_base_model import (
    TOY_IMPORT,
    BaseModel,
    CardPaths,
    base_model_license,
    describe_base_model,
)
from utils.run.objective import describe_changes, show_value
from utils.run.plots import CURVES_NAME
from utils.run.validation import BEFORE_AFTER_NAME, VALIDATION_DIR

CARD_NAME = "README.md"
# What --push_to_hub uploads: the card, the LoRA (every format), its sampler settings (for the evaluator) and
# the pictures; never checkpoints, tracker logs or the metrics files.
HUB_ALLOW_PATTERNS = [CARD_NAME, LORA_WEIGHTS_NAME, SETTINGS_NAME, KOHYA_WEIGHTS_NAME, COMFYUI_WEIGHTS_NAME, f"{VALIDATION_DIR}/*.png",
                      BEFORE_AFTER_NAME, CURVES_NAME]
BASE_TAGS = ["lora", "diffusers", "diffusers-training", "text-to-image", "draftplus"]


def is_draftplus_card(path: str | os.PathLike) -> bool:
    """Whether a README.md is a card this module wrote (its YAML carries the draftplus tag)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    front = text.split("\n---", 1)[0] if text.startswith("---") else ""
    return "- draftplus" in front


# ----------------------------------------------------------------------------------------------
# Paths the card may write
# ----------------------------------------------------------------------------------------------
def reward_tags(spec: str) -> list[str]:
    """The registered reward names of a spec (custom rewards tag as `custom-reward`)."""
    from rewards.spec import parse_reward_spec

    tags = []
    for item in parse_reward_spec(spec):
        tag = item.registered or "custom-reward"
        if tag not in tags:
            tags.append(tag)
    return tags


@dataclass
class ValidationSummary:
    """Validation figures for the card (all optional)."""

    reward_before: float | None = None
    reward_after: float | None = None
    num_images: int = 0
    step: int = 0
    diversity_before: float | None = None
    diversity_after: float | None = None
    diversity_metric: str | None = None
    grid: str | None = None  # path relative to the output dir
    widget: list[tuple[str, str]] = field(default_factory=list)  # (prompt, image path relative to the output dir)


def reward_spec_text(spec: str, options: Mapping[str, object], paths: CardPaths) -> str:
    """The reward as the card states it: the spec, and its options as --reward_options takes them."""
    text = f"`{paths.text(spec)}`"
    if options:
        text += " with options " + " ".join(f"`{paths.text(f'{k}={show_value(v)}')}`" for k, v in options.items())
    return text


def run_sampling_settings(args, family: type[ModelFamily]) -> dict:
    """How the run sampled (`utils.evaluation.run_settings.sampling_settings`), as the argument check recorded
    it beside the LoRA; worked out again for arguments that did not go through it."""
    checked = getattr(args, "checked", None)
    return dict(checked.sampling_settings) if checked is not None else sampling_settings(args, family, None)


def evaluate_command(args, base: BaseModel, lora_dir: str, paths: CardPaths, settings: Mapping[str, object]) -> str:
    """The evaluator's command line for this LoRA, with the training run's model, prompts, reward and
    sampler (`settings`, the ones recorded beside the LoRA: none its family refuses), so that it measures what
    the LoRA was trained for."""
    words = ["python -m utils.evaluation", f"--pretrained_model_name_or_path {shlex.quote(base.name)}",
             f"--prompts {shlex.quote(paths.text(str(args.prompts)))}", "--max_prompts 8", "--seeds_per_prompt 4",
             f"--reward {shlex.quote(paths.text(args.reward))}"]
    if args.reward_options:
        words.append("--reward_options " + " ".join(shlex.quote(paths.text(f"{k}={show_value(v)}"))
                                                   for k, v in args.reward_options.items()))
    words += [f"--{name} {shlex.quote(show_value(value))}" for name, value in settings.items()
              if value is not None and not (name == "eta" and value == 0)]  # eta 0: every sampler's default
    words += [f"--lora {shlex.quote(lora_dir)}", "--lora_scale 0.25 0.5 0.75", "--aig linear power_2",
              f"--output_dir {shlex.quote(lora_dir.rstrip('/') + '-eval')}"]
    lines, line = [], ""
    for word in words:  # wrapped as a shell line continued with backslashes
        if line and len(line) + len(word) > 100:
            lines.append(line + " \\")
            line = "  " + word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def describe_size(width: int, height: int, native_size: int | None) -> str:
    """`1024x1024 (the model's native size)`, or how the size differs from it."""
    if native_size is None:
        return f"{width}x{height}"
    if width == height == native_size:
        return f"{width}x{height} (the model's native size)"
    return f"{width}x{height} (the model's native size is {native_size}x{native_size})"


def model_card_text(args, pipeline_class_name: str, repo_id: str | None, validation: ValidationSummary | None = None,
                    ui_lora: str | None = None, curves: str | None = None, mixed_precision: str | None = None,
                    objective_changes: Sequence[Mapping] = (), start: str | os.PathLike | None = None,
                    lora_modules: int | None = None) -> str:
    """The card: YAML metadata (huggingface_hub's ModelCardData) and a body with no placeholders.
    `ui_lora`: the name of the file written for ComfyUI and AUTOMATIC1111 (None: none was written);
    `mixed_precision`: what the run used (accelerate's resolved setting; default `args.mixed_precision`);
    `objective_changes`: what resumes changed ([{from_step, changes}], utils/run/objective.py); `start`: the
    directory the run started in (default: the current one), which local paths are written relative to;
    `lora_modules`: how many denoiser modules the LoRA adapts (None: not counted)."""
    from huggingface_hub import ModelCardData

    paths = CardPaths(start)
    base = describe_base_model(args.pretrained_model_name_or_path, paths)
    validation = validation or ValidationSummary()
    family = family_for_class_name(pipeline_class_name)
    tags = BASE_TAGS + [family.hub_tag] + reward_tags(args.reward)
    license_ = base_model_license(base, family, getattr(args, "revision", None))
    data = ModelCardData(
        base_model=base.hub_id, license=license_.id if license_ else None,
        license_name=license_.name if license_ else None, license_link=license_.link if license_ else None,
        library_name="diffusers", pipeline_tag="text-to-image", tags=tags,
        widget=[{"text": prompt, "output": {"url": url}} for prompt, url in validation.widget] or None,
    )
    local_lora = paths.path(os.path.abspath(args.output_dir))
    lora_source = repo_id or local_lora
    reward = reward_spec_text(args.reward, args.reward_options, paths)
    prompts = paths.text(str(args.prompts))
    evaluate = evaluate_command(args, base, repo_id.split("/")[-1] if repo_id else local_lora, paths,
                                run_sampling_settings(args, family))

    if base.kind == "hub":
        base_text = f"[{base.name}](https://huggingface.co/{base.name})"
    elif base.kind == "toy":
        base_text = (f"draftplus's built-in toy model (`--pretrained_model_name_or_path {base.name}`): a tiny "
                     f"`{pipeline_class_name}` pretrained on coloured shapes, shipped in the `assets/{base.name}/` "
                     "directory of the draftplus repository (not on the Hugging Face Hub)")
    else:
        base_text = f"a local model directory, `{base.name}` (not on the Hugging Face Hub)"
    lines = [
        f"# DRaFT+ LoRA: {reward} on "
        + (f"the draftplus toy model (`{base.name}`)" if base.kind == "toy" else base.name),
        "",
        f"A LoRA for {base_text}, fine-tuned with [DRaFT+](https://arxiv.org/abs/2311.04911) (direct reward "
        f"fine-tuning with a KL-style regulariser that keeps images diverse) against the reward {reward}, "
        "with draftplus's trainer, `train_draftplus.py`.",
        "",
    ]
    if license_:
        shown = f"`{license_.name or license_.id}`"
        lines += [f"License: the base model's, {f'[{shown}]({license_.link})' if license_.link else shown}; "
                  "this LoRA is a derivative of the base model and falls under it.", ""]
    if objective_changes:
        lines += ["The objective changed during training (a resume with `--allow_objective_change`): "
                  + "; ".join(f"from step {c['from_step']}: {paths.text(describe_changes(c['changes']))}"
                              for c in objective_changes) + ". The settings below are the last ones.", ""]
    if validation.reward_after is not None:
        lines += ["## Validation", "",
                  f"The same {validation.num_images} images (validation prompts x fixed seeds, the same initial "
                  f"noise) rendered by the base model and by this LoRA after {validation.step} steps, scored with "
                  "the training reward:", "",
                  "| | base model | this LoRA |", "| --- | --- | --- |",
                  f"| mean reward | {validation.reward_before:.4f} | {validation.reward_after:.4f} |"]
        if validation.diversity_after is not None:
            lines.append(f"| diversity ({validation.diversity_metric}, mean pairwise per prompt) | "
                         f"{validation.diversity_before:.4f} | {validation.diversity_after:.4f} |")
        lines.append("")
        if validation.grid:
            lines += [f"![base (left) and this LoRA (right), each image with its reward]({validation.grid})", ""]
    if curves:
        lines += [f"![training reward, KL penalty and validation reward against step]({curves})", ""]

    lines += ["## Files", "", "| file | loads in |", "| --- | --- |",
              f"| `{LORA_WEIGHTS_NAME}` | diffusers: `pipe.load_lora_weights(...)` (its metadata carries the LoRA "
              "config, alpha included) |",
              f"| `{SETTINGS_NAME}` | draftplus's evaluator: the sampler settings the LoRA was trained with, used for "
              "every one it is not given |"]
    if ui_lora:
        loads_in, why = family.ui_lora_card(ui_lora)
        lines += [f"| `{ui_lora}` | {loads_in} |", "", why, ""]
    else:
        lines += ["", f"This run wrote no file for {family.ui_lora_tools} (`--no_kohya_export`); in a draftplus "
                  f"checkout, `python -m utils.run.export {shlex.quote(local_lora)}` writes "
                  f"`{family.ui_lora_name}`.", ""]

    prompt = json.dumps(validation.widget[0][0] if validation.widget else "a photo of a cat")
    toy = base.kind == "toy"
    big = family.inference_in_bf16 and not toy  # the toys are CPU demos, in fp32
    # A toy renders with the training run's sampler steps and size: its pipeline's defaults (50 steps at 64 px)
    # take minutes on a CPU for a LoRA never trained there.
    render = (f"(prompt, num_inference_steps={args.num_inference_steps}, "
              f"guidance_scale={show_value(args.guidance_scale)}, height={args.height}, width={args.width})"
              if toy else "(prompt)")
    where = []
    if base.kind == "toy" or not repo_id:
        where.append("Run these from the directory the training ran in"
                     + (" (the draftplus repository, which holds the toy)" if base.kind == "toy" else "")
                     + ": local paths are relative to it.")
    if paths.shortened:
        where.append(f"{', '.join(f'`{p}`' for p in paths.shortened)} "
                     f"{'stands for a path' if len(paths.shortened) == 1 else 'stand for paths'} outside it on the "
                     "machine that trained this LoRA (the card writes no absolute path): use your own.")
    lines += [
        "## Use it", "",
        *([" ".join(where), ""] if where else []),
        "```python",
        *(["import torch"] if big else []),
        f"from diffusers import {pipeline_class_name}",
        *([TOY_IMPORT] if base.kind == "toy" else []),
        "",
        f"pipe = {pipeline_class_name}.from_pretrained({base.load_path}"
        + (", dtype=torch.bfloat16)" if big else ")"),
        f"pipe.load_lora_weights({json.dumps(lora_source)})",
        f"prompt = {prompt}",
        f"image = pipe{render}.images[0]",
        "```", "",
        "**Less reward, more diversity.** The LoRA's strength is a dial: scale it down with diffusers' adapter "
        "weights,", "",
        "```python",
        "pipe.unload_lora_weights()",
        f'pipe.load_lora_weights({json.dumps(lora_source)}, adapter_name="draftplus")',
        'pipe.set_adapters(["draftplus"], adapter_weights=[0.5])  # 0 = base model, 1 = as trained',
        "```", "",
        "or keep the base model's composition and let the LoRA shape the late, detailed steps with annealed "
        "importance guidance (AIG, Jena et al. 2025), from the draftplus repository:", "",
        "```python",
        "from utils.evaluation.aig import aig_pipeline",
        "",
        f'image = aig_pipeline(pipe, "power_2"){render}.images[0]  # also: linear, step_0.6, ...',
        "```", "",
        "Reward and diversity along both dials, measured with the training run's model, prompts, reward and "
        "sampler (in the draftplus repository"
        + (f"; first `hf download {repo_id} --local-dir {repo_id.split('/')[-1]}`" if repo_id else "")
        + "; offline, LPIPS cannot download torchvision's AlexNet weights: add "
        "`--diversity_metric lpips_random_backbone`, a stand-in not comparable with LPIPS):", "",
        "```bash",
        evaluate,
        "```", "",
    ]

    lines += ["## Training", "", "| setting | value |", "| --- | --- |"]
    lora_alpha = args.lora_alpha if args.lora_alpha is not None else args.rank
    settings = [
        ("reward", reward),
        ("kl_coeff (DRaFT+ penalty weight; 0 = DRaFT)", show_value(args.kl_coeff)),
        ("prompts", f"`{prompts}`"
                    + (f" (first {args.max_prompts})" if args.max_prompts else "")),
        ("steps", show_value(args.max_train_steps)),
        ("batch", f"{args.train_batch_size} per process x {args.gradient_accumulation_steps} accumulation"),
        ("learning rate", f"{show_value(args.learning_rate)} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)"),
        ("sampler", f"{args.scheduler}, {args.num_inference_steps} steps, guidance {show_value(args.guidance_scale)}, "
                    f"eta {show_value(args.eta)}"),
        ("gradient through the last K steps", show_value(args.truncation_steps)),
        ("DRaFT-LV samples", show_value(args.lv_samples) if args.lv_samples else "off"),
        ("decoded latent", args.final_latent),
        ("resolution", describe_size(args.width, args.height, getattr(getattr(args, "checked", None), "native_size",
                                                                      None))),
        ("LoRA", f"rank {args.rank}, alpha {show_value(lora_alpha)}, dropout {show_value(args.lora_dropout)}, targets "
                 f"{' '.join(args.lora_target_modules)}"
                 + (f" ({lora_modules} {family.denoiser_name} modules)" if lora_modules is not None else "")),
        ("mixed precision", str(mixed_precision or args.mixed_precision or "no")),
        ("seed", show_value(args.seed)),
    ]
    if args.negative_prompt:
        settings.append(("negative prompt", f"`{args.negative_prompt}`"))
    if getattr(args, "max_sequence_length", None) is not None:
        settings.append(("prompt tokens (--max_sequence_length)", show_value(args.max_sequence_length)))
    if (getattr(args, "true_cfg_scale", None) or 1) > 1 and args.negative_prompt:  # the pipelines' rule: both, or off
        settings.append(("true CFG scale", show_value(args.true_cfg_scale)))
    if getattr(args, "quantize_base", None):
        settings.append(("base weights", f"{args.quantize_base} (QLoRA): the DRaFT+ reference (adapters off) "
                                         "was the quantized base model"))
    if getattr(args, "precompute_prompt_embeddings", None):  # the CPU rounds the embeddings as the GPU does not
        settings.append(("prompt embeddings", f"encoded once before training, on the "
                                              f"{'CPU' if args.precompute_prompt_embeddings == 'cpu' else 'GPU'} "
                                              f"(`--precompute_prompt_embeddings {args.precompute_prompt_embeddings}`)"))
    settings += [(f"objective from step {c['from_step']}", paths.text(describe_changes(c["changes"])))
                 for c in objective_changes]
    lines += [f"| {name} | {value} |" for name, value in settings]
    lines.append("")
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def save_model_card(output_dir: str | os.PathLike, *args, **kwargs) -> Path:
    """Write README.md into `output_dir` (arguments: see `model_card_text`)."""
    path = Path(output_dir) / CARD_NAME
    path.write_text(model_card_text(*args, **kwargs), encoding="utf-8")
    return path


def push_to_hub(output_dir: str | os.PathLike, repo_id: str, token: str | None, logging_dir: str,
                extra_ignore: Sequence[str] = ()) -> None:
    """Upload the card, the LoRA (and kohya file), the validation grids and the curves; nothing else."""
    from huggingface_hub import upload_folder

    upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="End of training",
                  allow_patterns=HUB_ALLOW_PATTERNS,
                  ignore_patterns=["step_*", "epoch_*", "checkpoint-*", f"{logging_dir}/*", "*.partial", ".tmp-*",
                                   *extra_ignore],
                  token=token)
