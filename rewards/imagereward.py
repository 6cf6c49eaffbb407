"""ImageReward (Xu et al. 2023): not available with the pinned stack.

The only distribution, `image-reward` 1.5 (PyPI), cannot be imported with transformers 5.x and
conflicts with the project's other extras:

* its BLIP text encoder imports `apply_chunking_to_forward`, `find_pruneable_heads_and_indices`
  and `prune_linear_layer` from `transformers.modeling_utils` -- gone in transformers 5;
* it pins `timm==0.6.13` (and uses `timm.models.hub.download_cached_file`), while
  open_clip_torch 3.x (needed by `hpsv2`) requires `timm>=1.0.17`;
* it imports OpenAI's `clip` package, which is not on PyPI;
* it loads `ImageReward.pt` with plain `torch.load` (arbitrary unpickling).

The name stays registered so that `--reward imagereward` fails at validation time, before any
model is loaded, with this reason instead of "unknown reward". A port onto transformers'
BLIP classes (BlipVisionModel + BlipTextModel with cross-attention, MLP head, normalised with
mean 0.16717 / std 1.03334) would lift this; see "Why no ImageReward" in README.md.
"""

from __future__ import annotations

from typing import Any

from .base import Reward
from .loading import RewardLoadError

UNAVAILABLE = (
    "the imagereward reward is not available with the pinned stack: image-reward 1.5 needs transformers<5 "
    "internals (apply_chunking_to_forward, find_pruneable_heads_and_indices), timm==0.6.13 and OpenAI's clip "
    "package; use pickscore, hpsv2, clip or aesthetic (see 'Why no ImageReward' in README.md)"
)


class ImageRewardReward(Reward):
    """Placeholder that explains why ImageReward cannot be built (see module docstring)."""

    name = "imagereward"
    description = "ImageReward v1.0 (BLIP + MLP), normalised score; not supported with transformers 5 (see README)"
    score_range = "~-2 to 2"

    @classmethod
    def availability(cls) -> str | None:
        return UNAVAILABLE

    def __init__(self, model: str = "THUDM/ImageReward:ImageReward.pt", **_: Any) -> None:
        super().__init__()
        raise RewardLoadError(UNAVAILABLE)
