"""Validation during training: fixed prompts and seeds, the base model's images next to the LoRA's.

The validation prompts are rendered with fixed per-image seeds through the model family's diffusers
pipeline and scored with the training reward. The base model (the same denoiser with its adapters
disabled) is rendered once, at the start, and kept in memory; every `--validation_steps` steps the
current LoRA renders the same prompts from the same noise, so any difference is the training's doing.

Each validation writes `validation/step-N.png` (per prompt, the base's images on the left and the
LoRA's on the right, each with its reward written under it), appends a line to `validation.jsonl`
(rewards, and with `--validation_diversity` the mean pairwise diversity of each prompt's images) and
logs both to the trackers (tensorboard, wandb).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.diversity import (
    DIVERSITY_METRICS,
    Diversity,
    alexnet_weights_path,
    lpips_or_stand_in,
    lpips_unreachable,
)

# --validation_diversity: "auto" (LPIPS, else its stand-in) and the metrics that need no extra model.
DIVERSITY_CHOICES = ("auto", *(m for m in DIVERSITY_METRICS if m != "dino"))
VALIDATION_DIR = "validation"
VALIDATION_LOG = "validation.jsonl"
logger = logging.getLogger("draftplus.validation")


def check_validation_args(args) -> str | None:
    """The error message for inconsistent validation flags (None if fine); needs no model."""
    if args.validation_steps < 0:
        return "--validation_steps must be >= 0 (0: validate only before and after training)"
    if args.validation_steps and not args.validation_prompts:
        return "--validation_steps needs --validation_prompts"
    if args.validation_diversity is not None:
        if not args.validation_prompts:
            return "--validation_diversity needs --validation_prompts"
        if args.num_validation_images < 2:
            return "--validation_diversity compares the images of a prompt: --num_validation_images must be >= 2"
        if args.validation_diversity == "lpips" and lpips_unreachable():
            return (f"--validation_diversity lpips needs torchvision's AlexNet weights at {alexnet_weights_path()} "
                    "and HF_HUB_OFFLINE=1 forbids downloads; use --validation_diversity (auto), "
                    "lpips_random_backbone or pixel_l2")
    return None


@dataclass
class Rendered:
    """Images `[N, 3, H, W]` in [0, 1] (CPU, fp32), prompt-major (prompt k: rows k*n ... k*n + n - 1), and
    their rewards `[N]`."""

    images: torch.Tensor
    rewards: torch.Tensor
    diversity: float | None = None  # with --validation_diversity: mean over prompts of their pairwise diversity


class Validation:
    """Renders and logs validation images; `render_base()` once, then `__call__(step)` as often as wanted."""

    def __init__(self, args, accelerator, models, reward_fn) -> None:
        self.args, self.accelerator, self.models, self.reward_fn = args, accelerator, models, reward_fn
        self.prompts: list[str] = list(args.validation_prompts)
        self.per_prompt: int = args.num_validation_images
        self.dir = Path(args.output_dir) / VALIDATION_DIR
        self.log_file = Path(args.output_dir) / VALIDATION_LOG
        self.base: Rendered | None = None
        self.latest: tuple[int, Rendered] | None = None
        self.diversity = None
        self.diversity_metric = None
        metric = getattr(args, "validation_diversity", None)
        if metric is not None:
            self.diversity = (lpips_or_stand_in(accelerator.device, log=lambda m: logger.warning(m))
                              if metric == "auto" else Diversity(metric, accelerator.device))
            self.diversity_metric = self.diversity.metric

    # ------------------------------------------------------------------ rendering
    def render(self) -> Rendered:
        """The validation images of the denoiser as it is now, scored with the training reward.

        The pipeline denoises; the latents are decoded as the rollout decodes them (outside autocast
        when the VAE was upcast), so validation and training images agree in precision."""
        from utils.rollout import decode

        args, pipe = self.args, self.models.family.pipe  # its denoiser is the raw LoRA denoiser
        pipe.scheduler = self.models.scheduler.__class__.from_config(self.models.scheduler.config)  # own instance
        images, rewards = [], []
        for prompt in self.prompts:
            generators = [torch.Generator(self.accelerator.device).manual_seed(args.seed + i)
                          for i in range(self.per_prompt)]
            with torch.no_grad():
                with self.accelerator.autocast():
                    latents = pipe(prompt, negative_prompt=args.negative_prompt or None,
                                   num_images_per_prompt=self.per_prompt, generator=generators,
                                   num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                   eta=args.eta, height=args.height, width=args.width, output_type="latent").images
                    batch = decode(self.models.vae, latents)
                rewards.append(self.reward_fn(batch, [prompt] * len(batch)).detach().float().cpu())
            images.append(batch.float().cpu())
        return Rendered(torch.cat(images), torch.cat(rewards))

    def render_base(self) -> Rendered:
        """The base model's images (adapters disabled), rendered once and kept."""
        from utils.lora import adapters_disabled

        if self.base is None:
            with adapters_disabled(self.models.raw_denoiser):
                self.base = self.render()
            self._record(0, "base", self.base)
        return self.base

    def __call__(self, step: int) -> Rendered:
        """Render the LoRA at `step` (once per step), write and log the side-by-side grid."""
        if self.latest is not None and self.latest[0] == step:
            return self.latest[1]
        base = self.render_base()
        current = self.render()
        self.latest = (step, current)
        grid = comparison_grid(self.prompts, base, current, self.per_prompt, f"step {step}")
        self.dir.mkdir(parents=True, exist_ok=True)
        grid.save(self.dir / f"step-{step}.png")
        self._record(step, "lora", current, grid)
        return current

    # ------------------------------------------------------------------ logging
    def _diversity(self, rendered: Rendered) -> float | None:
        if self.diversity is None:
            return None
        n = self.per_prompt
        return sum(self.diversity(rendered.images[k * n:(k + 1) * n]) for k in range(len(self.prompts))) / len(
            self.prompts)

    def _record(self, step: int, phase: str, rendered: Rendered, grid=None) -> None:
        reward = float(rendered.rewards.mean())
        diversity = rendered.diversity = self._diversity(rendered)
        entry: dict[str, Any] = {"step": step, "phase": phase, "reward": reward,
                                 "reward_std": float(rendered.rewards.std()) if len(rendered.rewards) > 1 else 0.0,
                                 "rewards": [round(float(r), 6) for r in rendered.rewards]}
        if diversity is not None:
            entry.update(diversity=diversity, diversity_metric=self.diversity_metric)
        os.makedirs(self.log_file.parent, exist_ok=True)
        with open(self.log_file, "a") as f:
            f.write(json.dumps(entry) + "\n")
        key = "validation_reward_base" if phase == "base" else "validation_reward"
        scalars = {key: reward}
        if diversity is not None:
            scalars[key.replace("reward", "diversity")] = diversity
        self.accelerator.log(scalars, step=step)
        if grid is not None:
            log_image(self.accelerator, "validation", grid, step, caption=f"base (left) vs step {step} (right)")

    def save_before_after(self, path: str | os.PathLike) -> None:
        """Base images (top rows) over the latest LoRA images (bottom rows), one row per prompt each."""
        from diffusers.utils import make_image_grid

        images = [to_pil(im) for im in torch.cat([self.render_base().images, self.latest[1].images])]
        grid = make_image_grid(images, rows=2 * len(self.prompts), cols=self.per_prompt)
        zoom = max(1, 256 // max(self.args.height, self.args.width))  # toy-sized images: enlarge so they can be seen
        grid.resize((grid.width * zoom, grid.height * zoom), resample=0).save(path)

    def save_widget_images(self) -> list[tuple[str, str]]:
        """One image per prompt (the latest LoRA's images of that prompt, side by side) for the model
        card's widget: [(prompt, path relative to output_dir)]."""
        from diffusers.utils import make_image_grid

        out, n = [], self.per_prompt
        self.dir.mkdir(parents=True, exist_ok=True)
        for k, prompt in enumerate(self.prompts):
            images = [to_pil(im) for im in self.latest[1].images[k * n:(k + 1) * n]]
            row = make_image_grid(images, rows=1, cols=n)
            name = f"{VALIDATION_DIR}/prompt-{k}.png"
            _tile(row, side=max(self.args.height, self.args.width)).save(
                Path(self.args.output_dir) / name)
            out.append((prompt, name))
        return out


# ---------------------------------------------------------------------------------------------- images


def to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def _tile(image, side: int | None = None):
    """Enlarge toy-sized images (nearest neighbour, so pixels stay pixels) and shrink huge ones, so a
    grid is readable and not hundreds of megapixels; `side`: the image size that decides (default: its own)."""
    from PIL import Image

    side = side or max(image.size)
    if side < 256:
        factor = 256 // side
        return image.resize((image.width * factor, image.height * factor), resample=Image.NEAREST)
    if side > 512:
        factor = 512 / side
        return image.resize((round(image.width * factor), round(image.height * factor)), resample=Image.BICUBIC)
    return image


_HEADER, _CAPTION, _GAP, _MARGIN = 16, 14, 12, 4  # grid layout, in pixels


def tile_origin(side: int, prompt: int, image: int, tile_size: tuple[int, int], per_prompt: int) -> tuple[int, int]:
    """Top-left corner in `comparison_grid` of image `image` of prompt `prompt`; side 0 = base, 1 = LoRA."""
    w, h = tile_size
    left = side * (per_prompt * (w + _MARGIN) + _GAP) + image * (w + _MARGIN)
    top = _HEADER + prompt * (_HEADER + h + _CAPTION) + _HEADER
    return left, top


def comparison_grid(prompts: list[str], base: Rendered, current: Rendered, per_prompt: int, title: str):
    """Per prompt a row: the base model's images | the current LoRA's, each with its reward beneath."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    tiles = [[_tile(to_pil(im)) for im in rendered.images] for rendered in (base, current)]
    w, h = tiles[0][0].size
    grid = Image.new("RGB", (2 * per_prompt * (w + _MARGIN) + _GAP, _HEADER + len(prompts) * (_HEADER + h + _CAPTION)),
                     "white")
    draw = ImageDraw.Draw(grid)
    draw.text((_MARGIN, 2), "base", fill="black", font=font)
    draw.text((tile_origin(1, 0, 0, (w, h), per_prompt)[0] + _MARGIN, 2), title, fill="black", font=font)
    for k, prompt in enumerate(prompts):
        draw.text((_MARGIN, tile_origin(0, k, 0, (w, h), per_prompt)[1] - _HEADER + 2), prompt[:120], fill="black",
                  font=font)
        for side, rendered in enumerate((base, current)):
            for j in range(per_prompt):
                left, top = tile_origin(side, k, j, (w, h), per_prompt)
                grid.paste(tiles[side][k * per_prompt + j], (left, top))
                draw.text((left + 2, top + h + 1), f"{float(rendered.rewards[k * per_prompt + j]):.4f}",
                          fill="black", font=font)
    return grid


def log_image(accelerator, name: str, image, step: int, caption: str = "") -> None:
    """One PIL image to every tracker that takes images (tensorboard, wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image, caption=caption)}, step=step)


def read_validation_log(output_dir: str | os.PathLike) -> list[dict]:
    """validation.jsonl's entries, one per (phase, step): a resumed run's repeats replace earlier ones."""
    path = Path(output_dir) / VALIDATION_LOG
    if not path.is_file():
        return []
    entries: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            entries[(entry["phase"], entry["step"])] = entry
    return sorted(entries.values(), key=lambda e: (e["step"], e["phase"] != "base"))
