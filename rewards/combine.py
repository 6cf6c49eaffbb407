"""Weighted sums of rewards: `pickscore=1.0,aesthetic=0.05` -> one Reward."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import Reward, check_inputs, check_scores


class WeightedSumReward(Reward):
    """sum_i w_i * r_i(images, prompts): each part runs once per batch.

    The unweighted per-part scores of the last call are kept (detached) in `last_components`
    so the trainer can log them without scoring twice.
    """

    def __init__(self, parts: Sequence[tuple[str, float, Reward]]) -> None:
        super().__init__()
        if not parts:
            raise ValueError("WeightedSumReward needs at least one part")
        self.labels = [label for label, _, _ in parts]
        self.weights = [float(w) for _, w, _ in parts]
        self.rewards = nn.ModuleList([r for _, _, r in parts])
        self.name = ",".join(f"{label}={w:g}" for label, w in zip(self.labels, self.weights, strict=True))
        self.last_components: dict[str, Tensor] = {}

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_inputs(images, prompts)
        total: Tensor | None = None
        components: dict[str, Tensor] = {}
        for label, weight, reward in zip(self.labels, self.weights, self.rewards, strict=True):
            score = check_scores(reward(images, prompts), images.shape[0], f"reward {label!r}")
            components[label] = score.detach()
            total = weight * score if total is None else total + weight * score
        self.last_components = components
        assert total is not None
        return total
