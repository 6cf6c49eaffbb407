"""Model-free differentiable rewards: cheap, deterministic, useful for toy runs and sanity checks.

All operate on images in [0, 1] (RGB, no gamma linearisation) and return float32 `[B]` scores of
order 1. Formulas (mean = average over pixels):

* brightness       mean(0.2126 R + 0.7152 G + 0.0722 B)                       in [0, 1]
* saturation       mean((max(R,G,B) - min(R,G,B)) / (max(R,G,B) + eps))        in [0, 1] (HSV S)
* colorfulness     Hasler & Suesstrunk (2003) M = sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 + mu_yb^2),
                   rg = R - G, yb = (R + G)/2 - B, on the [0, 1] scale (the paper's 0-255 value / 255)
* compressibility  -(mean|I[x+1]-I[x]| + mean|I[y+1]-I[y]|) (negative total variation per pixel) in [-2, 0]
* color            mean(<p, c>) / ||c||^2 with c = t - mean(t) the chroma of the target colour t:
                   the projection of each pixel's colour on the target's chroma axis, 1 at the
                   target colour, 0 on greys. For t = red this is exactly mean(R - (G + B)/2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Reward, as_float_images, check_inputs
from .errors import RewardSpecError

#: Named targets for `color`. Greys (white/black/gray) have no chroma; use `brightness` for those.
NAMED_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.75, 0.8),
}

# Rec. 709 luma weights (the sRGB primaries).
_LUMA = (0.2126, 0.7152, 0.0722)


def parse_color(target: str | Sequence[float]) -> tuple[float, float, float]:
    """A colour name, `#rrggbb`, `"r;g;b"`/`"r g b"` in [0, 1], or a sequence of 3 floats."""
    if isinstance(target, str):
        text = target.strip().lower()
        if text in NAMED_COLORS:
            return NAMED_COLORS[text]
        if text.startswith("#") and len(text) == 7:
            try:
                return tuple(int(text[i : i + 2], 16) / 255.0 for i in (1, 3, 5))  # type: ignore[return-value]
            except ValueError:
                pass
        parts = text.replace(";", " ").replace("/", " ").split()
        if len(parts) == 3:
            try:
                return tuple(float(p) for p in parts)  # type: ignore[return-value]
            except ValueError:
                pass
        raise RewardSpecError(
            f"unknown colour {target!r}: use one of {', '.join(NAMED_COLORS)}, '#rrggbb' or 'r;g;b' in [0, 1]"
        )
    try:
        values = tuple(float(v) for v in target)
    except (TypeError, ValueError):
        raise RewardSpecError(f"colour {target!r} is neither a name nor 3 numbers") from None
    if len(values) != 3:
        raise RewardSpecError(f"colour must have 3 components, got {len(values)}")
    return values  # type: ignore[return-value]


def color_direction(target: str | Sequence[float]) -> Tensor:
    """c / ||c||^2 for the chroma c = t - mean(t) of the target colour t; RewardSpecError for a grey."""
    rgb = torch.tensor(parse_color(target), dtype=torch.float32)
    chroma = rgb - rgb.mean()
    norm2 = float(chroma.pow(2).sum())
    if norm2 < 1e-6:
        raise RewardSpecError(f"colour target {target!r} is a grey (no chroma); use the `brightness` reward")
    return chroma / norm2


class BrightnessReward(Reward):
    """Mean Rec. 709 luma of the image in [0, 1]."""

    name = "brightness"
    description = "mean Rec.709 luma 0.2126R+0.7152G+0.0722B (model-free)"
    score_range = "[0, 1]"

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        check_inputs(images, prompts)
        x = as_float_images(images)
        w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
        return (x * w).sum(1).mean(dim=(1, 2))


class SaturationReward(Reward):
    """Mean HSV saturation (max - min) / max; `eps` keeps it finite (and differentiable) on black."""

    name = "saturation"
    description = "mean HSV saturation (max-min)/(max+eps) (model-free)"
    score_range = "[0, 1]"

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        check_inputs(images, prompts)
        x = as_float_images(images)
        hi = x.amax(dim=1)
        lo = x.amin(dim=1)
        return ((hi - lo) / (hi + self.eps)).mean(dim=(1, 2))


class ColorfulnessReward(Reward):
    """Hasler & Suesstrunk colourfulness on the [0, 1] scale (paper value / 255).

    `eps` inside the square roots keeps the gradient finite on a flat grey image (sqrt'(0) = inf).
    """

    name = "colorfulness"
    description = "Hasler-Suesstrunk colourfulness sqrt(sd_rg^2+sd_yb^2)+0.3*sqrt(mu_rg^2+mu_yb^2) (model-free)"
    score_range = "~0-0.6"

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        check_inputs(images, prompts)
        x = as_float_images(images)
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        rg = (r - g).flatten(1)
        yb = (0.5 * (r + g) - b).flatten(1)
        # Population std (as the paper's numpy reference computes it).
        std = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False) + self.eps)
        mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + self.eps)
        return std + 0.3 * mean


class CompressibilityReward(Reward):
    """Negative mean absolute difference between neighbouring pixels (anisotropic total variation).

    A differentiable proxy for JPEG compressibility (DDPO's compressibility reward is the
    non-differentiable negative JPEG file size): JPEG spends its bits on high-frequency energy,
    which total variation measures. 0 for a flat image, about -0.67 for uniform noise, -2 at most.
    """

    name = "compressibility"
    description = "-(mean|dI/dx|+mean|dI/dy|): negative total variation, a differentiable JPEG-size proxy"
    score_range = "[-2, 0]"

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        check_inputs(images, prompts)
        x = as_float_images(images)
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
        return -(dx + dy)


class ColorReward(Reward):
    """How much the image's colour points towards `target`: mean(<p, c>) / ||c||^2, c = t - mean(t).

    1 for an image filled with the target colour, 0 for greys, negative for the opposite hue.
    For `target="red"` it is exactly mean(R - (G + B) / 2), the toy demo's "redness".
    """

    name = "color"
    description = (
        "mean <pixel, c>/|c|^2, c = chroma of the target colour (a name, #rrggbb or r;g;b): "
        "1 at the target, 0 on greys (model-free)"
    )
    score_range = "[-1, 1] for saturated targets"

    def __init__(self, target: str | Sequence[float] = "red") -> None:
        super().__init__()
        self.target = target
        self.register_buffer("direction", color_direction(target), persistent=False)

    @classmethod
    def check_options(cls, **options: Any) -> None:
        super().check_options(**options)
        if "target" in options:
            color_direction(options["target"])

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        check_inputs(images, prompts)
        x = as_float_images(images)
        d = self.direction.to(x.device).view(1, 3, 1, 1)
        return (x * d).sum(1).mean(dim=(1, 2))


class RednessReward(ColorReward):
    """`color` with the target fixed to red: mean(R - (G + B) / 2), the toy demo's reward."""

    name = "redness"
    description = "mean(R - (G+B)/2): `color` with target=red, the toy demo's colour reward"
    score_range = "[-1, 1]"

    def __init__(self) -> None:
        super().__init__("red")
