"""The model card (README.md) of a trained LoRA, and what `--push_to_hub` uploads.

Everything in the card is known at the end of training: the base model (a hub id, a local directory,
or draftplus's built-in toy), the DRaFT+ settings, the validation reward of the base model and of the
LoRA on the same fixed prompts and noise, and how to load the LoRA with its family's pipeline class,
with LoRA-scale and AIG hints. No template placeholders, and never a token (the card is built from
the arguments minus `hub_token`, which it never sees).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from utils.lora import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME

# What --push_to_hub uploads: the card, the LoRA (both formats) and the pictures; never checkpoints,
# tracker logs or the metrics files.
HUB_ALLOW_PATTERNS = ["README.md", LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME, "validation/*.png",
                      "validation_before_after.png", "training_curves.png"]
BASE_TAGS = ["lora", "diffusers", "diffusers-training", "text-to-image", "draftplus"]


@dataclass
class BaseModel:
    """Where the base model comes from, as the card must say it."""

    name: str  # what the user passed
    kind: str  # "hub", "local" or "toy"
    load_path: str  # what from_pretrained takes in the card's snippet

    @property
    def hub_id(self) -> str | None:
        return self.name if self.kind == "hub" else None


def describe_base_model(name: str) -> BaseModel:
    if name == "toy":
        return BaseModel(name, "toy", "assets/toy")
    if os.path.isdir(name):
        return BaseModel(name, "local", name)
    return BaseModel(name, "hub", name)


def base_model_license(base: BaseModel, revision: str | None = None) -> str | None:
    """The base model's license, from its card's YAML where that card is on disk (a local model's
    README.md, or the hub cache); None where unknown: the card then names no license."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    readme = None
    if base.kind == "local":
        readme = Path(base.name) / "README.md"
    elif base.kind == "hub":
        cached = try_to_load_from_cache(base.name, "README.md", revision=revision)
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return None
    try:
        license_ = (metadata_load(readme) or {}).get("license")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return license_ if isinstance(license_, str) and license_ else None


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


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def model_card_text(args, pipeline_class_name: str, repo_id: str | None, validation: ValidationSummary | None = None,
                    kohya: bool = False, curves: str | None = None, mixed_precision: str | None = None) -> str:
    """The card: YAML metadata (huggingface_hub's ModelCardData) and a body with no placeholders.
    `mixed_precision`: what the run used (accelerate's resolved setting; default `args.mixed_precision`)."""
    from huggingface_hub import ModelCardData

    base = describe_base_model(args.pretrained_model_name_or_path)
    validation = validation or ValidationSummary()
    from utils.family import UnsupportedModelError, family_for_class_name

    try:
        family_tag = family_for_class_name(pipeline_class_name).hub_tag
    except UnsupportedModelError:
        family_tag = "diffusion"
    tags = BASE_TAGS + [family_tag] + reward_tags(args.reward)
    data = ModelCardData(
        base_model=base.hub_id, license=base_model_license(base, getattr(args, "revision", None)),
        library_name="diffusers", pipeline_tag="text-to-image", tags=tags,
        widget=[{"text": prompt, "output": {"url": url}} for prompt, url in validation.widget] or None,
    )
    lora_source = repo_id or os.path.abspath(args.output_dir)

    if base.kind == "hub":
        base_text = f"[{base.name}](https://huggingface.co/{base.name})"
    elif base.kind == "toy":
        base_text = ("draftplus's built-in toy model (`--pretrained_model_name_or_path toy`): a tiny Stable "
                     "Diffusion pipeline pretrained on coloured shapes, shipped in the `assets/toy/` directory "
                     "of the draftplus repository (not on the Hugging Face Hub)")
    else:
        base_text = f"a local model directory, `{base.name}` (not on the Hugging Face Hub)"
    lines = [
        f"# DRaFT+ LoRA: `{args.reward}` on {base.name if base.kind != 'toy' else 'the draftplus toy model'}",
        "",
        f"A LoRA for {base_text}, fine-tuned with [DRaFT+](https://arxiv.org/abs/2311.04911) (direct reward "
        f"fine-tuning with a KL-style regulariser that keeps images diverse) against the reward `{args.reward}`, "
        "with draftplus's trainer, `train_draftplus.py`.",
        "",
    ]
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

    prompt = json.dumps(validation.widget[0][0] if validation.widget else "a photo of a cat")
    lines += [
        "## Use it", "",
        "```python",
        f"from diffusers import {pipeline_class_name}",
        "",
        f"pipe = {pipeline_class_name}.from_pretrained({json.dumps(base.load_path)})"
        + ("  # in a draftplus checkout" if base.kind == "toy" else ""),
        f"pipe.load_lora_weights({json.dumps(lora_source)})",
        f"prompt = {prompt}",
        "image = pipe(prompt).images[0]",
        "```", "",
        "**Less reward, more diversity.** The LoRA's strength is a dial: scale it down with diffusers' adapter "
        "weights,", "",
        "```python",
        f'pipe.load_lora_weights({json.dumps(lora_source)}, adapter_name="draftplus")',
        'pipe.set_adapters(["draftplus"], adapter_weights=[0.5])  # 0 = base model, 1 = as trained',
        "```", "",
        "or keep the base model's composition and let the LoRA shape the late, detailed steps with annealed "
        "importance guidance (AIG, Jena et al. 2025), from the draftplus repository:", "",
        "```python",
        "from utils.aig import aig_pipeline",
        "",
        'image = aig_pipeline(pipe, "power_2")(prompt).images[0]  # also: linear, step_0.6, ...',
        "```", "",
        "`python -m utils.evaluate --lora DIR --lora_scale 0.25 0.5 0.75 --aig linear power_2` measures reward "
        "and diversity along both dials.", "",
    ]
    if kohya:
        lines += [f"`{KOHYA_WEIGHTS_NAME}` is the same LoRA in kohya's format, for AUTOMATIC1111 and ComfyUI.", ""]

    lines += ["## Training", "", "| setting | value |", "| --- | --- |"]
    lora_alpha = args.lora_alpha if args.lora_alpha is not None else args.rank
    settings = [
        ("reward", f"`{args.reward}`"),
        ("kl_coeff (DRaFT+ penalty weight; 0 = DRaFT)", _fmt(args.kl_coeff)),
        ("prompts", f"`{args.prompts}`"),
        ("steps", _fmt(args.max_train_steps)),
        ("batch", f"{args.train_batch_size} per process x {args.gradient_accumulation_steps} accumulation"),
        ("learning rate", f"{_fmt(args.learning_rate)} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)"),
        ("sampler", f"{args.scheduler}, {args.num_inference_steps} steps, guidance {_fmt(args.guidance_scale)}, "
                    f"eta {_fmt(args.eta)}"),
        ("gradient through the last K steps", _fmt(args.truncation_steps)),
        ("DRaFT-LV samples", _fmt(args.lv_samples) if args.lv_samples else "off"),
        ("decoded latent", args.final_latent),
        ("resolution", f"{args.width}x{args.height}"),
        ("LoRA", f"rank {args.rank}, alpha {_fmt(lora_alpha)}, dropout {_fmt(args.lora_dropout)}, targets "
                 f"{' '.join(args.lora_target_modules)}"),
        ("mixed precision", str(mixed_precision or args.mixed_precision or "no")),
        ("seed", _fmt(args.seed)),
    ]
    if args.negative_prompt:
        settings.append(("negative prompt", f"`{args.negative_prompt}`"))
    lines += [f"| {name} | {value} |" for name, value in settings]
    lines.append("")
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def save_model_card(output_dir: str | os.PathLike, *args, **kwargs) -> Path:
    """Write README.md into `output_dir` (arguments: see `model_card_text`)."""
    path = Path(output_dir) / "README.md"
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
