"""Validation during training: fixed prompts and seeds, the base model's images next to the LoRA's.

The validation prompts are rendered with fixed per-image seeds through the model family's diffusers
pipeline (`ModelFamily.sample_latents`) and scored with the training reward. The base model (the same denoiser with its adapters
disabled) is rendered once, at the start, and kept in memory; every `--validation_steps` steps the
current LoRA renders the same prompts from the same noise, so any difference is the training's doing.

Each validation writes `validation/step-N.png` (per prompt, the base's images on the left and the
LoRA's on the right, each with its reward written under it), appends a line to `validation.jsonl`
(rewards, and with `--validation_diversity` the mean pairwise diversity of each prompt's images) and
logs both to the trackers (tensorboard, wandb).

`validation.jsonl` is one series: its one base row (step 0) records the settings the images depend on
(prompts, seeds, sampler, reward, size, ...). A resumed run continues it (it drops the rows and grids
past the resumed step and does not add a second base row); a resume with other settings is refused
before any model loads, unless `--allow_objective_change`, which starts the series anew and keeps the
old one as `validation-until-step-N.jsonl`.

Under `--shard` every process builds the validation and renders the same images in step: each forward of a
sharded block all-gathers its weights from every process, so a render on the main process alone would wait for
the others forever. Only the main process (`writes`) touches files and trackers, and only it scores diversity.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.evaluation.diversity import (
    DIVERSITY_METRICS,
    Diversity,
    alexnet_weights_path,
    lpips_or_stand_in,
    lpips_unreachable,
)
from utils.run.objective import OBJECTIVE_FLAGS, describe_changes, jsonable

# --validation_diversity: "auto" (LPIPS, else its stand-in) and the metrics that need no extra model.
DIVERSITY_CHOICES = ("auto", *(m for m in DIVERSITY_METRICS if m != "dino"))
VALIDATION_DIR = "validation"
VALIDATION_LOG = "validation.jsonl"
BEFORE_AFTER_NAME = "validation_before_after.png"
VALIDATION_REWARD_NAME = "validation_reward.json"
EARLIER_LOG_PATTERN = "validation-until-step-{step}.jsonl"  # a series set aside when the settings changed
# What the validation images and their rewards depend on besides the objective's rollout settings.
SETTINGS_FLAGS = {"prompts": "--validation_prompts", "images_per_prompt": "--num_validation_images", "seed": "--seed"}
RENDER_SETTINGS = ("reward", "reward_options", "scheduler", "num_inference_steps", "eta", "guidance_scale",
                   "negative_prompt", "height", "width")
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


def validation_settings(args) -> dict[str, Any]:
    """What the validation images and their rewards depend on (recorded in the base row)."""
    settings = {"prompts": list(args.validation_prompts), "images_per_prompt": args.num_validation_images,
                "seed": args.seed}
    settings.update({name: jsonable(getattr(args, name, None)) for name in RENDER_SETTINGS})
    return settings


def settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list]:
    """{flag: [saved, current]} for the recorded settings that differ."""
    flags = {**SETTINGS_FLAGS, **{name: OBJECTIVE_FLAGS[name] for name in RENDER_SETTINGS}}
    return {flags[name]: [saved[name], current[name]] for name in flags
            if name in saved and jsonable(saved[name]) != jsonable(current[name])}


def _read_entries(path: Path) -> list[dict]:
    """validation.jsonl's rows as written, oldest first ([] without the file)."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash (or a blank one)
    return entries


def _base_row(entries: list[dict]) -> dict | None:
    return next((e for e in entries if e.get("phase") == "base"), None)


def recorded_settings(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The settings recorded in validation.jsonl's base row; None without one (or from before they were)."""
    base = _base_row(_read_entries(Path(output_dir) / VALIDATION_LOG))
    return base.get("settings") if base else None


def check_validation_history(args, first_step: int) -> str | None:
    """The one-line refusal when a resumed run's validation would mix with a series rendered with other
    settings (None if it would not, or if --allow_objective_change starts the series anew)."""
    if args.overwrite_output_dir or args.allow_objective_change:
        return None
    saved = recorded_settings(args.output_dir)
    changes = settings_differences(saved, validation_settings(args)) if saved else {}
    if not changes:
        return None
    return (f"{VALIDATION_LOG} in --output_dir was rendered with other settings ({describe_changes(changes)}), "
            "and one validation series must not mix them; resume with the same settings, or pass "
            "--allow_objective_change to start the validation series anew at step "
            f"{first_step} (the old one is kept as {EARLIER_LOG_PATTERN.format(step=first_step)})")


@dataclass
class Rendered:
    """Images `[N, 3, H, W]` in [0, 1] (CPU, fp32), prompt-major (prompt k: rows k*n ... k*n + n - 1), and
    their rewards `[N]`."""

    images: torch.Tensor
    rewards: torch.Tensor
    diversity: float | None = None  # with --validation_diversity: mean over prompts of their pairwise diversity


def sample_validation_latents(family, args, prompt: str, generators: list[torch.Generator]) -> torch.Tensor:
    """The pipeline's latents of one validation prompt, image k from `generators[k]` (what `Validation.render`
    decodes; `--precompute_prompt_embeddings` runs it up to the prompt encoding before the run)."""
    return family.sample_latents(prompt, generators, negative_prompt=args.negative_prompt,
                                 num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                 eta=args.eta, height=args.height, width=args.width)


class Validation:
    """Renders and logs validation images; `render_base()` once, then `__call__(step)` as often as wanted."""

    def __init__(self, args, accelerator, models, reward_fn, start_step: int = 0) -> None:
        self.args, self.accelerator, self.models, self.reward_fn = args, accelerator, models, reward_fn
        self.prompts: list[str] = list(args.validation_prompts)
        self.per_prompt: int = args.num_validation_images
        self.dir = Path(args.output_dir) / VALIDATION_DIR
        self.log_file = Path(args.output_dir) / VALIDATION_LOG
        self.settings = validation_settings(args)
        self.base: Rendered | None = None
        self.latest: tuple[int, Rendered] | None = None
        self.writes: bool = accelerator.is_main_process  # the other processes of a sharded run only render
        self.base_recorded = self._continue_series(start_step) if self.writes else True  # the others record none
        self.diversity = None
        self.diversity_metric = None
        metric = getattr(args, "validation_diversity", None)
        if metric is not None and self.writes:
            self.diversity = (lpips_or_stand_in(accelerator.device, log=lambda m: logger.warning(m))
                              if metric == "auto" else Diversity(metric, accelerator.device))
            self.diversity_metric = self.diversity.metric

    # ------------------------------------------------------------------ rendering
    def render(self) -> Rendered:
        """The validation images of the denoiser as it is now, scored with the training reward.

        The pipeline denoises; the latents are decoded as the rollout decodes them (outside autocast
        when the VAE was upcast), so validation and training images agree in precision."""
        args, family = self.args, self.models.family  # its pipeline's denoiser is the raw LoRA denoiser
        family.pipe.scheduler = self.models.scheduler.__class__.from_config(self.models.scheduler.config)  # own one
        images, rewards = [], []
        for prompt in self.prompts:
            generators = [torch.Generator(self.accelerator.device).manual_seed(args.seed + i)
                          for i in range(self.per_prompt)]
            with torch.no_grad():
                with self.accelerator.autocast():
                    batch = family.decode(self.models.vae, sample_validation_latents(family, args, prompt, generators))
                rewards.append(self.reward_fn(batch, [prompt] * len(batch)).detach().float().cpu())
            images.append(batch.float().cpu())
        return Rendered(torch.cat(images), torch.cat(rewards))

    def render_base(self) -> Rendered:
        """The base model's images (adapters disabled), rendered once and kept; recorded once per series."""
        from utils.lora import adapters_disabled

        if self.base is None:
            with adapters_disabled(self.models.raw_denoiser):
                self.base = self.render()
            if self.base_recorded:
                self.base.diversity = self._diversity(self.base)
            else:
                self._record(0, "base", self.base)
                self.base_recorded = True
        return self.base

    def _continue_series(self, start_step: int) -> bool:
        """Make validation.jsonl this run's series from `start_step` on: the rows and grids past it go
        (a resumed run renders them again). A series rendered with other settings (a resume the argument
        check let change them) is set aside. Returns whether the series already has its base row."""
        for grid in self.dir.glob("step-*.png"):
            step = grid.stem.removeprefix("step-")
            if step.isdigit() and int(step) > start_step:
                grid.unlink()
        if not self.log_file.is_file():
            return False
        entries = _read_entries(self.log_file)
        base = _base_row(entries)
        if base is None or settings_differences(base.get("settings") or {}, self.settings):
            os.replace(self.log_file, self.log_file.with_name(EARLIER_LOG_PATTERN.format(step=start_step)))
            return False
        kept = [e for e in entries if e["step"] <= start_step]
        tmp = self.log_file.with_name(self.log_file.name + ".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
        os.replace(tmp, self.log_file)
        return True

    def __call__(self, step: int) -> Rendered:
        """Render the LoRA at `step` (once per step), write and log the side-by-side grid."""
        if self.latest is not None and self.latest[0] == step:
            return self.latest[1]
        base = self.render_base()
        current = self.render()
        self.latest = (step, current)
        if not self.writes:
            return current
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
        if phase == "base":
            entry["settings"] = self.settings
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
        """Per prompt two labelled rows, the base model's images ("before") over the latest LoRA's ("after
        N steps"), from the same noise; toy-sized images are enlarged so they can be seen."""
        before_after_grid(self.prompts, self.render_base(), self.latest[1], self.per_prompt,
                          self.latest[0]).save(path)

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


def before_after_rows(prompts: list[str], base: Rendered, after: Rendered, per_prompt: int,
                      step: int) -> list[tuple[str, list[torch.Tensor]]]:
    """The labelled rows of the before/after grid: per prompt, "before: PROMPT" then "after N steps: PROMPT"."""
    rows = []
    for k, prompt in enumerate(prompts):
        rows.append((f"before: {prompt}", list(base.images[k * per_prompt:(k + 1) * per_prompt])))
        rows.append((f"after {step} step{'' if step == 1 else 's'}: {prompt}",
                     list(after.images[k * per_prompt:(k + 1) * per_prompt])))
    return rows


def before_after_grid(prompts: list[str], base: Rendered, after: Rendered, per_prompt: int, step: int):
    """`validation_before_after.png`: the base model's images over the LoRA's, per prompt, labelled."""
    from utils.evaluation.image_grid import labelled_grid

    return labelled_grid(before_after_rows(prompts, base, after, per_prompt, step),
                         title="base model (before) and the LoRA (after), same seeds", min_side=256)


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
    entries = {(e["phase"], e["step"]): e for e in _read_entries(Path(output_dir) / VALIDATION_LOG)}
    return sorted(entries.values(), key=lambda e: (e["step"], e["phase"] != "base"))
