"""Peak host RAM per process of a `--shard` load, with every process reading the whole model (as before) and with
rank 0 alone reading the weights of the modules that are sharded (utils/run/empty_models.py), side by side.

    python -m benchmarks.shard_host_memory                 # 2 CPU processes over gloo; writes results/shard_host_memory.*

A FLUX.1-shaped pipeline, narrow in depth but wide (a 512-wide transformer of 2 double- and 4 single-stream blocks, a
512-wide T5 encoder: ~150 MB of fp32 weights in all), is built from configs with random weights and saved to a
temporary directory. Then, once per way of loading, two processes (torchrun, gloo) each do what the trainer does
under `--shard` up to its first step: load the pipeline (`ModelFamily.load`), add the LoRA, shard the denoiser and
the largest text encoder (`sharding.shard_models`). Each records its peak resident set (`ru_maxrss`) once its imports
are done (the baseline: torch, diffusers, transformers) and after the sharding; the difference is what loading
cost it. The weights are on the CPU throughout, so the sharded weights count in RSS: on a GPU machine the shards
leave for the device, and the whole model each process held before is what the change saves.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"every": "every process reads the whole model (before)", "rank0": "rank 0 alone reads the sharded modules"}
WIDTH = 512  # the transformer's and T5's width: wide enough that the weights, not the code, dominate the peak


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(path: Path) -> None:
    """A FLUX.1-dev-shaped pipeline, wide and shallow, random weights, saved to `path`."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from utils.toys import tiny_models as t

    torch.manual_seed(0)
    clip_tokenizer, t5_tokenizer = t.build_clip_tokenizer(), t.build_t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                         attention_head_dim=64, num_attention_heads=WIDTH // 64,
                                         joint_attention_dim=WIDTH, pooled_projection_dim=32, guidance_embeds=True,
                                         axes_dims_rope=(16, 24, 24))
    t5 = t.tiny_t5_encoder(t5_tokenizer, WIDTH)
    clip = CLIPTextModel(t.clip_text_config(clip_tokenizer, **{**t.TINY_CLIP_TEXT_SIZES, "hidden_size": 32}))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**t.FLUX_DEV_SCHEDULER),
                        vae=t.tiny_vae(16, **{**t.FLOW_VAE, "latent_channels": 16}, **t.FLUX_VAE_FACTORS),
                        text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                        transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)


def worker(mode: str, model: str, out: str) -> None:
    """One process of the 2-process load: what the trainer's `load_models` and `shard_models` do under --shard."""
    import torch
    import torch.distributed as dist

    from utils.families import family_of
    from utils.lora import add_lora
    from utils.run.empty_models import empty_sharded_components
    from utils.run.sharding import modules_to_shard, shard_models

    dist.init_process_group("gloo")
    rank, baseline = dist.get_rank(), peak_mib()
    family_class = family_of(model)
    empty = {}
    if mode == "rank0" and rank > 0:
        empty = empty_sharded_components(family_class, model, None, torch.float32)
    family = family_class.load(model, components=empty, max_sequence_length=16)
    lora = add_lora(family.denoiser, 4, 4, 0.0, family.target_modules(["attention"], dict(family.denoiser.config)))
    weights = {type(m).__name__: sum(p.numel() * p.element_size() for p in m.parameters())
               for m in modules_to_shard(family)}
    shard_models(family, lora, torch.device("cpu"), from_rank0=mode == "rank0")
    dist.barrier()
    json.dump({"rank": rank, "baseline_mib": baseline, "peak_mib": peak_mib(), "sharded_weights_bytes": weights},
              open(Path(out) / f"{mode}_rank{rank}.json", "w"))
    dist.destroy_process_group()


def render(results: dict) -> str:
    rows = [f"| {mode} | {MODES[mode]} | {r['rank']} | {r['baseline_mib']:.0f} | {r['peak_mib']:.0f} | "
            f"{r['peak_mib'] - r['baseline_mib']:.0f} |" for mode in MODES for r in results["processes"][mode]]
    shard = sum(results["sharded_weights_bytes"].values()) / 2 / 2**20
    sharded = ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in results["sharded_weights_bytes"].items())
    return "\n".join([
        "# Host RAM of a `--shard` load, per process",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Model: a FLUX.1-shaped pipeline, {results['weights_mib']:.0f} MiB of fp32 weights on disk; sharded: "
        f"{sharded}.  ",
        "Two CPU processes over gloo each load the pipeline, add the LoRA and shard the denoiser and the largest "
        "text encoder; peak resident set (`ru_maxrss`, MiB) after the imports and after the sharding.",
        "",
        "| load | how | rank | after imports | peak | load's cost |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Rank 1's cost of loading: {results['rank1_cost_mib']['every']:.0f} MiB when every process reads the whole "
        f"model, {results['rank1_cost_mib']['rank0']:.0f} MiB when rank 0 alone reads the sharded modules, of which "
        f"{shard:.0f} MiB is its half of the sharded weights: on the CPU here, on the device on a GPU machine. Rank "
        "0 reads the whole model either way; with the change it keeps the whole weights until they are broadcast, "
        "so here (its shards on the CPU too) its peak holds both.",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--port", type=int, default=29611)
    p.add_argument("--worker", nargs=3, metavar=("MODE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    import torch

    from benchmarks.speed_memory import machine

    results = {"command": "python -m benchmarks.shard_host_memory", "machine": machine(torch.device("cpu")),
               "processes": {}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build(model)
        results["weights_mib"] = sum(f.stat().st_size for f in model.rglob("*.safetensors")) / 2**20
        for i, mode in enumerate(MODES):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(args.port + i), __file__, "--worker", mode, str(model), tmp], env=env, check=True)
            results["processes"][mode] = [json.loads((Path(tmp) / f"{mode}_rank{r}.json").read_text())
                                          for r in (0, 1)]
    results["sharded_weights_bytes"] = results["processes"]["every"][0]["sharded_weights_bytes"]
    results["rank1_cost_mib"] = {mode: r[1]["peak_mib"] - r[1]["baseline_mib"] for mode, r in results["processes"].items()}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shard_host_memory.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "shard_host_memory.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
