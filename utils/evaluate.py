"""Evaluate a base model and LoRAs on reward and diversity: the two axes DRaFT+ trades off.

    python -m utils.evaluate --pretrained_model_name_or_path assets/toy --prompts assets/toy/prompts.txt \
        --lora outputs/quickstart/checkpoint-20 outputs/quickstart --reward redness --output_dir outputs/eval

Every row is one way of sampling, on the same prompts and per-image seeds:

    base                    the base model
    NAME                    a LoRA (NAME: its directory's name), at full strength
    NAME@scale=S            the LoRA at strength S (diffusers' adapter weights, `--lora_scale`)
    NAME@aig=SCHEDULE       the LoRA under annealed importance guidance (`--aig`, see utils/aig.py)
    mix(a=0.5,b=0.5)        a weighted combination of LoRAs (`--mix a=0.5 b=0.5`)

Each row gets the mean reward and the diversity: the mean pairwise distance between the images of a
prompt (LPIPS by default, or DINOv2 cosine distance), averaged over prompts. Writes `results.json`,
`results.csv`, `per_prompt.csv`, `per_image.csv` (every image's reward, by prompt and seed index, for
paired statistics), the plot `reward_vs_diversity.png` (each kind of control its own series) and a
sample grid per row. Resumable: rows already in `results.json` (same settings) are skipped, so an
interrupted or extended evaluation only computes what is missing; `--overwrite` starts afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from utils.schedulers import SCHEDULERS

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DIVERSITY_METRICS = ("lpips", "lpips_random_backbone", "pixel_l2", "dino")
DEFAULT_DINO_MODEL = "facebook/dinov2-base"
CONTROLS = ("base", "lora", "scale", "aig", "mix")
ROW_FIELDS = (
    "model", "control", "lora", "lora_scale", "aig_schedule", "path", "reward", "reward_mean", "reward_std",
    "diversity", "diversity_std", "diversity_metric", "diversity_model", "num_prompts", "seeds_per_prompt",
    "num_images", "num_inference_steps", "guidance_scale", "resolution", "height", "width",
)
PER_PROMPT_FIELDS = ("model", "prompt_index", "prompt", "reward_mean", "diversity")
PER_IMAGE_FIELDS = ("model", "prompt_index", "seed_index", "seed", "prompt", "reward")


class EvaluationError(RuntimeError):
    """A problem the user can fix (missing weights, bad LoRA dir, ...): reported as one line by `main`."""


# ----------------------------------------------------------------------------------------- diversity


def _alexnet_weights_path() -> Path:
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)


def _offline() -> bool:
    from utils.hub import hub_offline

    return hub_offline()


def _alexnet_state_dict(missing: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet AlexNet weights, downloaded (hash-checked) if absent, loaded without unpickling
    code (`weights_only=True`: torchvision's own loader would unpickle the file in full)."""
    from torchvision.models import AlexNet_Weights

    path = _alexnet_weights_path()
    if not path.is_file():
        if _offline():
            raise EvaluationError(missing.format(why="they are not there and HF_HUB_OFFLINE=1 forbids downloads"))
        url = AlexNet_Weights.IMAGENET1K_V1.url
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=path.stem.rsplit("-", 1)[-1], progress=False)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a hash mismatch a RuntimeError
            raise EvaluationError(missing.format(why=f"they could not be obtained ({type(e).__name__}: {e})")) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:  # truncated or not a state dict
        raise EvaluationError(missing.format(why=f"{path} does not load ({type(e).__name__}: {e})")) from e


def _build_lpips(random_backbone: bool) -> torch.nn.Module:
    """LPIPS (AlexNet) with lpips' own linear heads. The trunk is torchvision's ImageNet AlexNet, loaded by
    `_alexnet_state_dict`, or for the stand-in a fixed-seed random one."""
    import lpips

    missing = (f"LPIPS needs torchvision's ImageNet AlexNet weights at {_alexnet_weights_path()}, but {{why}}. "
               "Copy alexnet-owt-7be5be79.pth there (or set TORCH_HOME), or choose a stand-in with "
               "--diversity_metric lpips_random_backbone or pixel_l2.")
    trunk = None if random_backbone else _alexnet_state_dict(missing)  # fails before anything is built
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation, said by lpips
        # A random trunk must be the same random trunk every run, or distances are not comparable.
        torch.manual_seed(0)
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if trunk is not None:
        # lpips splits torchvision's `features` into slices, keeping each layer's index as its name.
        slices = {name.split(".", 1)[1]: name for name, _ in model.net.named_modules() if name.count(".") == 1}
        mapped = {f"{slices[k.split('.')[1]]}.{k.rsplit('.', 1)[1]}": v for k, v in trunk.items()
                  if k.startswith("features.") and k.split(".")[1] in slices}
        expected = {k for k in model.net.state_dict()}
        if set(mapped) != expected:
            raise EvaluationError(missing.format(why=f"the file does not hold AlexNet's feature layers "
                                                     f"(missing {sorted(expected - set(mapped))[:3]})"))
        model.net.load_state_dict(mapped)
    return model.eval().requires_grad_(False)


def _build_dino(name_or_path: str, device: torch.device):
    from transformers import AutoImageProcessor, Dinov2Model

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
        model = Dinov2Model.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise EvaluationError(f"cannot load the DINOv2 model {name_or_path!r} for --diversity_metric dino "
                              f"(--diversity_model): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return processor, model.to(device).eval().requires_grad_(False)


class Diversity:
    """Mean pairwise distance between the images of one prompt, under a named metric.

    `lpips`: LPIPS with the ImageNet AlexNet trunk (the DRaFT+ paper's diversity measure).
    `lpips_random_backbone`: the same LPIPS heads on a fixed-seed random AlexNet; a deterministic,
    offline stand-in whose values are not comparable to real LPIPS.
    `pixel_l2`: root-mean-square pixel difference in [0, 1].
    `dino`: 1 - cosine similarity of DINOv2 [CLS] embeddings (as ImageReFL), from `model` (a local
    directory or hub id; default facebook/dinov2-base).
    """

    def __init__(self, metric: str = "lpips", device: torch.device | str = "cpu", model: str | None = None) -> None:
        if metric not in DIVERSITY_METRICS:
            raise EvaluationError(f"unknown diversity metric {metric!r}; choose one of {', '.join(DIVERSITY_METRICS)}")
        self.metric = metric
        self.device = torch.device(device)
        self.model_name = (model or DEFAULT_DINO_MODEL) if metric == "dino" else None
        self.model = self.processor = None
        if metric == "dino":
            self.processor, self.model = _build_dino(self.model_name, self.device)
        elif metric != "pixel_l2":
            self.model = _build_lpips(metric == "lpips_random_backbone").to(self.device)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """`dino`: unit-norm DINOv2 [CLS] embeddings `[N, D]` of images `[N, 3, H, W]` in [0, 1]."""
        inputs = self.processor(images=list(images.float().cpu()), return_tensors="pt", do_rescale=False)
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        return torch.nn.functional.normalize(self.model(pixel_values=pixels).pooler_output.float(), dim=-1)

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distances `[N]` between image batches `[N, 3, H, W]` in [0, 1]."""
        if self.metric == "dino":
            return 1 - (self.embed(a) * self.embed(b)).sum(-1)
        a, b = a.to(self.device, torch.float32), b.to(self.device, torch.float32)
        if self.model is None:
            return (a - b).pow(2).flatten(1).mean(1).sqrt()
        return self.model(a, b, normalize=True).flatten()  # normalize: [0, 1] -> LPIPS's [-1, 1]

    def __call__(self, images: torch.Tensor) -> float:
        """Mean pairwise distance among images `[S, 3, H, W]` (S >= 2) of one prompt."""
        if images.shape[0] < 2:
            raise EvaluationError("diversity needs at least 2 images per prompt (--seeds_per_prompt >= 2)")
        i, j = torch.triu_indices(images.shape[0], images.shape[0], offset=1)
        if self.metric == "dino":  # embed each image once, not once per pair
            embeddings = self.embed(images)
            return float(1 - (embeddings[i] * embeddings[j]).sum(-1).mean())
        return float(self.distance(images[i], images[j]).mean())


def lpips_or_stand_in(device: torch.device | str = "cpu", log: Callable[[str], None] = print) -> Diversity:
    """LPIPS where torchvision's AlexNet weights are available (on disk, or downloadable), else the
    `lpips_random_backbone` stand-in, said once through `log`: for logging that must never stop a run."""
    try:
        return Diversity("lpips", device)
    except EvaluationError:
        log(f"LPIPS is unavailable (torchvision's AlexNet weights are not at {_alexnet_weights_path()} and cannot "
            "be downloaded): using the lpips_random_backbone stand-in, whose values are not comparable to LPIPS")
        return Diversity("lpips_random_backbone", device)


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


@dataclass(frozen=True)
class Variant:
    """One row: which LoRAs at which adapter weights, and whether AIG steers them."""

    label: str
    control: str  # one of CONTROLS
    adapters: tuple[tuple[str, Path, float], ...] = ()  # (LoRA label, weights file, adapter weight)
    aig: str | None = None
    lora_scale: float | None = None

    @property
    def lora(self) -> str:
        return "+".join(label for label, _, _ in self.adapters)

    @property
    def path(self) -> str | None:
        if not self.adapters:
            return None
        paths = [str(f.parent if f.name == LORA_WEIGHTS_NAME else f) for _, f, _ in self.adapters]
        return ";".join(paths)


def parse_mix(items: Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """`["a=0.5", "b=0.5"]` (or a mapping) -> {"a": 0.5, "b": 0.5}; names are LoRA labels or paths."""
    if isinstance(items, Mapping):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        pairs = []
        for item in items:
            name, sep, weight = str(item).rpartition("=")
            if not sep or not name:
                raise EvaluationError(f"--mix takes NAME=WEIGHT items, got {item!r}")
            pairs.append((name, weight))
    mix: dict[str, float] = {}
    for name, weight in pairs:
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise EvaluationError(f"--mix {name}={weight}: the weight is not a number") from None
        if not math.isfinite(value):
            raise EvaluationError(f"--mix {name}={weight}: the weight must be finite")
        if name in mix:
            raise EvaluationError(f"--mix names {name!r} twice")
        mix[name] = value
    if not mix:
        raise EvaluationError("--mix needs at least one NAME=WEIGHT")
    return mix


def plan_variants(
    loras: Sequence[str | os.PathLike] = (),
    lora_scales: Sequence[float] = (),
    aig: Sequence[str] = (),
    mixes: Sequence[Sequence[str] | Mapping[str, float]] = (),
    include_base: bool = True,
) -> list[Variant]:
    """The rows to evaluate, in order: base, then per LoRA its plain, scaled and AIG rows, then the
    mixes. Every input is checked here, before any model is loaded."""
    from utils.aig import AIGError, check_schedule

    labels = _unique_labels(loras)
    files = [lora_label_and_file(p)[1] for p in loras]
    if (lora_scales or aig) and not loras:
        raise EvaluationError("--lora_scale and --aig apply to the LoRAs given with --lora: give at least one")
    for scale in lora_scales:
        if not math.isfinite(scale):
            raise EvaluationError(f"--lora_scale {scale}: must be finite")
    try:
        schedules = [check_schedule(s) for s in aig]
    except AIGError as e:
        raise EvaluationError(str(e)) from e
    variants = [Variant("base", "base")] if include_base else []
    for label, file in zip(labels, files, strict=True):
        variants.append(Variant(label, "lora", ((label, file, 1.0),)))
        variants += [Variant(f"{label}@scale={s:g}", "scale", ((label, file, float(s)),), lora_scale=float(s))
                     for s in lora_scales]
        variants += [Variant(f"{label}@aig={s}", "aig", ((label, file, 1.0),), aig=s) for s in schedules]
    by_label = dict(zip(labels, files, strict=True))
    for items in mixes:
        adapters = []
        for name, weight in parse_mix(items).items():
            if name in by_label:
                adapters.append((name, by_label[name], weight))
            elif Path(name).exists():
                adapters.append((*lora_label_and_file(name), weight))
            else:
                raise EvaluationError(f"--mix {name}: neither the label of a --lora ({', '.join(labels) or 'none'}) "
                                      "nor a LoRA directory")
        if len({label for label, _, _ in adapters}) != len(adapters):
            raise EvaluationError(f"--mix {' '.join(map(str, items))}: two components have the same label")
        label = "mix(" + ",".join(f"{name}={w:g}" for name, _, w in adapters) + ")"
        variants.append(Variant(label, "mix", tuple(adapters)))
    seen = [v.label for v in variants]
    duplicates = sorted({label for label in seen if seen.count(label) > 1})
    if duplicates:
        raise EvaluationError(f"rows requested twice: {', '.join(duplicates)}")
    return variants


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
) -> tuple[dict, list[dict], list[dict], torch.Tensor | None]:
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
    per_image = [{"model": label, "prompt_index": i, "seed_index": j, "seed": image_seed(seed, i, j),
                  "prompt": prompts[i], "reward": float(r)} for (i, j), r in zip(pairs, rewards, strict=True)]
    div = torch.tensor([p["diversity"] for p in per_prompt])
    row = {
        "model": label,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "diversity": float(div.mean()),
        "diversity_std": float(div.std()) if len(div) > 1 else 0.0,
    }
    return row, per_prompt, per_image, (torch.cat(grid) if grid else None)


def _load_adapters(pipe, variant: Variant) -> None:
    """Load the variant's LoRAs as named adapters and set their weights (diffusers' set_adapters)."""
    from diffusers.utils import logging as diffusers_logging

    names = []
    for k, (label, file, _) in enumerate(variant.adapters):
        name = f"draftplus_{k}"  # adapter names become module keys: no dots or slashes
        try:
            # UNet-only LoRAs make diffusers warn that the text encoder got none: expected, and checked below.
            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()
            try:
                with warnings.catch_warnings():  # a mix's second adapter: several adapters are the point
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
            finally:
                diffusers_logging.set_verbosity(verbosity)
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise EvaluationError(f"LoRA {label!r} ({file}) does not load into this base model: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            # diffusers only warns when no key matches: we would silently report the base model.
            raise EvaluationError(f"LoRA {label!r} ({file}) has no weights for this base model's UNet "
                                  "or text encoder")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[w for _, _, w in variant.adapters])


class Evaluation(NamedTuple):
    """What `evaluate` returns. `rows`: one per requested row (and, when resuming, the earlier rows of
    results.json), fields ROW_FIELDS; `per_prompt`: one per (row, prompt), PER_PROMPT_FIELDS;
    `grids`: per row evaluated now, its first `grid_prompts` prompts' images `[n * seeds, 3, H, W]`;
    `per_image`: one per (row, prompt index, seed index), PER_IMAGE_FIELDS: the same (i, j) is the
    same initial noise in every row, so rows can be compared image by image (paired statistics)."""

    rows: list[dict]
    per_prompt: list[dict]
    grids: dict[str, torch.Tensor]
    per_image: list[dict]


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
    *,
    lora_scales: Sequence[float] = (),
    aig: Sequence[str] = (),
    mixes: Sequence[Sequence[str] | Mapping[str, float]] = (),
    diversity_model: str | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    settings: dict | None = None,
) -> Evaluation:
    """Score the base model, each LoRA and each control (LoRA scale, AIG schedule, mix) on the same
    prompts and seeds. See `Evaluation` for what comes back, `plan_variants` for the rows.

    `reward` is a spec for `rewards.build_reward` or a callable `(images [B,3,H,W] in [0,1], prompts) -> [B]`.
    With `output_dir`, the outputs are (re)written after every row, and rows already in its
    results.json are skipped (unless `overwrite`); the settings must then be the same.
    """
    if seeds_per_prompt < 2:
        raise EvaluationError("--seeds_per_prompt must be >= 2: diversity compares images of the same prompt")
    if not prompts:
        raise EvaluationError("no prompts to evaluate")
    if scheduler not in SCHEDULERS:
        raise EvaluationError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if diversity_metric not in DIVERSITY_METRICS:
        raise EvaluationError(f"unknown diversity metric {diversity_metric!r}; "
                              f"choose one of {', '.join(DIVERSITY_METRICS)}")
    variants = plan_variants(loras, lora_scales, aig, mixes, include_base)  # checks every LoRA and control
    spec = reward if isinstance(reward, str) else getattr(reward, "spec", getattr(reward, "__name__", "custom"))
    diversity_model = (diversity_model or DEFAULT_DINO_MODEL) if diversity_metric == "dino" else None
    fp = fingerprint(pretrained_model_name_or_path, prompts, spec, reward_options, seeds_per_prompt,
                     num_inference_steps, guidance_scale, resolution, height, width, diversity_metric,
                     diversity_model, seed, scheduler, negative_prompt, eta, dtype)
    previous = Evaluation([], [], {}, [])
    if output_dir is not None and not overwrite:
        previous = read_previous(output_dir, fp)
    done = {row["model"]: row for row in previous.rows}
    for v in variants:  # the same label may name another LoRA now (two runs' checkpoint-10)
        if v.label in done and v.path is not None and not _same_paths(done[v.label].get("path", ""), v.path):
            raise EvaluationError(f"row {v.label!r} in {Path(output_dir) / 'results.json'} was computed from "
                                  f"{done[v.label].get('path')}, not {v.path}; use --overwrite or another --output_dir")
    todo = [v for v in variants if v.label not in done]
    for v in variants:
        if v.label in done:
            log(f"{v.label:>24}: in {Path(output_dir) / 'results.json'}, skipped (--overwrite recomputes)")
    if not todo:
        return previous

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    diversity = Diversity(diversity_metric, device, diversity_model)  # fails fast on missing LPIPS weights
    if isinstance(reward, str):
        from rewards import build_reward

        reward = build_reward(reward, device=device, **(reward_options or {}))
    pipe = load_pipeline(pretrained_model_name_or_path, scheduler, device, dtype)
    # record the size actually generated, not "default"
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or resolution, width or resolution

    gen_kwargs = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                  "height": height, "width": width, "negative_prompt": negative_prompt, "eta": eta}
    common = {"reward": spec, "diversity_metric": diversity_metric, "diversity_model": diversity_model or "",
              "num_prompts": len(prompts), "seeds_per_prompt": seeds_per_prompt,
              "num_images": len(prompts) * seeds_per_prompt, "num_inference_steps": num_inference_steps,
              "guidance_scale": guidance_scale, "resolution": resolution, "height": height, "width": width}
    from utils.aig import annealed_guidance

    out = Evaluation(list(previous.rows), list(previous.per_prompt), {}, list(previous.per_image))
    for variant in todo:
        try:
            if variant.adapters:
                _load_adapters(pipe, variant)
            with annealed_guidance(pipe, variant.aig) if variant.aig else contextlib.nullcontext():
                row, prompt_rows, image_rows, grid = _evaluate_model(
                    pipe, variant.label, prompts, reward, diversity, seeds_per_prompt=seeds_per_prompt,
                    seed=seed, batch_size=batch_size, gen_kwargs=gen_kwargs, grid_prompts=grid_prompts)
        finally:
            if variant.adapters:
                pipe.unload_lora_weights()  # back to the base weights for the next row
        row = {**row, "control": variant.control, "lora": variant.lora,
               "lora_scale": "" if variant.lora_scale is None else variant.lora_scale,
               "aig_schedule": variant.aig or "", "path": variant.path or pretrained_model_name_or_path, **common}
        out.rows.append({k: row[k] for k in ROW_FIELDS})
        out.per_prompt.extend(prompt_rows)
        out.per_image.extend(image_rows)
        if grid is not None:
            out.grids[variant.label] = grid
        log(f"{variant.label:>24}: reward {row['reward_mean']:+.4f} ± {row['reward_std']:.4f}   "
            f"diversity ({diversity_metric}) {row['diversity']:.4f}")
        if output_dir is not None:  # after every row: an interruption loses at most the row in progress
            write_outputs(output_dir, out.rows, out.per_prompt, {variant.label: grid} if grid is not None else {},
                          settings if settings is not None else {}, per_image=out.per_image, fingerprint=fp)
    return out


# ----------------------------------------------------------------------------------------- resuming


def fingerprint(model: str, prompts: Sequence[str], reward: str, reward_options: dict | None, seeds_per_prompt: int,
                num_inference_steps: int, guidance_scale: float, resolution: int | None, height: int | None,
                width: int | None, diversity_metric: str, diversity_model: str | None, seed: int, scheduler: str,
                negative_prompt: str | None, eta: float, dtype: torch.dtype) -> dict:
    """Everything besides the row's own LoRA/control that its numbers depend on: rows of an earlier run
    are reused only when this is equal."""
    return {
        "model": model, "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
        "num_prompts": len(prompts), "reward": reward, "reward_options": json.dumps(reward_options or {}, sort_keys=True,
                                                                                    default=str),
        "seeds_per_prompt": seeds_per_prompt, "seed": seed, "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale, "resolution": resolution, "height": height, "width": width,
        "diversity_metric": diversity_metric, "diversity_model": diversity_model, "scheduler": scheduler,
        "negative_prompt": negative_prompt, "eta": eta, "dtype": str(dtype).removeprefix("torch."),
    }


def _same_paths(a: str, b: str) -> bool:
    """Two `;`-separated path lists (a row's `path`) name the same files."""
    return [Path(p).resolve() for p in a.split(";")] == [Path(p).resolve() for p in b.split(";")]


def _read_csv(path: Path, types: dict[str, type]) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: types.get(k, str)(v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_previous(output_dir: str | os.PathLike, fp: dict) -> Evaluation:
    """The rows, per-prompt and per-image records of an earlier run in `output_dir` (empty if none);
    EvaluationError if that run used other settings."""
    path = Path(output_dir) / "results.json"
    if not path.is_file():
        return Evaluation([], [], {}, [])
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationError(f"{path} is not readable ({e}); use --overwrite or another --output_dir") from e
    old = previous.get("fingerprint")
    if old != fp:
        what = ("it was written without settings to compare" if old is None else
                "its " + ", ".join(f"{k}={old.get(k)!r} (now {v!r})" for k, v in fp.items() if old.get(k) != v))
        raise EvaluationError(f"{path} holds rows from other settings ({what}); use --overwrite to replace "
                              "them, or another --output_dir")
    rows = previous.get("results", [])
    labels = {row["model"] for row in rows}
    # Tables are written before results.json: records of a row that never made it there are dropped.
    per_prompt = [r for r in _read_csv(Path(output_dir) / "per_prompt.csv",
                                       {"prompt_index": int, "reward_mean": float, "diversity": float})
                  if r["model"] in labels]
    per_image = [r for r in _read_csv(Path(output_dir) / "per_image.csv",
                                      {"prompt_index": int, "seed_index": int, "seed": int, "reward": float})
                 if r["model"] in labels]
    return Evaluation(rows, per_prompt, {}, per_image)


# ----------------------------------------------------------------------------------------- outputs


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str] | None = None) -> None:
    def write(target: Path) -> None:
        with open(target, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields or rows[0]), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    _atomic_write(path, write)


def _lora_of(row: dict) -> str:
    """The LoRA a row steers (rows written before `lora` was a field: their label)."""
    return row.get("lora") or row["model"].split("@", 1)[0]


def plot_series(rows: Sequence[dict]) -> list[dict]:
    """The plot's series: `{"name", "control", "rows", "line"}`, one per kind of control (and per LoRA
    for LoRA-scale sweeps and AIG schedules). A scale sweep runs from the base model (scale 0) through
    the LoRA's own row (scale 1), ordered by scale, and is drawn as a line."""
    by_label = {row["model"]: row for row in rows}
    control = {row["model"]: row.get("control") or ("base" if row["model"] == "base" else "lora") for row in rows}
    series = []
    if "base" in by_label:
        series.append({"name": "base", "control": "base", "rows": [by_label["base"]], "line": False})
    plain = [row for row in rows if control[row["model"]] == "lora"]
    if plain:
        series.append({"name": "LoRA", "control": "lora", "rows": plain, "line": False})
    for kind, title in (("scale", "LoRA scale"), ("aig", "AIG")):
        loras = list(dict.fromkeys(_lora_of(row) for row in rows if control[row["model"]] == kind))
        for lora in loras:
            points = [row for row in rows if control[row["model"]] == kind and _lora_of(row) == lora]
            if kind == "scale":
                ends = [dict(by_label["base"], lora_scale=0.0)] if "base" in by_label else []
                if lora in by_label:
                    ends.append(dict(by_label[lora], lora_scale=1.0))
                points = sorted(points + [e for e in ends if all(float(p["lora_scale"]) != e["lora_scale"]
                                                                 for p in points)],
                                key=lambda row: float(row["lora_scale"]))
            series.append({"name": f"{lora}: {title}", "control": kind, "rows": points, "line": kind == "scale"})
    mixes = [row for row in rows if control[row["model"]] == "mix"]
    if mixes:
        series.append({"name": "LoRA mix", "control": "mix", "rows": mixes, "line": False})
    return series


def _point_label(row: dict, control: str) -> str:
    if control == "scale":
        return f"{float(row['lora_scale']):g}"
    if control == "aig":
        return row.get("aig_schedule") or row["model"].split("@aig=", 1)[-1]
    return row["model"]


def plot_reward_vs_diversity(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Diversity on x, mean reward on y; every kind of control its own series (see `plot_series`):
    the base model a black star, plain LoRAs circles, LoRA-scale sweeps lines, AIG schedules
    triangles, mixes diamonds.

    No error bars: every row sees the same prompts and seeds, so the between-prompt spread (in the
    tables as reward_std) would dwarf the paired differences that matter here.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"base": "*", "lora": "o", "scale": "s", "aig": "^", "mix": "D"}
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    colors = plt.get_cmap("tab10")
    for k, s in enumerate(plot_series(rows)):
        is_base = s["control"] == "base"
        xs, ys = [r["diversity"] for r in s["rows"]], [r["reward_mean"] for r in s["rows"]]
        ax.plot(xs, ys, ("-" if s["line"] else "") + markers[s["control"]], label=s["name"],
                color="black" if is_base else colors(k % 10), markersize=16 if is_base else 7,
                zorder=3 if is_base else 2, alpha=0.9)
        for row in s["rows"]:
            if s["line"] and row.get("control") in ("base", "lora", None):
                continue  # the sweep's ends are labelled by their own series
            ax.annotate(_point_label(row, s["control"]), (row["diversity"], row["reward_mean"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=7,
                        fontweight="bold" if is_base else "normal")
    first = rows[0]
    ax.set_xlabel(f"diversity: mean pairwise {first['diversity_metric']} per prompt")
    ax.set_ylabel(f"mean reward ({first['reward']})")
    ax.set_title(f"reward vs diversity ({first['num_prompts']} prompts x {first['seeds_per_prompt']} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _sample_name(label: str) -> str:
    return "samples_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in label) + ".png"


def write_outputs(output_dir: str | os.PathLike, rows: list[dict], per_prompt: list[dict],
                  grids: dict[str, torch.Tensor], settings: dict, per_image: list[dict] | None = None,
                  fingerprint: dict | None = None) -> dict[str, Path]:
    """results.json (settings, fingerprint, rows), results.csv, per_prompt.csv, per_image.csv,
    reward_vs_diversity.png and samples_*.png; the tables before results.json, each replaced atomically."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "per_prompt": out / "per_prompt.csv",
             "plot": out / "reward_vs_diversity.png"}
    _write_csv(paths["csv"], rows, ROW_FIELDS)
    _write_csv(paths["per_prompt"], per_prompt, PER_PROMPT_FIELDS)
    if per_image:
        paths["per_image"] = out / "per_image.csv"
        _write_csv(paths["per_image"], per_image, PER_IMAGE_FIELDS)
    _atomic_write(paths["plot"], lambda p: plot_reward_vs_diversity(rows, p.with_suffix(".png")))
    if grids:
        from torchvision.utils import save_image

        for label, images in grids.items():
            paths[f"samples:{label}"] = out / _sample_name(label)
            save_image(images, paths[f"samples:{label}"], nrow=rows[0]["seeds_per_prompt"], padding=1)
    document = {"settings": settings, "fingerprint": fingerprint, "results": rows}
    _atomic_write(paths["json"], lambda p: p.write_text(json.dumps(document, indent=2) + "\n"))
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
    from utils.aig import SCHEDULE_HELP

    p = argparse.ArgumentParser(prog="python -m utils.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Base pipeline: hub id, local dir, or 'toy' (the built-in pretrained toy).")
    p.add_argument("--lora", nargs="*", default=[], metavar="DIR",
                   help="LoRA dirs holding pytorch_lora_weights.safetensors (trainer outputs or checkpoint-N "
                        "dirs); labelled by directory name.")
    p.add_argument("--lora_scale", nargs="+", type=float, default=[], metavar="S",
                   help="Also evaluate every --lora at these strengths (diffusers' adapter weights): rows "
                        "NAME@scale=S.")
    p.add_argument("--aig", nargs="+", default=[], metavar="SCHEDULE",
                   help=f"Also evaluate every --lora under annealed importance guidance with these schedules "
                        f"({SCHEDULE_HELP}): rows NAME@aig=SCHEDULE.")
    p.add_argument("--mix", nargs="+", action="append", default=[], metavar="NAME=W",
                   help="Evaluate a weighted combination of LoRAs (NAME: a --lora label or a LoRA dir), e.g. "
                        "--mix a=0.5 b=0.5: row mix(a=0.5,b=0.5). Repeat --mix for several mixes.")
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
                        "pixel_l2 (RMS pixel distance), dino (1 - cosine of DINOv2 [CLS] embeddings).")
    p.add_argument("--diversity_model", default=None,
                   help=f"DINOv2 model for --diversity_metric dino: local dir or hub id (default {DEFAULT_DINO_MODEL}).")
    p.add_argument("--batch_size", type=int, default=16, help="Images per pipeline call.")
    p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="Pipeline weights dtype.")
    p.add_argument("--grid_prompts", type=int, default=8,
                   help="Save a samples_<row>.png grid of the first N prompts (0: none).")
    p.add_argument("--output_dir", default="outputs/eval", help="Where results.json/csv and the plot go.")
    p.add_argument("--overwrite", action="store_true",
                   help="Discard the rows already in --output_dir's results.json (default: keep and skip them).")
    args = p.parse_args(argv)
    if args.seeds_per_prompt < 2:
        p.error("--seeds_per_prompt must be >= 2 (diversity compares images of the same prompt)")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if args.no_base and not (args.lora or args.mix):
        p.error("--no_base needs at least one --lora or --mix")
    if args.diversity_model is not None and args.diversity_metric != "dino":
        p.error("--diversity_model is for --diversity_metric dino")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # see train_draftplus.main
    args = parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    from rewards import RewardLoadError, RewardSpecError, parse_reward_options

    settings = {k: v for k, v in vars(args).items() if k not in ("output_dir", "overwrite")}
    try:
        reward_options = parse_reward_options(args.reward_options)
        prompts = read_prompts(args.prompts)[: args.max_prompts]
        settings["prompts_used"] = len(prompts)
        result = evaluate(
            args.pretrained_model_name_or_path, prompts, reward=args.reward, loras=args.lora,
            seeds_per_prompt=args.seeds_per_prompt, num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale, resolution=args.resolution, height=args.height, width=args.width,
            diversity_metric=args.diversity_metric, seed=args.seed, batch_size=args.batch_size,
            scheduler=args.scheduler, negative_prompt=args.negative_prompt, eta=args.eta, device=args.device,
            dtype=dtype, reward_options=reward_options, include_base=not args.no_base,
            grid_prompts=args.grid_prompts, log=print, lora_scales=args.lora_scale, aig=args.aig, mixes=args.mix,
            diversity_model=args.diversity_model, output_dir=args.output_dir, overwrite=args.overwrite,
            settings=settings)
    except (EvaluationError, RewardSpecError, RewardLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(result.rows)} rows in {Path(args.output_dir) / 'results.json'}; plot: "
          f"{Path(args.output_dir) / 'reward_vs_diversity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
