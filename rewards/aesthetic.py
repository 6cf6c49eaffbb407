"""LAION aesthetic predictor v2 ("improved-aesthetic-predictor", sac+logos+ava1-l14-linearMSE).

score = MLP(normalise(CLIP ViT-L/14 image embedding))   (prompt-free)
The MLP is `rewards.mlp_head.LinearHead`, built from the shapes in its state dict, so any linear
stack with the released key names (`layers.N.weight/bias`) loads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .clip_common import CLIPFamilyReward
from .errors import RewardLoadError
from .files import resolve_file
from .loading import load_state_dict_file
from .mlp_head import LinearHead

AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"
# The official sac+logos+ava1-l14-linearMSE.pth weights, as mirrored for TRL's DDPO example.
AESTHETIC_HEAD = "trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth"


class AestheticReward(CLIPFamilyReward):
    """LAION aesthetic v2. `head` is a `.pth` (loaded with weights_only=True) or `.safetensors` file,
    local or `owner/repo:filename` on the hub."""

    name = "aesthetic"
    description = (
        "LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE): MLP on the normalised CLIP ViT-L/14 "
        "image embedding, prompt-free; weight ~0.05 in sums"
    )
    score_range = "~1-10"
    needs_text = False
    what = "aesthetic CLIP"
    file_options = ("model", "head")

    def __init__(
        self,
        model: str = AESTHETIC_CLIP_MODEL,
        processor: str | None = None,
        head: str = AESTHETIC_HEAD,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(model, processor, None, dtype, device, gradient_checkpointing, cache_size=0)
        self.head = LinearHead.from_state_dict(
            load_state_dict_file(resolve_file(head, "aesthetic head")), "aesthetic head"
        )
        embed_dim = int(self.model.config.projection_dim)
        if self.head.in_features != embed_dim:
            raise RewardLoadError(
                f"aesthetic head expects {self.head.in_features}-d embeddings but {model!r} gives {embed_dim}-d"
            )
        # The head is tiny: keep it fp32 whatever the CLIP dtype (its output is the reward).
        self.head.to(self.device)
        self.freeze()

    def score(self, image_embeds: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.head(image_embeds)[:, 0]
