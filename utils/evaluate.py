"""Evaluate a base model and LoRAs on reward and diversity: the two axes DRaFT+ trades off.

    python -m utils.evaluate --pretrained_model_name_or_path assets/toy --prompts assets/toy/prompts.txt \
        --lora outputs/quickstart/checkpoint-20 outputs/quickstart --reward redness --output_dir outputs/eval

For every model (the base, labelled `base`, then each LoRA, labelled by its directory name) it
generates `seeds_per_prompt` images per prompt with the same per-image seeds, scores them with the
reward and measures diversity as the mean pairwise LPIPS distance between the images of a prompt,
averaged over prompts. Writes `results.json`, `results.csv`, `per_prompt.csv`, the plot
`reward_vs_diversity.png` and a sample grid per model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from utils.schedulers import SCHEDULERS

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DIVERSITY_METRICS = ("lpips", "lpips_random_backbone", "pixel_l2")
ROW_FIELDS = (
    "model", "path", "reward", "reward_mean", "reward_std", "diversity", "diversity_std", "diversity_metric",
    "num_prompts", "seeds_per_prompt", "num_images", "num_inference_steps", "guidance_scale", "resolution",
    "height", "width",
)


class EvaluationError(RuntimeError):
    """A problem the user can fix (missing weights, bad LoRA dir, ...): reported as one line by `main`."""


# ----------------------------------------------------------------------------------------- diversity


def _alexnet_weights_path() -> Path:
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _build_lpips(random_backbone: bool) -> torch.nn.Module:
    import lpips

    # lpips ships only its linear heads; the AlexNet trunk comes from torchvision's download. Check
    # first so that offline runs fail with one actionable line instead of a urllib traceback.
    weights = _alexnet_weights_path()
    missing = (f"LPIPS needs torchvision's ImageNet AlexNet weights at {weights}, but {{why}}. Copy "
               "alexnet-owt-7be5be79.pth there (or set TORCH_HOME), or choose a stand-in with "
               "--diversity_metric lpips_random_backbone or pixel_l2.")
    if not random_backbone and not weights.is_file() and _offline():
        raise EvaluationError(missing.format(why="they are not there and HF_HUB_OFFLINE=1 forbids downloads"))
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation, said by lpips
        # A random trunk must be the same random trunk every run, or distances are not comparable.
        torch.manual_seed(0)
        try:
            model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=random_backbone, verbose=False)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a truncated file a RuntimeError
            if random_backbone:
                raise
            raise EvaluationError(missing.format(why=f"they could not be obtained ({type(e).__name__}: {e})")) from e
    return model.eval().requires_grad_(False)


class Diversity:
    """Mean pairwise distance between the images of one prompt, under a named metric.

    `lpips`: LPIPS with the ImageNet AlexNet trunk (the DRaFT+ paper's diversity measure).
    `lpips_random_backbone`: the same LPIPS heads on a fixed-seed random AlexNet; a deterministic,
    offline stand-in whose values are not comparable to real LPIPS.
    `pixel_l2`: root-mean-square pixel difference in [0, 1].
    """

    def __init__(self, metric: str = "lpips", device: torch.device | str = "cpu") -> None:
        if metric not in DIVERSITY_METRICS:
            raise EvaluationError(f"unknown diversity metric {metric!r}; choose one of {', '.join(DIVERSITY_METRICS)}")
        self.metric = metric
        self.device = torch.device(device)
        self.model = None if metric == "pixel_l2" else _build_lpips(metric == "lpips_random_backbone").to(self.device)

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distances `[N]` between image batches `[N, 3, H, W]` in [0, 1]."""
        a, b = a.to(self.device, torch.float32), b.to(self.device, torch.float32)
        if self.model is None:
            return (a - b).pow(2).flatten(1).mean(1).sqrt()
        return self.model(a, b, normalize=True).flatten()  # normalize: [0, 1] -> LPIPS's [-1, 1]

    def __call__(self, images: torch.Tensor) -> float:
        """Mean pairwise distance among images `[S, 3, H, W]` (S >= 2) of one prompt."""
        if images.shape[0] < 2:
            raise EvaluationError("diversity needs at least 2 images per prompt (--seeds_per_prompt >= 2)")
        i, j = torch.triu_indices(images.shape[0], images.shape[0], offset=1)
        return float(self.distance(images[i], images[j]).mean())


# ----------------------------------------------------------------------------------------- models


def lora_label_and_file(path: str | os.PathLike) -> tuple[str, Path]:
    """A LoRA argument -> (label, weights file). Directories (a trainer output or `checkpoint-N`) must hold
    `pytorch_lora_weights.safetensors`; a `.safetensors` file is taken as is."""
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / LORA_WEIGHTS_NAME
    if not file.is_file():
        raise EvaluationError(f"LoRA {str(path)!r} has no {LORA_WEIGHTS_NAME}")
    return (path.name if path.is_dir() else path.stem), file


def _unique_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Directory names, prefixed by their parent where two would collide (run-a/checkpoint-20, run-b/...)."""
    labels = [lora_label_and_file(p)[0] for p in paths]
    out = []
    for p, label in zip(paths, labels, strict=True):
        if labels.count(label) > 1 or label == "base":
            resolved = Path(p).resolve()
            label = f"{resolved.parent.name}/{label}" if resolved.is_dir() else f"{resolved.parent.name}/{resolved.name}"
        out.append(label)
    if len(set(out)) != len(out):
        raise EvaluationError(f"LoRA labels are ambiguous: {out}")
    return out


def load_pipeline(
    pretrained_model_name_or_path: str,
    scheduler: str = "ddim",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """The model family's diffusers pipeline (SD 1.x/2.x, SDXL) with the trainer's sampler choice;
    `toy` is the built-in toy model."""
    import diffusers

    from utils.family import UnsupportedModelError, load_family

    path = pretrained_model_name_or_path
    try:
        pipe = load_family(path, dtype=dtype).pipe
    except UnsupportedModelError as e:
        raise EvaluationError(str(e)) from e
    except (OSError, ValueError) as e:
        raise EvaluationError(f"cannot load the base model {path!r}: {str(e).splitlines()[0]}") from e
    if SCHEDULERS[scheduler] is not None:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    return pipe.to(device)


def image_seed(seed: int, prompt_index: int, seed_index: int) -> int:
    """The seed of image (prompt i, seed j): the same for every model, whatever the batching."""
    return (seed * 1_000_003 + prompt_index) * 10_007 + seed_index


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    pairs: Sequence[tuple[int, int]],
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    negative_prompt: str | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Images `[len(pairs), 3, H, W]` in [0, 1] (fp32, CPU) for (prompt index, seed index) pairs, one batch."""
    gen_device = "cpu" if pipe.device.type == "mps" else pipe.device
    generators = [torch.Generator(gen_device).manual_seed(image_seed(seed, i, j)) for i, j in pairs]
    out = pipe(
        prompt=[prompts[i] for i, _ in pairs],
        negative_prompt=None if negative_prompt is None else [negative_prompt] * len(pairs),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        eta=eta,
        generator=generators,
        output_type="pt",
    )
    return out.images.float().clamp(0, 1).cpu()


def _evaluate_model(
    pipe,
    label: str,
    prompts: Sequence[str],
    reward: Callable,
    diversity: Diversity,
    *,
    seeds_per_prompt: int,
    seed: int,
    batch_size: int,
    gen_kwargs: dict,
    grid_prompts: int,
) -> tuple[dict, list[dict], torch.Tensor | None]:
    pairs = [(i, j) for i in range(len(prompts)) for j in range(seeds_per_prompt)]
    pending: dict[int, list[torch.Tensor]] = {}  # a prompt's images until all its seeds are in
    rewards = torch.empty(len(pairs))
    per_prompt, grid = [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        images = generate(pipe, prompts, batch, seed, **gen_kwargs)
        with torch.no_grad():
            scores = reward(images.to(diversity.device), [prompts[i] for i, _ in batch])
        rewards[start:start + len(batch)] = scores.detach().float().cpu()
        for (i, _), image in zip(batch, images, strict=True):
            pending.setdefault(i, []).append(image)
            if len(pending[i]) == seeds_per_prompt:
                stack = torch.stack(pending.pop(i))
                if i < grid_prompts:
                    grid.append(stack)
                r = rewards[i * seeds_per_prompt:(i + 1) * seeds_per_prompt]
                per_prompt.append({"model": label, "prompt_index": i, "prompt": prompts[i],
                                   "reward_mean": float(r.mean()), "diversity": diversity(stack)})
    div = torch.tensor([p["diversity"] for p in per_prompt])
    row = {
        "model": label,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "diversity": float(div.mean()),
        "diversity_std": float(div.std()) if len(div) > 1 else 0.0,
    }
    return row, per_prompt, (torch.cat(grid) if grid else None)


def evaluate(
    pretrained_model_name_or_path: str,
    prompts: Sequence[str],
    reward: str | Callable = "redness",
    loras: Sequence[str | os.PathLike] = (),
    seeds_per_prompt: int = 4,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    height: int | None = None,
    width: int | None = None,
    diversity_metric: str = "lpips",
    seed: int = 0,
    batch_size: int = 16,
    scheduler: str = "ddim",
    negative_prompt: str | None = None,
    eta: float = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    reward_options: dict | None = None,
    include_base: bool = True,
    grid_prompts: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[list[dict], list[dict], dict[str, torch.Tensor]]:
    """Score the base model and each LoRA on the same prompts and seeds.

    Returns (rows, per_prompt_rows, grids): one row per model (see ROW_FIELDS), one per (model, prompt),
    and for each model the images of its first `grid_prompts` prompts `[grid_prompts * seeds, 3, H, W]`.
    `reward` is a spec for `rewards.build_reward` or a callable `(images [B,3,H,W] in [0,1], prompts) -> [B]`.
    """
    if seeds_per_prompt < 2:
        raise EvaluationError("--seeds_per_prompt must be >= 2: diversity compares images of the same prompt")
    if not prompts:
        raise EvaluationError("no prompts to evaluate")
    if scheduler not in SCHEDULERS:
        raise EvaluationError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    labels = _unique_labels(loras)  # checks every LoRA before any model is loaded
    diversity = Diversity(diversity_metric, device)  # fails fast on missing LPIPS weights
    spec = reward if isinstance(reward, str) else getattr(reward, "spec", getattr(reward, "__name__", "custom"))
    if isinstance(reward, str):
        from rewards import build_reward

        reward = build_reward(reward, device=device, **(reward_options or {}))
    from diffusers.utils import logging as diffusers_logging

    pipe = load_pipeline(pretrained_model_name_or_path, scheduler, device, dtype)
    # record the size actually generated, not "default"
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or resolution, width or resolution

    gen_kwargs = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                  "height": height, "width": width, "negative_prompt": negative_prompt, "eta": eta}
    common = {"reward": spec, "diversity_metric": diversity_metric, "num_prompts": len(prompts),
              "seeds_per_prompt": seeds_per_prompt, "num_images": len(prompts) * seeds_per_prompt,
              "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              "resolution": resolution, "height": height, "width": width}
    models: list[tuple[str, Path | None]] = [("base", None)] if include_base else []
    models += [(label, lora_label_and_file(p)[1]) for label, p in zip(labels, loras, strict=True)]
    rows, per_prompt, grids = [], [], {}
    for label, file in models:
        if file is not None:
            try:
                # UNet-only LoRAs make diffusers warn that the text encoder got none: expected, and checked below.
                verbosity = diffusers_logging.get_verbosity()
                diffusers_logging.set_verbosity_error()
                try:
                    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
                finally:
                    diffusers_logging.set_verbosity(verbosity)
            except (ValueError, KeyError, RuntimeError, OSError) as e:
                raise EvaluationError(f"LoRA {label!r} ({file}) does not load into this base model: "
                                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
            if not any(pipe.get_list_adapters().values()):
                # diffusers only warns when no key matches: we would silently report the base model.
                raise EvaluationError(f"LoRA {label!r} ({file}) has no weights for this base model's UNet "
                                      "or text encoder")
        try:
            row, prompt_rows, grid = _evaluate_model(
                pipe, label, prompts, reward, diversity, seeds_per_prompt=seeds_per_prompt, seed=seed,
                batch_size=batch_size, gen_kwargs=gen_kwargs, grid_prompts=grid_prompts)
        finally:
            if file is not None:
                pipe.unload_lora_weights()  # back to the base weights for the next LoRA
        row = {"model": label, "path": str(file.parent if file.name == LORA_WEIGHTS_NAME else file) if file
               else pretrained_model_name_or_path, **row, **common}
        rows.append({k: row[k] for k in ROW_FIELDS})
        per_prompt += prompt_rows
        if grid is not None:
            grids[label] = grid
        log(f"{label:>24}: reward {row['reward_mean']:+.4f} ± {row['reward_std']:.4f}   "
            f"diversity ({diversity_metric}) {row['diversity']:.4f}")
    return rows, per_prompt, grids


# ----------------------------------------------------------------------------------------- outputs


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_reward_vs_diversity(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """One point per model: diversity on x, mean reward on y; the base model is a large black star.

    No error bars: every model sees the same prompts and seeds, so the between-prompt spread (in the
    tables as reward_std) would dwarf the paired differences that matter here.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    colors = plt.get_cmap("tab10")
    for k, row in enumerate(rows):
        is_base = row["model"] == "base"
        ax.plot(row["diversity"], row["reward_mean"], "*" if is_base else "o",
                color="black" if is_base else colors(k % 10), markersize=16 if is_base else 8,
                zorder=3 if is_base else 2)
        ax.annotate(row["model"], (row["diversity"], row["reward_mean"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8, fontweight="bold" if is_base else "normal")
    metric = rows[0]["diversity_metric"]
    ax.set_xlabel(f"diversity: mean pairwise {metric} per prompt")
    ax.set_ylabel(f"mean reward ({rows[0]['reward']})")
    ax.set_title(f"reward vs diversity ({rows[0]['num_prompts']} prompts x {rows[0]['seeds_per_prompt']} seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(output_dir: str | os.PathLike, rows: list[dict], per_prompt: list[dict],
                  grids: dict[str, torch.Tensor], settings: dict) -> dict[str, Path]:
    """results.json (settings + rows), results.csv, per_prompt.csv, reward_vs_diversity.png, samples_*.png."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "per_prompt": out / "per_prompt.csv",
             "plot": out / "reward_vs_diversity.png"}
    paths["json"].write_text(json.dumps({"settings": settings, "results": rows}, indent=2) + "\n")
    _write_csv(paths["csv"], rows)
    _write_csv(paths["per_prompt"], per_prompt)
    plot_reward_vs_diversity(rows, paths["plot"])
    if grids:
        from torchvision.utils import save_image

        for label, images in grids.items():
            name = "samples_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in label) + ".png"
            save_image(images, out / name, nrow=rows[0]["seeds_per_prompt"], padding=1)
            paths[f"samples:{label}"] = out / name
    return paths


# ----------------------------------------------------------------------------------------- CLI


def read_prompts(source: str) -> list[str]:
    """Any prompt source the trainer accepts (`--prompts`): built-in sets, .txt files, datasets, tars."""
    from utils.prompts import PromptSourceError, check_prompt_source, load_prompts

    try:
        check_prompt_source(source)
        return load_prompts(source)
    except PromptSourceError as e:
        raise EvaluationError(str(e)) from e


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m utils.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Base pipeline: hub id, local dir, or 'toy' (the built-in pretrained toy).")
    p.add_argument("--lora", nargs="*", default=[], metavar="DIR",
                   help="LoRA dirs holding pytorch_lora_weights.safetensors (trainer outputs or checkpoint-N "
                        "dirs); labelled by directory name.")
    p.add_argument("--no_base", action="store_true", help="Skip the base model (it is evaluated by default).")
    p.add_argument("--prompts", required=True,
                   help="Prompt source: a .txt file (one prompt per line), or any source the trainer accepts.")
    p.add_argument("--max_prompts", type=int, default=None, help="Use only the first N prompts.")
    p.add_argument("--seeds_per_prompt", type=int, default=4, help="Images per prompt (>= 2, for diversity).")
    p.add_argument("--seed", type=int, default=0, help="Base seed; image (i, j) gets a seed derived from (seed, i, j).")
    p.add_argument("--num_inference_steps", type=int, default=20, help="Sampler steps.")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    p.add_argument("--resolution", type=int, default=None, help="Image size (default: the model's).")
    p.add_argument("--height", type=int, default=None, help="Image height (default: --resolution).")
    p.add_argument("--width", type=int, default=None, help="Image width (default: --resolution).")
    p.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS),
                   help="Sampler (default ddim, as the trainer; 'model' = the model's own).")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta.")
    p.add_argument("--negative_prompt", default=None, help="Negative prompt for every image.")
    p.add_argument("--reward", default="redness", help="Reward spec for rewards.build_reward (e.g. redness, pickscore).")
    p.add_argument("--reward_options", nargs="*", default=[], metavar="KEY=VALUE", help="Options for the reward.")
    p.add_argument("--diversity_metric", default="lpips", choices=DIVERSITY_METRICS,
                   help="lpips (AlexNet LPIPS; needs torchvision's AlexNet weights), lpips_random_backbone "
                        "(fixed-seed random AlexNet trunk: offline stand-in, not comparable to lpips), "
                        "pixel_l2 (RMS pixel distance).")
    p.add_argument("--batch_size", type=int, default=16, help="Images per pipeline call.")
    p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="Pipeline weights dtype.")
    p.add_argument("--grid_prompts", type=int, default=8,
                   help="Save a samples_<model>.png grid of the first N prompts (0: none).")
    p.add_argument("--output_dir", default="outputs/eval", help="Where results.json/csv and the plot go.")
    args = p.parse_args(argv)
    if args.seeds_per_prompt < 2:
        p.error("--seeds_per_prompt must be >= 2 (diversity compares images of the same prompt)")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if args.no_base and not args.lora:
        p.error("--no_base needs at least one --lora")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # see train_draftplus.main
    args = parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    from rewards import RewardLoadError, RewardSpecError, parse_reward_options

    try:
        reward_options = parse_reward_options(args.reward_options)
        prompts = read_prompts(args.prompts)[: args.max_prompts]
        rows, per_prompt, grids = evaluate(
            args.pretrained_model_name_or_path, prompts, reward=args.reward, loras=args.lora,
            seeds_per_prompt=args.seeds_per_prompt, num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale, resolution=args.resolution, height=args.height, width=args.width,
            diversity_metric=args.diversity_metric, seed=args.seed, batch_size=args.batch_size,
            scheduler=args.scheduler, negative_prompt=args.negative_prompt, eta=args.eta, device=args.device,
            dtype=dtype, reward_options=reward_options, include_base=not args.no_base,
            grid_prompts=args.grid_prompts, log=print)
    except (EvaluationError, RewardSpecError, RewardLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = {k: v for k, v in vars(args).items() if k not in ("output_dir",)}
    settings["prompts_used"] = len(prompts)
    paths = write_outputs(args.output_dir, rows, per_prompt, grids, settings)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
