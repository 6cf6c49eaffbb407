"""CLIP score (Hessel et al. 2021, as in torchmetrics' CLIPScore without the clamp at 0).

score = 100 * cos(image_embed, text_embed) with OpenAI CLIP ViT-L/14.
Not clamped at 0: a clamp would zero the gradient for badly matching images, where it is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .clip_common import CLIPFamilyReward

CLIP_MODEL = "openai/clip-vit-large-patch14"


class ClipScoreReward(CLIPFamilyReward):
    """100 * cosine similarity; `model` may be any CLIPModel checkpoint or local directory."""

    name = "clip"
    description = "CLIP score: 100 * cos(img, txt) with OpenAI CLIP ViT-L/14 (no clamp at 0)"
    score_range = "~15-35 for matching pairs"
    what = "CLIP"

    def __init__(
        self,
        model: str = CLIP_MODEL,
        processor: str | None = None,
        tokenizer: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        gradient_checkpointing: bool = False,
        cache_size: int = 1024,
        scale: float = 100.0,
    ) -> None:
        super().__init__(model, processor, tokenizer, dtype, device, gradient_checkpointing, cache_size)
        self.scale = float(scale)

    def score(self, image_embeds: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.scale * (image_embeds * self.text_embeds(prompts)).sum(-1)
