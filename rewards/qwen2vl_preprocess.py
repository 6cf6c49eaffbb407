"""Qwen2-VL's image processor, differentiable: `[B, 3, H, W]` in [0, 1] -> `pixel_values`, `image_grid_thw`.

Qwen2-VL does not crop: it resizes each image so that both sides are multiples of
`patch_size * merge_size` (28) and the pixel count lies within [min_pixels, max_pixels]
(`smart_resize`), rescales and normalises with the OpenAI CLIP mean/std, repeats the image
`temporal_patch_size` (2) times along time, and cuts it into flat 14x14 patches ordered by 2x2
merge windows (`patchify`): `pixel_values` is `[B * grid_h * grid_w, 3 * 2 * 14 * 14]`.

* `smart_resize` is the official arithmetic (qwen-vl-utils' `fetch_image`, which HPSv3's inferencer
  calls, and transformers' `Qwen2VLImageProcessor`): the same float operations in the same order,
  since a floor/ceil of e.g. `512 / beta / 28` decides between 15 and 16 patches.
* The resize is PIL's bicubic (what `fetch_image` does to a PIL image), done with
  `rewards.preprocess.resize`: torch's antialiased bicubic kernels with PIL's two clipped passes.
  Only PIL's rounding to uint8 is not emulated.
* The patch layout is the official one; `tests/test_rewards_hpsv3.py` checks it element for element
  against transformers' own processor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import RewardSpecError
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PIL_RESAMPLE, _straight_through_clamp, resize


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) after Qwen2-VL's resize: multiples of `factor`, pixel count in [min, max].

    The arithmetic of qwen-vl-utils (HPSv3's copy, `hpsv3/dataset/utils.py`), operation for operation.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"Qwen2-VL needs an aspect ratio below 200, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class Qwen2VLPreprocessConfig:
    """The settings of Qwen2-VL's image pipeline (defaults: Qwen2-VL's own, with HPSv3's pixel budget)."""

    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 256 * 28 * 28
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    resample: int = PIL_RESAMPLE["bicubic"]
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if self.min_pixels <= 0 or self.max_pixels < self.min_pixels:
            raise RewardSpecError(
                f"Qwen2-VL pixel budget needs 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}"
            )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def tokens_per_image(self, height: int, width: int) -> int:
        """How many `<|image_pad|>` tokens (merged patches) an image of this size becomes."""
        out_h, out_w = self.output_size(height, width)
        return (out_h // self.factor) * (out_w // self.factor)


def patchify(images: Tensor, config: Qwen2VLPreprocessConfig) -> Tensor:
    """Normalised `[B, C, H, W]` -> `[B * grid_h * grid_w, C * T * P * P]` in Qwen2-VL's order.

    Patches are grouped by merge window (row-major windows, row-major patches inside a window) and
    each flat patch is laid out (channel, time, row, column); the image is repeated over time.
    """
    batch, channels, height, width = images.shape
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    x = images.reshape(batch, channels, grid_h // m, m, p, grid_w // m, m, p)
    # -> [batch, grid_h/m, grid_w/m, m, m, channel, p, p]
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
    return x.reshape(batch * grid_h * grid_w, channels * t * p * p)


def qwen2vl_pixels(
    images: Tensor, config: Qwen2VLPreprocessConfig, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """`[B, 3, H, W]` images in [0, 1] -> (`pixel_values`, `image_grid_thw` `[B, 3]`), differentiably.

    Computes in fp32 and casts `pixel_values` to `dtype` at the end (as `rewards.preprocess`).
    """
    x = images.float()
    height, width = x.shape[-2:]
    size = config.output_size(int(height), int(width))
    if tuple(size) != (height, width):
        x = _straight_through_clamp(resize(x, size, config.resample))
    mean = torch.tensor(config.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(config.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x - mean) / std
    pixel_values = patchify(x, config)
    grid = torch.tensor(
        [[1, size[0] // config.patch_size, size[1] // config.patch_size]] * x.shape[0],
        dtype=torch.long,
        device=x.device,
    )
    return (pixel_values if dtype is None else pixel_values.to(dtype)), grid
