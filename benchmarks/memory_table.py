"""The memory table: the estimated peak GPU memory of one training step for every recipe (`--estimate_memory`).

    python -m benchmarks.memory_table                      # every recipe -> benchmarks/results/memory_table.{json,md}
    python -m benchmarks.memory_table --only SDXL "FLUX.1-dev nf4"   # some rows; the others are kept
    python -m benchmarks.memory_table --sharded 2 4 8      # FSDP2 per-process -> benchmarks/results/memory_sharded.*

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
    # HPSv3 (Qwen2-VL-7B) instead of PickScore, the later --reward winning: what the largest reward costs
    Recipe("SDXL, reward HPSv3 bf16", "sdxl", 24, extra=("--reward", "hpsv3", "--reward_dtype", "bf16")),
    Recipe("SD3.5-Medium", "sd35-medium", 24),
    Recipe("SD3.5-Medium, text encoders offloaded", "sd35-medium", 24, extra=("--offload_text_encoders",)),
    Recipe("SD3.5-Large", "sd35-large"),
    Recipe("FLUX.1-dev bf16", "flux1-dev", 80),
    Recipe("FLUX.1-dev nf4", "flux1-dev", 24, extra=("--quantize_base", "nf4")),
    Recipe("FLUX.1-dev nf4, text encoders offloaded, reward bf16", "flux1-dev", 24,
           extra=("--quantize_base", "nf4", "--offload_text_encoders", "--reward_dtype", "bf16")),
    Recipe("FLUX.1-schnell", "flux1-schnell"),
    Recipe("FLUX.2-klein 4B", "flux2-klein-4b", 24),
    Recipe("FLUX.2-klein 4B, text encoders offloaded, reward bf16", "flux2-klein-4b", 24,
           extra=("--offload_text_encoders", "--reward_dtype", "bf16")),
    Recipe("FLUX.2-klein 9B", "flux2-klein-9b"),
    Recipe("FLUX.2-dev nf4", "flux2-dev", 48, extra=("--quantize_base", "nf4")),
    Recipe("FLUX.2-dev nf4, text encoders offloaded", "flux2-dev", 48,
           extra=("--quantize_base", "nf4", "--offload_text_encoders")),
    # The prompts encoded once, before the run (on the CPU: Mistral's 48 GB never on the GPU; on the GPU: alone)
    Recipe("FLUX.2-dev nf4, prompts encoded ahead on the CPU", "flux2-dev", 48,
           extra=("--quantize_base", "nf4", "--precompute_prompt_embeddings", "cpu")),
    Recipe("FLUX.2-dev nf4, prompts encoded ahead on the GPU", "flux2-dev", 48,
           extra=("--quantize_base", "nf4", "--precompute_prompt_embeddings")),
    Recipe("Qwen-Image bf16", "qwen-image", 80),
    Recipe("Qwen-Image bf16, text encoders offloaded", "qwen-image", 80, extra=("--offload_text_encoders",)),
    Recipe("Qwen-Image nf4", "qwen-image", 24, extra=("--quantize_base", "nf4")),
    Recipe("Qwen-Image nf4, text encoders offloaded, reward bf16", "qwen-image", 24,
           extra=("--quantize_base", "nf4", "--offload_text_encoders", "--reward_dtype", "bf16")),
    Recipe("Qwen-Image bf16, text encoders offloaded, VAE per block", "qwen-image", 80,
           extra=("--offload_text_encoders", "--vae_block_checkpointing")),
    Recipe("Qwen-Image nf4, text encoders offloaded, reward bf16, VAE per block", "qwen-image", 24,
           extra=("--quantize_base", "nf4", "--offload_text_encoders", "--reward_dtype", "bf16",
                  "--vae_block_checkpointing")),
    # an nf4 denoiser is on the GPU from its loading (bitsandbytes): the text encoder beside it only on the GPU
    Recipe("Qwen-Image nf4, prompts encoded ahead on the CPU, reward bf16, VAE per block", "qwen-image", 24,
           extra=("--quantize_base", "nf4", "--precompute_prompt_embeddings", "cpu", "--reward_dtype", "bf16",
                  "--vae_block_checkpointing")),
    Recipe("Qwen-Image nf4, prompts encoded ahead on the GPU, reward bf16, VAE per block", "qwen-image", 24,
           extra=("--quantize_base", "nf4", "--precompute_prompt_embeddings", "--reward_dtype", "bf16",
                  "--vae_block_checkpointing")),
    # Turbo's recipe: 9 steps without guidance (docs/recipes/z_image.md); its config cannot tell it from the base
    Recipe("Z-Image-Turbo", "z-image-turbo", 24, extra=("--num_inference_steps", "9", "--guidance_scale", "0")),
    Recipe("Z-Image-Turbo, text encoders offloaded, reward bf16", "z-image-turbo", 24,
           extra=("--num_inference_steps", "9", "--guidance_scale", "0", "--offload_text_encoders", "--reward_dtype",
                  "bf16")),
    Recipe("Z-Image-Turbo, text encoders offloaded, reward bf16, VAE per block", "z-image-turbo", 24,
           extra=("--num_inference_steps", "9", "--guidance_scale", "0", "--offload_text_encoders", "--reward_dtype",
                  "bf16", "--vae_block_checkpointing")),
)

# `--sharded`: the bf16 recipes `--shard` (FSDP2) is for, per process on N GPUs (docs/scaling.md, "Memory per process").
SHARDED_RECIPES = (Recipe("FLUX.2-dev bf16", "flux2-dev", 80), Recipe("Qwen-Image bf16", "qwen-image", 80))


def command(recipe: Recipe, *more: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(CONFIGS / recipe.configs), "--resolution", str(recipe.resolution),
            "--estimate_memory", *SETTING, *recipe.extra, *more]


def shown(argv: list[str]) -> str:
    """A recipe's command line as the results record it: run from the repository's root (no path of this machine)."""
    return "train_draftplus.py " + " ".join(argv).replace(f"{ROOT}/", "")


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
    return {"status": "estimated", "peak_bytes": estimate.total, "peak_phase": estimate.peak_phase,
            "held_bytes": estimate.held(), "phase_peak_bytes": estimate.phase_peaks,
            "computed": [vars(part) for part in estimate.computed], "notes": estimate.notes,
            "settings": {**estimate.settings, "model": str(estimate.settings["model"]).replace(f"{ROOT}/", "")},
            "seconds": round(time.perf_counter() - start, 1)}


def _largest_unit_bytes(model, class_names) -> int:
    """The bytes of the largest module of `model` whose class is one of `class_names` (an FSDP2 shard unit)."""
    return max((sum(p.numel() * p.element_size() for p in m.parameters()) for m in model.modules()
                if type(m).__name__ in set(class_names)), default=0)


def sharded_estimate(recipe: Recipe, processes: list[int]) -> dict:
    """The estimated memory per process of `recipe` under `--shard` (utils/run/sharding.py) on N processes, from the
    one-GPU estimate's parts, not a trace of a sharded run (the estimator knows no sharding):

        per process = peak - S + S / N + 2 x the largest shard unit
        S = the denoiser's weights + the largest text encoder's weights (the parts --shard splits)

    Everything else (the other text encoders, the VAE, the reward model, the LoRA and its AdamW state, the
    activations: each process runs its own batch) stays as the one-GPU estimate has it. The largest shard unit
    (a transformer block, or a text-encoder layer) is counted twice: the one computing and the next one gathered."""
    import torch

    import train_draftplus
    from utils.families.model_files import read_component_config
    from utils.memory.build import _build_model
    from utils.memory.fake import WeightlessMode

    row = {"command": shown(command(recipe))}
    try:
        row.update(estimate_row(command(recipe)))
    except Exception as e:  # noqa: BLE001 - the estimator's failure on one model is that row's status, not the table's
        row["status"] = f"not estimated: the one-GPU estimate fails ({type(e).__name__}: {str(e)[:120]})"
    if row["status"] != "estimated":
        return row
    held = row["held_bytes"]
    encoders = {k: v for k, v in held.items() if k.startswith("weights: text_encoder")}
    largest_encoder = max(encoders, key=encoders.get)
    denoiser_key = next(k for k in held if k in ("weights: transformer", "weights: unet"))
    sharded = held[denoiser_key] + encoders[largest_encoder]
    args = train_draftplus.parse_args(command(recipe))
    path = args.pretrained_model_name_or_path
    index = json.loads((Path(path) / "model_index.json").read_text())
    units = []
    with WeightlessMode():
        for key, classes in ((denoiser_key, args.checked.family.shard_block_classes),
                             (largest_encoder, None)):
            name = key.removeprefix("weights: ")
            library, class_name = index[name]
            model = _build_model(library, class_name, read_component_config(path, name, None), torch.bfloat16)
            units.append(_largest_unit_bytes(model, classes or getattr(model, "_no_split_modules", None) or ()))
    gathered = 2 * max(units)
    row.update(sharded_parts=[denoiser_key, largest_encoder], sharded_bytes=sharded, gathered_bytes=gathered,
               per_process_bytes={str(n): row["peak_bytes"] - sharded + sharded // n + gathered for n in processes})
    return row


def render_sharded(rows: dict[str, dict], processes: list[int]) -> str:
    lines = ["# Estimated memory per process under `--shard` (FSDP2), bf16", "",
             "From `python -m benchmarks.memory_table --sharded " + " ".join(map(str, processes)) + "`: estimated, "
             "not measured, and not a trace of a sharded run. The one-GPU estimate (`--estimate_memory`, the memory "
             "table's setting: 1024 px, batch 1 per process, K=1, LoRA rank 4, gradient checkpointing, PickScore "
             "fp32, AdamW) with the parts `--shard` splits (the denoiser's and the largest text encoder's weights) "
             "divided by N, plus twice the largest shard unit (the block computing and the next one, gathered); "
             "the rest (VAE, reward model, LoRA and its optimiser state, the activations: each process runs its own "
             "batch) as on one GPU. GB = 1e9 bytes; the CUDA context, NCCL buffers and allocator fragmentation come "
             "on top.", "",
             "| recipe | one GPU (GB) | sharded parts (GB) | gathered blocks (GB) | "
             + " | ".join(f"N = {n} (GB)" for n in processes) + " | " + " | ".join(f"N = {n} fits 80 GB"
                                                                                   for n in processes) + " |",
             "|---|---|---|---|" + "---|" * (2 * len(processes))]
    for name, row in rows.items():
        if row["status"] != "estimated":
            lines.append(f"| {name} | {row['status']} |")
            continue
        per = [row["per_process_bytes"][str(n)] for n in processes]
        lines.append(f"| {name} | {row['peak_bytes'] / 1e9:.1f} | {row['sharded_bytes'] / 1e9:.1f} "
                     f"({', '.join(p.removeprefix('weights: ') for p in row['sharded_parts'])}) | "
                     f"{row['gathered_bytes'] / 1e9:.1f} | " + " | ".join(f"{b / 1e9:.1f}" for b in per) + " | "
                     + " | ".join("yes" if b <= 80e9 else "no" for b in per) + " |")
    return "\n".join(lines) + "\n"


def render(rows: dict[str, dict]) -> str:
    from utils.memory.report import CEILINGS_GB

    lines = ["# Estimated peak GPU memory of one training step, per GPU", "",
             "From `python -m benchmarks.memory_table` (`train_draftplus.py --estimate_memory`, a CPU trace under fake "
             "tensors from the committed configs; docs/memory.md). Estimated, not measured: "
             "benchmarks/results/memory_calibration.md compares the estimator with the GPU measurements there are.",
             "", "Setting: 1024 px (512 for SD1.5), bf16 weights, batch 1, K=1, LoRA rank 4 (attention), gradient "
             "checkpointing, PickScore (fp32), AdamW, the family's rollout defaults. GB = 1e9 bytes; the CUDA "
             "context (~0.5 GB) and allocator fragmentation come on top. 'Without text encoders': the peak less the "
             "text encoders' weights, which a run that keeps them off the GPU between prompt encodings "
             "(`--offload_text_encoders`) or encodes its prompts once, ahead (`--precompute_prompt_embeddings`), "
             "does not hold at the peak (it comes after the encoding).", "",
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
    p.add_argument("--sharded", nargs="+", type=int, default=None, metavar="N",
                   help="Instead: the estimated per-process memory of SHARDED_RECIPES under --shard (FSDP2) on N "
                        "processes -> memory_sharded.{json,md} (computed from the one-GPU estimate's parts).")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.sharded:
        sharded = {}
        for recipe in SHARDED_RECIPES:
            print(f"{recipe.name} ...", flush=True)
            sharded[recipe.name] = sharded_estimate(recipe, args.sharded)
            (out / "memory_sharded.json").write_text(json.dumps({"processes": args.sharded, "rows": sharded},
                                                                indent=1) + "\n")
            (out / "memory_sharded.md").write_text(render_sharded(sharded, args.sharded))
        return
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
        rows[recipe.name] = {"command": shown(command(recipe)),
                             **estimate_row(command(recipe))}
        print(f"  {rows[recipe.name]['status']} {rows[recipe.name].get('peak_bytes', 0) / 1e9:.2f} GB", flush=True)
        path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        (out / "memory_table.md").write_text(render(rows))


if __name__ == "__main__":
    main()
