"""The memory table: the estimated peak GPU memory of one training step for every recipe (`--estimate_memory`).

    python -m benchmarks.memory_table                      # every recipe -> benchmarks/results/memory_table.{json,md}
    python -m benchmarks.memory_table --only SDXL "FLUX.1-dev nf4"   # some rows; the others are kept

The setting of the README's memory goals: 1024 px (512 for SD1.5), bf16, batch 1, K=1, LoRA rank 4 on the
`attention` preset, gradient checkpointing, the PickScore reward (fp32, the trainer's default), the family's rollout
defaults, AdamW. Each model's configs (no weights) are committed under benchmarks/model_configs/<dir>/
(benchmarks/model_configs/README.md says where they come from). Adding a recipe is one entry in RECIPES; a recipe
whose configs or family are not here yet gets a row saying so, and its figure once they land.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "benchmarks" / "model_configs"
SETTING = ["--mixed_precision", "bf16", "--train_batch_size", "1", "--truncation_steps", "1",
           "--gradient_checkpointing", "--reward", "pickscore", "--report_to", "none"]


@dataclass(frozen=True)
class Recipe:
    name: str
    configs: str  # directory under benchmarks/model_configs
    goal_gb: int | None = None  # the README's goal, per GPU
    resolution: int = 1024
    extra: tuple[str, ...] = ()


RECIPES = (
    Recipe("SD1.5", "sd15", resolution=512),
    Recipe("SDXL", "sdxl", 24),
    Recipe("SD3.5-Medium", "sd35-medium", 24),
    Recipe("SD3.5-Medium, text encoders offloaded", "sd35-medium", 24, extra=("--offload_text_encoders",)),
    Recipe("SD3.5-Large", "sd35-large"),
    Recipe("FLUX.1-dev bf16", "flux1-dev", 80),
    Recipe("FLUX.1-dev nf4", "flux1-dev", 24, extra=("--quantize_base", "nf4")),
    Recipe("FLUX.1-dev nf4, text encoders offloaded, reward bf16", "flux1-dev", 24,
           extra=("--quantize_base", "nf4", "--offload_text_encoders", "--reward_dtype", "bf16")),
    Recipe("FLUX.1-schnell", "flux1-schnell"),
    Recipe("FLUX.2-klein 4B", "flux2-klein-4b", 24),
    Recipe("FLUX.2-klein 9B", "flux2-klein-9b"),
    Recipe("FLUX.2-dev nf4", "flux2-dev", 48, extra=("--quantize_base", "nf4")),
    Recipe("Qwen-Image bf16", "qwen-image", 80),
    Recipe("Qwen-Image nf4", "qwen-image", 24, extra=("--quantize_base", "nf4")),
    Recipe("Z-Image-Turbo", "z-image-turbo", 24),
)


def command(recipe: Recipe, *more: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(CONFIGS / recipe.configs), "--resolution", str(recipe.resolution),
            "--estimate_memory", *SETTING, *recipe.extra, *more]


def estimate_row(argv: list[str]) -> dict:
    """The estimate of `train_draftplus.py <argv>` as a table row (bytes by part, the notes), or why there is none."""
    import train_draftplus
    from utils.memory import estimate_memory

    start = time.perf_counter()
    try:
        args = train_draftplus.parse_args(argv)
    except SystemExit:  # a family not registered yet, configs not committed yet: one line on stderr
        return {"status": "pending: the trainer does not take this model yet (its configs or family are missing)"}
    estimate = estimate_memory(args, args.checked)
    return {"status": "estimated", "peak_bytes": estimate.total, "peak_phase": estimate.peak.phase,
            "held_bytes": estimate.held(), "phase_peak_bytes": estimate.phase_peaks,
            "computed": [vars(part) for part in estimate.computed], "notes": estimate.notes,
            "settings": estimate.settings, "seconds": round(time.perf_counter() - start, 1)}


def render(rows: dict[str, dict]) -> str:
    from utils.memory.report import CEILINGS_GB

    lines = ["# Estimated peak GPU memory of one training step, per GPU", "",
             "From `python -m benchmarks.memory_table` (`train_draftplus.py --estimate_memory`, a CPU trace under fake "
             "tensors from the committed configs; docs/memory.md). Estimated, not measured: "
             "benchmarks/results/memory_calibration.md compares the estimator with the GPU measurements there are.",
             "", "Setting: 1024 px (512 for SD1.5), bf16 weights, batch 1, K=1, LoRA rank 4 (attention), gradient "
             "checkpointing, PickScore (fp32), AdamW, the family's rollout defaults. GB = 1e9 bytes; the CUDA "
             "context (~0.5 GB) and allocator fragmentation come on top. 'Without text encoders': the peak less the "
             "text encoders' weights, which a run that keeps them off the GPU between prompt encodings (or encodes "
             "its prompts once, ahead) would not hold at the peak (it comes after the encoding): "
             "`--offload_text_encoders`.", "",
             "| recipe | peak (GB) | goal (GB) | " + " | ".join(f"fits {gb} GB" for gb in CEILINGS_GB)
             + " | weights (GB) | text encoders (GB) | without text encoders (GB) | peak during "
             "| computed, not traced |",
             "|---|---|---|" + "---|" * len(CEILINGS_GB) + "---|---|---|---|---|"]
    for recipe in RECIPES:
        row = rows.get(recipe.name)
        goal = str(recipe.goal_gb or "")
        if row is None or row["status"] != "estimated":
            lines.append(f"| {recipe.name} | {row['status'] if row else 'not run'} | {goal} |"
                         + " |" * len(CEILINGS_GB) + " | | | | |")
            continue
        peak = row["peak_bytes"]
        weights = sum(v for k, v in row["held_bytes"].items() if k.startswith("weights: "))
        encoders = sum(v for k, v in row["held_bytes"].items() if k.startswith("weights: text_encoder"))
        computed = "; ".join(part["label"] for part in row["computed"]) or "-"
        lines.append(f"| {recipe.name} | {peak / 1e9:.1f} | {goal} | "
                     + " | ".join("yes" if peak <= gb * 1e9 else "no" for gb in CEILINGS_GB)
                     + f" | {weights / 1e9:.1f} | {encoders / 1e9:.1f} | {(peak - encoders) / 1e9:.1f} | "
                     f"{row['peak_phase']} | {computed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", default=None, help="Recipes to (re)estimate; the others' rows are kept.")
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--merge", nargs="*", default=[], help="Other runs' memory_table.json whose rows to take in.")
    p.add_argument("--render", action="store_true", help="Only rewrite memory_table.md from the JSON.")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memory_table.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else {}
    for other in args.merge:
        rows.update(json.loads(Path(other).read_text())["rows"])
    path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    (out / "memory_table.md").write_text(render(rows))
    for recipe in RECIPES:
        if args.render or args.only and recipe.name not in args.only:
            continue
        print(f"{recipe.name} ...", flush=True)
        rows[recipe.name] = {"command": "train_draftplus.py " + " ".join(command(recipe)),
                             **estimate_row(command(recipe))}
        print(f"  {rows[recipe.name]['status']} {rows[recipe.name].get('peak_bytes', 0) / 1e9:.2f} GB", flush=True)
        path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        (out / "memory_table.md").write_text(render(rows))


if __name__ == "__main__":
    main()
