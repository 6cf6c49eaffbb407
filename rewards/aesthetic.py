"""LAION aesthetic predictor v2 ("improved-aesthetic-predictor", sac+logos+ava1-l14-linearMSE).

score = MLP(normalise(CLIP ViT-L/14 image embedding))   (prompt-free)
The MLP is Linear(768,1024)-Dropout-Linear(1024,128)-Dropout-Linear(128,64)-Dropout-Linear(64,16)-
Linear(16,1) with no activations (as released), state-dict keys `layers.{0,2,4,6,7}.{weight,bias}`.
The head is built from the shapes in its state dict, so any linear stack with those key names loads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .clip_common import CLIPFamilyReward
from .loading import RewardLoadError, load_state_dict_file, resolve_file

AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"
# The official sac+logos+ava1-l14-linearMSE.pth weights, as mirrored for TRL's DDPO example.
AESTHETIC_HEAD = "trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth"

_LAYER_KEY = re.compile(r"(?:^|\.)(\d+)\.(weight|bias)$")


class AestheticMLP(nn.Module):
    """A stack of Linear layers at the indices the state dict names (gaps are the eval-mode dropouts)."""

    def __init__(self, state_dict: dict[str, Tensor]) -> None:
        super().__init__()
        layers: dict[int, dict[str, Tensor]] = {}
        for key, value in state_dict.items():
            match = _LAYER_KEY.search(key)
            if match is None:
                raise RewardLoadError(
                    f"unexpected key {key!r} in aesthetic head (expected layers.N.weight/bias)"
                )
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
        if not layers or any("weight" not in p or p["weight"].ndim != 2 for p in layers.values()):
            raise RewardLoadError("aesthetic head must be Linear layers: layers.N.weight [out, in] (+ bias)")
        modules: list[nn.Module] = []
        for index in range(max(layers) + 1):
            if index in layers:
                out_f, in_f = layers[index]["weight"].shape
                linear = nn.Linear(in_f, out_f, bias="bias" in layers[index])
                linear.load_state_dict(layers[index])
                modules.append(linear)
            else:
                modules.append(nn.Identity())  # dropout in the original; identity in eval mode
        self.layers = nn.Sequential(*modules)
        self.in_features = int(layers[min(layers)]["weight"].shape[1])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


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
        self.head = AestheticMLP(load_state_dict_file(resolve_file(head, "aesthetic head")))
        embed_dim = int(self.model.config.projection_dim)
        if self.head.in_features != embed_dim:
            raise RewardLoadError(
                f"aesthetic head expects {self.head.in_features}-d embeddings but {model!r} gives {embed_dim}-d"
            )
        # The head is tiny: keep it fp32 whatever the CLIP dtype (its output is the reward).
        self.head.to(self.device).requires_grad_(False).eval()

    def score(self, image_embeds: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.head(image_embeds)[:, 0]
