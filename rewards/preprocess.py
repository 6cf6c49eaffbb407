"""Differentiable re-implementation of CLIP-style image processors (resize -> crop -> rescale -> normalise).

Reward models were trained on images preprocessed by a fixed pipeline (for CLIP: resize the
shortest edge to 224 with PIL bicubic, centre-crop 224x224, scale to [0, 1], normalise with the
OpenAI mean/std). The official processors work on uint8 PIL images / arrays, so they are not
differentiable; this module performs the same operations on float tensors with autograd:

* resize: `F.interpolate(..., antialias=True)`: torch's antialiased kernels are PIL's (same
  support scaling with the downscale factor, bicubic a = -0.5), so they match PIL's `resize`
  up to PIL's uint8 rounding, for down- and upscaling alike. The output size follows
  `transformers.image_transforms.get_resize_output_image_size` exactly (int() truncation).
* two separable passes (horizontal, then vertical) with a clamp to [0, 1] after each, as PIL's
  uint8 intermediate and output images clip (bicubic overshoots near edges) -- with a
  straight-through gradient, so clamped pixels still pass gradient back (a hard clamp would
  zero it exactly where the reward sees strong edges). Only rounding to uint8 is not emulated.
* centre crop with the official offsets (`(H - h) // 2`), zero padding when the crop is larger.
* rescale/normalise: images in [0, 1] are `uint8 / 255`, so `x * 255 * rescale_factor` then
  `(x - mean) / std` reproduces `do_rescale` / `do_normalize` for any rescale factor.

Everything is read from the processor (`ImagePreprocessConfig.from_processor`), never hard-coded.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import RewardLoadError

#: PIL.Image.Resampling codes by name (transformers stores a processor's `resample` as the code,
#: open_clip its `interpolation` as the name).
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_PIL_BICUBIC = PIL_RESAMPLE["bicubic"]
_TORCH_MODE = {PIL_RESAMPLE["nearest"]: "nearest-exact", PIL_RESAMPLE["bilinear"]: "bilinear", _PIL_BICUBIC: "bicubic"}

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _size_field(size: Any, key: str) -> int | None:
    """Read `key` from a processor size (dict, transformers SizeDict, or None)."""
    if size is None:
        return None
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return int(value) if value is not None else None


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """The processor settings that matter for pixel values; see `from_processor`."""

    shortest_edge: int | None = 224  # resize the shortest edge to this (keeps aspect ratio) ...
    resize_hw: tuple[int, int] | None = None  # ... or to exactly (height, width)
    crop_hw: tuple[int, int] | None = (224, 224)  # centre crop (height, width), None = no crop
    resample: int = _PIL_BICUBIC  # PIL.Image.Resampling code
    do_resize: bool = True
    rescale: float = 1.0  # multiplier applied to [0, 1] images: 255 * rescale_factor (1 for /255)
    mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN  # None = no normalisation
    std: tuple[float, ...] | None = OPENAI_CLIP_STD
    # transformers floors the crop offset ((H - h) // 2); torchvision's CenterCrop (open_clip,
    # HPSv2) rounds it (int(round((H - h) / 2))). They differ by one pixel for odd H - h.
    crop_rounding: str = "floor"

    @classmethod
    def from_processor(cls, processor: Any) -> ImagePreprocessConfig:
        """From a transformers image processor (or a processor holding one in `.image_processor`)."""
        proc = getattr(processor, "image_processor", processor)
        size = getattr(proc, "size", None)
        shortest = _size_field(size, "shortest_edge")
        height, width = _size_field(size, "height"), _size_field(size, "width")
        if _size_field(size, "longest_edge") is not None or (
            shortest is None and (height is None or width is None)
        ):
            if getattr(proc, "do_resize", True):
                raise RewardLoadError(f"unsupported processor size {size!r}: need shortest_edge or height+width")
        crop = getattr(proc, "crop_size", None)
        do_crop = bool(getattr(proc, "do_center_crop", False)) and crop is not None
        do_rescale = bool(getattr(proc, "do_rescale", True))
        do_normalize = bool(getattr(proc, "do_normalize", True))
        mean = getattr(proc, "image_mean", None)
        std = getattr(proc, "image_std", None)
        resample = getattr(proc, "resample", None)
        return cls(
            shortest_edge=shortest,
            resize_hw=(height, width) if shortest is None and height and width else None,
            crop_hw=(_size_field(crop, "height"), _size_field(crop, "width")) if do_crop else None,  # type: ignore[arg-type]
            resample=int(resample) if resample is not None else _PIL_BICUBIC,
            do_resize=bool(getattr(proc, "do_resize", True)),
            rescale=255.0 * float(getattr(proc, "rescale_factor", 1 / 255)) if do_rescale else 255.0,
            mean=_triple(mean) if do_normalize and mean is not None else None,
            std=_triple(std) if do_normalize and std is not None else None,
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after resizing, exactly as transformers computes it (truncating the long edge)."""
        if not self.do_resize:
            return height, width
        if self.resize_hw is not None:
            return self.resize_hw
        assert self.shortest_edge is not None
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def torchvision_resize_crop(
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    resample: int = _PIL_BICUBIC,
) -> ImagePreprocessConfig:
    """torchvision's `Resize(size) -> CenterCrop(size) -> ToTensor -> Normalize(mean, std)` on PIL images.

    The validation transform of open_clip (HPSv2) and of CLIP-derived scorers such as ImageReward:
    the same resize as transformers' processors, but torchvision rounds the crop offset.
    """
    return ImagePreprocessConfig(
        shortest_edge=size,
        crop_hw=(size, size),
        resample=resample,
        rescale=1.0,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        crop_rounding="round",
    )


def _triple(values: float | Sequence[float]) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    return tuple(float(v) for v in values)


def _straight_through_clamp(x: Tensor) -> Tensor:
    # Forward: clamp to [0, 1] like the uint8 round trip; backward: identity.
    return x + (x.clamp(0.0, 1.0) - x).detach()


def resize(images: Tensor, size: tuple[int, int], resample: int = _PIL_BICUBIC) -> Tensor:
    """Antialiased resize of float images matching PIL's `Image.resize(size, resample)`."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images  # PIL returns a copy when the size is unchanged
    mode = _TORCH_MODE.get(resample)
    if mode is None:
        # Lanczos/box/hamming have no torch kernel; bicubic is the closest and what
        # transformers' own torchvision backend falls back to for Lanczos.
        warnings.warn(
            f"resample={resample} (PIL code) has no differentiable torch equivalent; using bicubic",
            stacklevel=2,
        )
        mode = "bicubic"
    if mode == "nearest-exact":
        return F.interpolate(images, size=size, mode=mode)
    # PIL (and torchvision on uint8) resample in two passes, horizontal then vertical, and store
    # the intermediate image as uint8, i.e. clipped to [0, 255]. A one-pass float resize skips
    # that clip and differs by up to ~3 grey levels next to dark/bright edges, so do the same
    # two passes with a (straight-through) clamp in between.
    height, width = images.shape[-2:]
    if width != size[1]:
        images = F.interpolate(images, size=(height, size[1]), mode=mode, align_corners=False, antialias=True)
        if height != size[0]:
            images = _straight_through_clamp(images)
    if height != size[0]:
        images = F.interpolate(images, size=tuple(size), mode=mode, align_corners=False, antialias=True)
    return images


def center_crop(images: Tensor, size: tuple[int, int], rounding: str = "floor") -> Tensor:
    """Centre crop with transformers' (`floor`) or torchvision's (`round`) offsets; pads with zeros
    (black) where the crop is larger."""
    height, width = images.shape[-2:]
    crop_h, crop_w = size
    if crop_h > height or crop_w > width:
        # Same split as transformers' numpy center_crop: the extra pixel goes to the bottom/right.
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = images.shape[-2:]
    if rounding == "round":
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    else:
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return images[..., top : top + crop_h, left : left + crop_w]


def preprocess_images(
    images: Tensor, config: ImagePreprocessConfig, dtype: torch.dtype | None = None
) -> Tensor:
    """`[B, 3, H, W]` images in [0, 1] -> the model's `pixel_values`, differentiably.

    Computes in fp32 (resampling in bf16 would lose more than the reward's own precision) and
    casts to `dtype` at the end.
    """
    x = images.float()
    if config.do_resize:
        size = config.output_size(*x.shape[-2:])
        if tuple(size) != tuple(x.shape[-2:]):
            x = _straight_through_clamp(resize(x, size, config.resample))
    if config.crop_hw is not None:
        x = center_crop(x, config.crop_hw, config.crop_rounding)
    if config.rescale != 1.0:
        x = x * config.rescale
    if config.mean is not None and config.std is not None:
        mean = torch.tensor(config.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(config.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x if dtype is None else x.to(dtype)
