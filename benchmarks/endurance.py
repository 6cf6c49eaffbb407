"""Endurance: the real trainer for many steps on the toy, recording that memory and step time stay flat.

    OMP_NUM_THREADS=1 python -m benchmarks.endurance               # 500 steps, ~10-20 minutes on 2 cores
    python -m benchmarks.endurance --steps 50 --output_dir /tmp/e  # a quick look

Runs `train_draftplus.main` in this process (the pretrained toy, a colour reward, tensorboard logging,
checkpoints every 50 steps with rotation: every path a long run takes each step) and records, at the
start of every training step, the process's resident memory (RSS) and the time since the previous
step. A leak (tensors kept across steps, a growing tracker buffer, file handles) shows as RSS rising
from the first steps to the last; a slowdown (growing graphs, fragmentation) as step time rising.
Compared: medians of the first and the last `--window` steps. Writes
benchmarks/results/endurance_toy_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Thresholds of "flat": RSS of the last window within 5% (and 64 MiB) of the first window's, and the
# median step time within 25% (timings on a shared machine are noisy; a real leak or slowdown over
# 500 steps is far larger).
RSS_TOLERANCE = 0.05
RSS_SLACK_BYTES = 64 * 2**20
TIME_TOLERANCE = 1.25


def rss_bytes() -> int:
    """Resident set size of this process, now (not the peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss


def analyse(step_seconds: Sequence[float], rss: Sequence[int], window: int = 100,
            cpu_seconds: Sequence[float] | None = None) -> dict:
    """Medians of the first and last `window` steps, their ratio / growth, and whether they stay flat.
    Also the least-squares RSS slope over the last half (bytes per step), to extrapolate a leak.

    `cpu_seconds` (the process's CPU time per step) is judged too: on a shared machine wall time also
    measures the neighbours, CPU time mostly the run itself."""
    if len(step_seconds) != len(rss) or len(rss) < 2 * window:
        raise ValueError(f"need two windows of {window} steps, got {len(rss)} (and {len(step_seconds)} timings)")
    extra = {}
    if cpu_seconds is not None:
        first_c, last_c = statistics.median(cpu_seconds[:window]), statistics.median(cpu_seconds[-window:])
        extra = {"cpu_s_first_median": first_c, "cpu_s_last_median": last_c, "cpu_time_ratio": last_c / first_c,
                 "cpu_time_flat": last_c / first_c <= TIME_TOLERANCE}
    first_t, last_t = statistics.median(step_seconds[:window]), statistics.median(step_seconds[-window:])
    first_m, last_m = statistics.median(rss[:window]), statistics.median(rss[-window:])
    half = list(range(len(rss) // 2, len(rss)))
    mean_x, mean_y = statistics.fmean(half), statistics.fmean(rss[i] for i in half)
    slope = (sum((i - mean_x) * (rss[i] - mean_y) for i in half) / sum((i - mean_x) ** 2 for i in half))
    growth = last_m - first_m
    return {
        "window": window,
        "steps": len(rss),
        "step_s_first_median": first_t,
        "step_s_last_median": last_t,
        "step_time_ratio": last_t / first_t,
        "rss_first_median_mib": first_m / 2**20,
        "rss_last_median_mib": last_m / 2**20,
        "rss_growth_mib": growth / 2**20,
        "rss_growth_fraction": growth / first_m,
        "rss_slope_kib_per_step_last_half": slope / 1024,
        "rss_flat": growth <= max(RSS_TOLERANCE * first_m, RSS_SLACK_BYTES),
        "step_time_flat": last_t / first_t <= TIME_TOLERANCE,
        **extra,
    }


def training_args(output_dir: str, steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", "toy", "--reward", "redness",
            "--prompts", str(ROOT / "assets" / "toy" / "prompts.txt"), "--resolution", "32",
            "--num_inference_steps", "4", "--guidance_scale", "5", "--kl_coeff", "0.01", "--learning_rate", "1e-3",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--checkpointing_steps", "50",
            "--checkpoints_total_limit", "2", "--report_to", "tensorboard", "--output_dir", output_dir]


def run(steps: int) -> tuple[list[float], list[float], list[int], list[str]]:
    """Train `steps` steps; per step: its duration (start to the next step's start) and RSS at its start.
    The last step is left out: its end includes the final LoRA save and the run's teardown."""
    import train_draftplus

    starts: list[float] = []
    cpu: list[float] = []
    rss: list[int] = []
    inner = train_draftplus.draftplus_step

    def timed_step(*args, **kwargs):  # called once per training step (no accumulation here)
        starts.append(time.perf_counter())
        cpu.append(time.process_time())
        rss.append(rss_bytes())
        return inner(*args, **kwargs)

    train_draftplus.draftplus_step = timed_step  # what the training loop calls
    with tempfile.TemporaryDirectory() as tmp:
        args = training_args(os.path.join(tmp, "run"), steps)
        train_draftplus.main(train_draftplus.parse_args(args))
    train_draftplus.draftplus_step = inner
    step_seconds = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    cpu_seconds = [b - a for a, b in zip(cpu[:-1], cpu[1:], strict=True)]
    return step_seconds, cpu_seconds, rss[:-1], args


def machine() -> str:
    import torch

    cpu = platform.processor() or "cpu"
    if os.path.exists("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def report(summary: dict, command: str, settings: list[str], where: str) -> str:
    s = summary
    verdict = lambda ok: "flat" if ok else "NOT flat"  # noqa: E731
    return "\n".join([
        "# Endurance: the trainer for many steps (toy, cpu)", "",
        f"Machine: {where}", "",
        f"Command: `{command}`; trainer arguments: `{' '.join(settings)}` (output in a temporary directory).", "",
        f"{s['steps'] + 1} training steps of `train_draftplus.main` in one process (tensorboard logging, a checkpoint "
        "every 50 steps with rotation to 2). Per step: resident memory at its start, and its duration (the "
        "whole step: rollout, backward, optimizer, logging, checkpoints; the last step, which ends with the "
        f"final save, is left out). Medians of the first and last "
        f"{s['window']} steps:", "",
        "| | first window | last window | change | |",
        "|---|---|---|---|---|",
        f"| resident memory (MiB) | {s['rss_first_median_mib']:.1f} | {s['rss_last_median_mib']:.1f} | "
        f"{s['rss_growth_mib']:+.1f} MiB ({100 * s['rss_growth_fraction']:+.2f}%) | {verdict(s['rss_flat'])} |",
        f"| step time (s) | {s['step_s_first_median']:.4f} | {s['step_s_last_median']:.4f} | "
        f"x{s['step_time_ratio']:.3f} | {verdict(s['step_time_flat'])} |",
        f"| CPU time per step (s) | {s['cpu_s_first_median']:.4f} | {s['cpu_s_last_median']:.4f} | "
        f"x{s['cpu_time_ratio']:.3f} | {verdict(s['cpu_time_flat'])} |", "",
        f"RSS slope over the last half: {s['rss_slope_kib_per_step_last_half']:+.2f} KiB/step. Flat means: memory "
        f"within {100 * RSS_TOLERANCE:.0f}% (or {RSS_SLACK_BYTES // 2**20} MiB) and step time within "
        f"x{TIME_TOLERANCE} of the first window. Wall time on a shared machine also measures the neighbours' load; "
        "the process's CPU time per step measures the run itself.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--window", type=int, default=100, help="Steps in each compared window.")
    parser.add_argument("--output_dir", type=str, default=str(ROOT / "benchmarks" / "results"))
    cli = parser.parse_args()
    step_seconds, cpu_seconds, rss, settings = run(cli.steps)
    summary = analyse(step_seconds, rss, window=min(cli.window, (cli.steps - 1) // 2), cpu_seconds=cpu_seconds)
    command = "OMP_NUM_THREADS=1 python -m benchmarks.endurance" + (
        f" --steps {cli.steps}" if cli.steps != 500 else "")
    where = machine()
    settings = [a.replace(str(ROOT) + os.sep, "") for a in settings[:-2]]  # without the temporary output dir
    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "endurance_toy_cpu.json").write_text(json.dumps({
        "command": command, "machine": where, "trainer_args": settings, "summary": summary,
        "step_seconds": [round(t, 5) for t in step_seconds], "cpu_seconds": [round(t, 5) for t in cpu_seconds],
        "rss_mib": [round(m / 2**20, 2) for m in rss]}, indent=1))
    text = report(summary, command, settings, where)
    (out / "endurance_toy_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
