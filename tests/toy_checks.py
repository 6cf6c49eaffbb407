"""What the toys' tests check their images and committed copies with: a colour classifier calibrated on the toy
data, caption-following accuracy of a pipeline's own `__call__`, the configs a build must keep, and a toy's
training replaced by a random pipeline for its cache tests."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from utils.toys import toy
from utils.toys.data import TOY_COLORS, TOY_SHAPES, toy_caption

COLORS = list(TOY_COLORS)


def classify_colors(images: torch.Tensor, max_dist: float = 0.35) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground, background) TOY_COLORS index per image `[N, 3, H, W]` in [0, 1].

    Each pixel votes for its nearest palette colour (pixels farther than `max_dist` from all of them,
    i.e. edges and artifacts, abstain); the background is the most voted colour (it covers >= 2/3 of a
    toy image), the foreground the runner-up.
    """
    palette = torch.tensor(list(TOY_COLORS.values()))
    pixels = images.float().permute(0, 2, 3, 1).reshape(images.shape[0], -1, 3)
    dist, nearest = torch.cdist(pixels, palette[None].expand(len(pixels), -1, -1)).min(dim=-1)
    nearest = torch.where(dist <= max_dist, nearest, len(palette))
    votes = torch.nn.functional.one_hot(nearest, len(palette) + 1)[..., :-1].sum(1)
    top2 = votes.topk(2, dim=1).indices
    return top2[:, 1], top2[:, 0]


def caption_following(toy: str | Path | DiffusionPipeline, guidance_scale: float, seeds=(0, 1, 2),
                      num_inference_steps: int = 20, **call_kwargs) -> dict[str, float]:
    """Accuracy of the colour classifier against the captions, over 18 full + 18 short captions x seeds, for a
    pipeline (or its directory) rendering 32x32 images with its own `__call__`."""
    pipe = toy if isinstance(toy, DiffusionPipeline) else DiffusionPipeline.from_pretrained(toy)
    pipe.set_progress_bar_config(disable=True)
    full, fg_full, bg_full = [], [], []
    for i, color in enumerate(COLORS):
        for j, shape in enumerate(TOY_SHAPES):
            background = COLORS[(i + 1 + j) % len(COLORS)]  # every colour pair is balanced over the set
            full.append(toy_caption(color, shape, background))
            fg_full.append(i)
            bg_full.append(COLORS.index(background))
    short = [toy_caption(c, s) for c in COLORS for s in TOY_SHAPES]
    fg_short = [i for i in range(len(COLORS)) for _ in TOY_SHAPES]
    hits = {"fg_full": [], "bg_full": [], "fg_short": []}
    for seed in seeds:
        images = pipe(full + short, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      height=32, width=32, generator=torch.Generator().manual_seed(seed), output_type="pt",
                      **call_kwargs).images
        fg, bg = classify_colors(images)
        n = len(full)
        hits["fg_full"].append(fg[:n] == torch.tensor(fg_full))
        hits["bg_full"].append(bg[:n] == torch.tensor(bg_full))
        hits["fg_short"].append(fg[n:] == torch.tensor(fg_short))
    return {k: torch.cat(v).float().mean().item() for k, v in hits.items()}


# What a build may change in a toy's configs: library versions, the trained VAE's latent normalisation, and the
# padding/truncation settings a tokenizer's last call leaves in tokenizer.json (state, not vocabulary).
BUILD_CHANGES = {"_diffusers_version", "transformers_version", "_name_or_path", "scaling_factor", "shift_factor",
                 "padding", "truncation"}


def assert_same_configs(built: Path, committed: Path, extra_files: tuple[str, ...], version_name: str) -> None:
    """Every JSON config of `committed` (besides `extra_files`) is `built`'s, up to BUILD_CHANGES."""
    kept = sorted(p.relative_to(committed) for p in committed.rglob("*.json"))
    assert kept == sorted([*(p.relative_to(built) for p in built.rglob("*.json")), *map(Path, extra_files)])
    for name in kept:
        if name.name not in extra_files:
            new, old = (json.loads((d / name).read_text()) for d in (built, committed))
            assert {k: v for k, v in new.items() if k not in BUILD_CHANGES} == {
                k: v for k, v in old.items() if k not in BUILD_CHANGES}, f"{name} differs: bump {version_name} and rebuild"


def fake_toy_training(monkeypatch: pytest.MonkeyPatch, cache: Path, name: str,
                      build_random: Callable[..., DiffusionPipeline]) -> list:
    """Toy `name`'s training replaced by `build_random(seed=config.seed)` (seconds, not minutes), its version set
    to 1000 (as if its training code changed: the committed copy is stale) and the cache at `cache`; returns the
    list of the configs the fake training is called with."""
    spec = toy.TOYS[name]
    calls = []

    def fake_train(cfg, log=print):
        calls.append(cfg)
        return build_random(seed=cfg.seed)

    monkeypatch.setenv("DRAFTPLUS_CACHE", str(cache))
    monkeypatch.setattr(spec.pretrain, spec.train_name, fake_train)
    monkeypatch.setattr(spec.pretrain, spec.version_name, 1000)
    return calls
