"""The coloured-shapes data the pretrained toy learns: captions, prompts, rendering, data-set sampling.

32x32 images of one shape (circle, square, triangle) in one of six colours on a background of another,
captioned "a red circle on a blue background" (or, shorter, "a red circle"). Everything here is
deterministic given a torch generator, so the toy's build is reproducible; what it returns is part of what
the toy's version (`utils.toys.pretrain.TOY_VERSION`) stands for.
"""

from __future__ import annotations

import torch

TOY_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.18, 0.70, 0.24),
    "blue": (0.16, 0.30, 0.86),
    "yellow": (0.95, 0.85, 0.20),
    "purple": (0.68, 0.20, 0.80),  # magenta-leaning: a bluish purple is too easily taken for blue
    "white": (0.94, 0.94, 0.94),
}
TOY_SHAPES = ("circle", "square", "triangle")
TOY_RESOLUTION = 32
# Words a toy's tokenizer keeps whole: its own list, so that growing the test tokenizer's words does not
# change a toy.
TOY_VOCAB = ("a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "shape", "background",
             "small", "big", *TOY_COLORS, *TOY_SHAPES)


def toy_caption(color: str, shape: str, background: str | None = None) -> str:
    """The caption of one toy image; `background=None` leaves the background unsaid."""
    caption = f"a {color} {shape}"
    return caption if background is None else f"{caption} on a {background} background"


def toy_prompts(with_background: bool = True) -> list[str]:
    """The toy's natural prompts: every colour x shape (18), then every colour x shape x other background (90)."""
    prompts = [toy_caption(c, s) for c in TOY_COLORS for s in TOY_SHAPES]
    if with_background:
        prompts += [toy_caption(c, s, b) for c in TOY_COLORS for s in TOY_SHAPES for b in TOY_COLORS if b != c]
    return prompts


def render_toy_images(
    color: torch.Tensor,
    background: torch.Tensor,
    shape: torch.Tensor,
    center: torch.Tensor,
    radius: torch.Tensor,
    resolution: int = TOY_RESOLUTION,
    supersample: int = 4,
) -> torch.Tensor:
    """Anti-aliased shapes: colours `[N, 3]` in [0, 1], shape ids `[N]` (index into TOY_SHAPES),
    centres `[N, 2]` (x, y) and radii `[N]` in pixels. Returns images `[N, 3, H, W]` in [0, 1]."""
    side = resolution * supersample
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / supersample
    x, y = coords.view(1, 1, side), coords.view(1, side, 1)
    cx, cy, r = center[:, 0].view(-1, 1, 1), center[:, 1].view(-1, 1, 1), radius.view(-1, 1, 1)
    circle = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    # The square's half-side and the triangle's size are scaled so the three shapes cover similar areas.
    square = ((x - cx).abs() <= 0.85 * r) & ((y - cy).abs() <= 0.85 * r)
    top, bottom = cy - r, cy + 0.8 * r
    half_width = ((y - top) / (bottom - top)).clamp(0, 1) * 1.15 * r
    triangle = (y >= top) & (y <= bottom) & ((x - cx).abs() <= half_width)
    s = shape.view(-1, 1, 1)
    mask = torch.where(s == 0, circle, torch.where(s == 1, square, triangle)).float()
    alpha = torch.nn.functional.avg_pool2d(mask[:, None], supersample)
    return alpha * color[:, :, None, None] + (1 - alpha) * background[:, :, None, None]


def sample_toy_dataset(
    per_combination: int, generator: torch.Generator, resolution: int = TOY_RESOLUTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (colour, shape, other background) combination `per_combination` times, at a random position
    and size with slight colour jitter. Returns images `[N, 3, H, W]` in [0, 1] and labels `[N, 3]`
    (colour, shape, background indices into TOY_COLORS / TOY_SHAPES)."""
    n_colors, n_shapes = len(TOY_COLORS), len(TOY_SHAPES)
    combos = [(c, s, b) for c in range(n_colors) for s in range(n_shapes) for b in range(n_colors) if b != c]
    labels = torch.tensor(combos, dtype=torch.long).repeat(per_combination, 1)
    n = labels.shape[0]
    palette = torch.tensor(list(TOY_COLORS.values()))

    def jitter(rgb: torch.Tensor) -> torch.Tensor:
        return (rgb + 0.05 * (2 * torch.rand(rgb.shape, generator=generator) - 1)).clamp(0, 1)

    radius = resolution * (0.19 + 0.13 * torch.rand(n, generator=generator))
    # A 2-pixel margin: every image keeps a pure-background border.
    lo, span = radius + 2, resolution - 2 * (radius + 2)
    center = lo[:, None] + span[:, None] * torch.rand(n, 2, generator=generator)
    fg, bg = jitter(palette[labels[:, 0]]), jitter(palette[labels[:, 2]])
    images = torch.cat([
        render_toy_images(*parts, resolution=resolution)
        for parts in zip(fg.split(512), bg.split(512), labels[:, 1].split(512), center.split(512), radius.split(512))
    ])
    return images, labels
