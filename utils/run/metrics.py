"""Per-step training metrics beyond loss, reward and penalty: the reward's spread, the parts of a
weighted-sum reward, throughput and peak GPU memory. Collected over micro-steps and processes."""

from __future__ import annotations

import time

import torch


class StepMetrics:
    """`start()` as a step begins, `add()` after every micro-step, `collect()` once per optimiser step (on
    every process: it gathers).

    reward_std: standard deviation of the per-image rewards of the step (all micro-steps, all processes).
    reward/<part>: mean unweighted score of each part of a weighted-sum reward (`last_components`).
    images_per_s: images graded in the step, all processes, over its wall time.
    peak_memory_gib: CUDA only, the most memory allocated on this process since the run started.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._rewards: list[torch.Tensor] = []
        self._components: dict[str, list[torch.Tensor]] = {}
        self._start = time.perf_counter()

    def start(self) -> None:
        self._start = time.perf_counter()

    def add(self, rewards: torch.Tensor, reward_fn=None) -> None:
        self._rewards.append(rewards.detach().float().flatten())
        for name, scores in (getattr(reward_fn, "last_components", None) or {}).items():
            self._components.setdefault(name, []).append(scores.detach().float().flatten())

    def collect(self, accelerator) -> dict[str, float]:
        rewards = accelerator.gather(torch.cat(self._rewards).to(self.device))
        logs = {"reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0}
        for name, parts in sorted(self._components.items()):
            logs[f"reward/{name}"] = float(accelerator.gather(torch.cat(parts).to(self.device)).mean())
        elapsed = time.perf_counter() - self._start
        logs["images_per_s"] = rewards.numel() / elapsed if elapsed > 0 else 0.0
        if self.device.type == "cuda":
            logs["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._rewards, self._components = [], {}
        return logs
