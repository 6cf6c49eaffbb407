"""The linear MLP head shared by the LAION aesthetic predictor v2 and ImageReward.

Both release the same stack, with state-dict keys `layers.{0,2,4,6,7}.{weight,bias}`:

    Linear(768,1024)-Dropout(0.2)-Linear(1024,128)-Dropout(0.2)-Linear(128,64)-Dropout(0.1)-Linear(64,16)-Linear(16,1)

and no activations (the aesthetic predictor has none; ImageReward comments its ReLUs out). The
dropouts keep their index in `layers` so the released keys load as they are; a reward stays in eval
mode, where they are the identity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

from .errors import RewardLoadError

#: Output size of the Linear layer at each index of `layers`, as released.
LINEAR_SIZES: dict[int, int] = {0: 1024, 2: 128, 4: 64, 6: 16, 7: 1}
#: The released dropouts at the other indices (identity in eval mode).
DROPOUTS: dict[int, float] = {1: 0.2, 3: 0.2, 5: 0.1}

_LAYER_KEY = re.compile(r"(?:^|\.)(\d+)\.(weight|bias)$")


class LinearHead(nn.Module):
    """Linear layers at the indices of `sizes` (index -> output size), dropouts at the others."""

    def __init__(self, in_features: int = 768, sizes: Mapping[int, int] = LINEAR_SIZES, bias: bool = True) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        width = in_features
        for index in range(max(sizes) + 1):
            if index in sizes:
                modules.append(nn.Linear(width, sizes[index], bias=bias))
                width = sizes[index]
            else:
                modules.append(nn.Dropout(DROPOUTS.get(index, 0.0)))
        self.layers = nn.Sequential(*modules)
        self.in_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], what: str) -> LinearHead:
        """The head shaped after `state_dict` (keys `...N.weight` / `...N.bias`), holding its weights.

        Any chain of Linear layers with such keys loads, not only the released sizes; anything else
        is a RewardLoadError naming `what`.
        """
        layers: dict[int, dict[str, Tensor]] = {}
        for key, value in state_dict.items():
            match = _LAYER_KEY.search(key)
            if match is None:
                raise RewardLoadError(f"unexpected key {key!r} in {what} (expected layers.N.weight/bias)")
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
        if not layers or any("weight" not in p or p["weight"].ndim != 2 for p in layers.values()):
            raise RewardLoadError(f"{what} must be Linear layers: layers.N.weight [out, in] (+ bias)")
        first = min(layers)
        head = cls(
            in_features=int(layers[first]["weight"].shape[1]),
            sizes={index: int(p["weight"].shape[0]) for index, p in layers.items()},
            bias=all("bias" in p for p in layers.values()),
        )
        try:
            head.layers.load_state_dict({f"{i}.{name}": t for i, p in layers.items() for name, t in p.items()})
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            raise RewardLoadError(f"{what} is not a chain of Linear layers: {detail[:300]}") from exc
        return head
