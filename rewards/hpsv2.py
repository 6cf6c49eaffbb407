"""HPSv2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on Human Preference Dataset v2.

score = cos(image_embed, text_embed), as the official `hpsv2.score`
(`image_features @ text_features.T` of L2-normalised open_clip features, diagonal).

Needs the optional extra `open_clip_torch` (`pip install -r requirements-optional.txt`).
The checkpoint (`xswu/HPSv2:HPS_v2.1_compressed.pt`) is loaded with `torch.load(weights_only=True)`.
Preprocessing follows open_clip's validation transform (torchvision `Resize(size, bicubic)` on PIL,
`CenterCrop`, `Normalize`), read from `model.visual.preprocess_cfg`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import check_inputs
from .errors import RewardLoadError
from .files import resolve_file
from .loading import checkpoint_layers, load_state_dict_file, resolve_dtype
from .preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PIL_RESAMPLE,
    ImagePreprocessConfig,
    preprocess_images,
    torchvision_resize_crop,
)
from .text_cache import TextCachedReward

HPS_CHECKPOINT = "xswu/HPSv2:HPS_v2.1_compressed.pt"
HPS_ARCH = "ViT-H-14"
OPEN_CLIP_HINT = "pip install open_clip_torch==3.3.0 (or: pip install -r requirements-optional.txt)"


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise RewardLoadError(
            f"the hpsv2 reward needs the optional package open_clip: {OPEN_CLIP_HINT}"
        ) from exc
    return open_clip


def open_clip_preprocess_config(preprocess_cfg: dict[str, Any]) -> ImagePreprocessConfig:
    """The differentiable equivalent of open_clip's validation `image_transform`."""
    size = preprocess_cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = preprocess_cfg.get("resize_mode", "shortest") or "shortest"
    resample = PIL_RESAMPLE.get(str(preprocess_cfg.get("interpolation", "bicubic")), PIL_RESAMPLE["bicubic"])
    config = torchvision_resize_crop(
        height,
        mean=preprocess_cfg.get("mean", OPENAI_CLIP_MEAN),
        std=preprocess_cfg.get("std", OPENAI_CLIP_STD),
        resample=resample,
    )
    if mode == "squash":
        return dataclasses.replace(config, shortest_edge=None, resize_hw=(height, width), crop_hw=None)
    if mode != "shortest" or height != width:
        raise RewardLoadError(f"open_clip resize_mode={mode!r} with size {size} is not supported by hpsv2")
    return config


class HPSv2Reward(TextCachedReward):
    """HPSv2.1 preference score.

    Args:
        model: the HPS checkpoint: a local `.pt`/`.safetensors` file or `owner/repo:filename`.
        arch: open_clip architecture name, or a path to an open_clip model-config JSON
            (registered under its file stem; used by the offline tests with a tiny config).
        dtype, device, gradient_checkpointing, cache_size: as for the CLIP rewards.
    """

    name = "hpsv2"
    description = "HPSv2.1 (open_clip ViT-H-14 + HPS checkpoint): cos(img, txt) [extra: open_clip_torch]"
    score_range = "~0.2-0.35"
    file_options = ("model",)

    @classmethod
    def availability(cls) -> str | None:
        """Why this reward cannot be built here, without importing anything heavy; None if it can."""
        if importlib.util.find_spec("open_clip") is None:
            return f"the hpsv2 reward needs the optional package open_clip: {OPEN_CLIP_HINT}"
        return None

    def __init__(
        self,
        model: str = HPS_CHECKPOINT,
        arch: str = HPS_ARCH,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        gradient_checkpointing: bool = False,
        cache_size: int = 1024,
    ) -> None:
        super().__init__(cache_size)
        open_clip = _import_open_clip()
        self.compute_dtype = resolve_dtype(dtype)
        name = str(arch)
        if name.endswith(".json"):
            path = Path(name).expanduser()
            if not path.is_file():
                raise RewardLoadError(f"open_clip model config not found: {name!r}")
            open_clip.add_model_config(path)
            name = path.stem
        try:
            # pretrained=None: the architecture only; the weights come from the HPS checkpoint.
            self.model = open_clip.create_model(name, pretrained=None, precision="fp32", device="cpu")
            self.tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:
            raise RewardLoadError(f"open_clip cannot build {name!r}: {type(exc).__name__}: {exc}") from exc
        state = load_state_dict_file(resolve_file(model, "HPS checkpoint"))
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            self.model.load_state_dict(state)
        except RuntimeError as exc:
            raise RewardLoadError(
                f"HPS checkpoint {model!r} does not fit open_clip {name!r}: {str(exc).splitlines()[0]}"
            ) from exc
        self.model.to(dtype=self.compute_dtype)
        self.freeze()
        if device is not None:
            self.model.to(device)
        if gradient_checkpointing:
            checkpoint_layers(self.model.visual.transformer.resblocks)
        self.preprocess_config = open_clip_preprocess_config(dict(self.model.visual.preprocess_cfg))

    def _encode_text(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        with torch.no_grad():
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_inputs(images, prompts)
        pixels = preprocess_images(images.to(self.device), self.preprocess_config, dtype=self.compute_dtype)
        image = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text = self.text_features(prompts)
        return (image * text).sum(-1)
