"""Training curves at the end of a run: `training_curves.png` from `metrics.jsonl` and `validation.jsonl`."""

from __future__ import annotations

import json
import os
from pathlib import Path

CURVES_NAME = "training_curves.png"


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """metrics.jsonl's entries, one per step (a resumed run's repeated steps replace earlier ones)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            by_step[entry["step"]] = entry
    return [by_step[s] for s in sorted(by_step)]


def smoothing_window(num_steps: int) -> int:
    """The running mean's window: ~5% of the steps, but at least 5 (a 40-step run's reward is noise at 2) and
    at most a quarter of them."""
    return max(1, min(num_steps // 4, max(5, num_steps // 20)))


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training_curves(output_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path | None:
    """Reward, KL penalty and validation reward against step, in three panels; None if nothing was logged.

    The training reward is noisy (a new batch of prompts every step): a running mean (`smoothing_window`)
    is drawn over the raw values, and the reward axis spans those values, not the band of the images'
    spread around them, which would flatten the rise. Validation rewards come from fixed prompts and seeds; the
    base model's is the dashed line."""
    from utils.run.validation import read_validation_log

    metrics = read_metrics(output_dir)
    if not metrics:
        return None
    validation = read_validation_log(output_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    window = smoothing_window(len(steps))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=110)
    for ax, key, title in ((axes[0], "reward", "training reward"), (axes[1], "kl_penalty", "KL penalty")):
        values = [m.get(key) for m in metrics]
        if any(v is None for v in values):
            continue
        ax.plot(steps, values, alpha=0.35 if window > 1 else 1.0, color="C0", label="per step")
        if window > 1:
            ax.plot(steps, running_mean(values, window), color="C0", label=f"running mean ({window} steps)")
        if key == "reward" and all("reward_std" in m for m in metrics):
            std = running_mean([m["reward_std"] for m in metrics], window)
            mean = running_mean(values, window)
            ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color="C0", alpha=0.1, label="± reward std")
            low, high = min(values), max(values)
            ax.set_ylim(low - 0.05 * (high - low or 1), high + 0.05 * (high - low or 1))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax = axes[2]
    lora = [e for e in validation if e["phase"] == "lora"]
    base = [e for e in validation if e["phase"] == "base"]
    if lora:
        ax.plot([e["step"] for e in lora], [e["reward"] for e in lora], "o-", color="C1", label="LoRA")
    if base:
        ax.axhline(base[-1]["reward"], color="gray", linestyle="--", label="base model")
    if not (lora or base):
        ax.text(0.5, 0.5, "no validation\n(--validation_prompts)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(axes[0].get_xlim())
    ax.set_title("validation reward (fixed prompts and seeds)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if lora or base:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path) if path is not None else Path(output_dir) / CURVES_NAME
    fig.savefig(path)
    plt.close(fig)
    return path
