"""PickScore (Kirstain et al. 2023): CLIP-H/14 fine-tuned on Pick-a-Pic human preferences.

score = logit_scale.exp() * cos(image_embed, text_embed)   (logit_scale.exp() is ~100)
exactly the logits of the official snippet (`model.logit_scale.exp() * text_embs @ image_embs.T`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .clip_common import CLIPFamilyReward

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreReward(CLIPFamilyReward):
    """PickScore_v1; `model`/`processor`/`tokenizer` may be local directories (see CLIPFamilyReward)."""

    name = "pickscore"
    description = "PickScore_v1 (CLIP-H/14 fine-tuned on Pick-a-Pic): logit_scale.exp() * cos(img, txt)"
    score_range = "~18-24"
    what = "PickScore"
    default_processor = PICKSCORE_PROCESSOR
    # yuvalkirstain/PickScore_v1's config.json: OpenCLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's).
    architecture_config = {
        "projection_dim": 1024,
        "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                        "num_attention_heads": 16, "max_position_embeddings": 77, "vocab_size": 49408,
                        "hidden_act": "gelu"},
        "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                          "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "hidden_act": "gelu"},
    }

    def __init__(
        self,
        model: str = PICKSCORE_MODEL,
        processor: str | None = PICKSCORE_PROCESSOR,
        tokenizer: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        gradient_checkpointing: bool = False,
        cache_size: int = 1024,
    ) -> None:
        super().__init__(model, processor, tokenizer, dtype, device, gradient_checkpointing, cache_size)

    def score(self, image_embeds: Tensor, prompts: Sequence[str]) -> Tensor:
        text = self.text_embeds(prompts)
        return self.model.logit_scale.detach().float().exp() * (image_embeds * text).sum(-1)
