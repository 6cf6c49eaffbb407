"""Speed and memory of one DRaFT+ training sample, side by side with plain diffusers sampling.

    python -m benchmarks.speed_memory                      # CPU, the pretrained toy model
    python -m benchmarks.speed_memory --sd15 --device cuda # GPU: SD1.5-sized random UNet/VAE/CLIP + CLIP-H-sized reward

Writes benchmarks/results/speed_memory_<device>.{json,md}. Reported:
- time ratio: one training sample (rollout + reward + penalty + backward) / the same images generated
  by `StableDiffusionPipeline.__call__` (same model, T, batch, guidance); median of interleaved repeats;
- activation memory: bytes autograd keeps for backward (saved tensors, unique storages), against T and
  K, with and without gradient checkpointing; on CUDA also the peak allocated memory of a full step;
- a profile of one training sample by phase (the draftplus/* regions of the rollout).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_draftplus import Models, draftplus_step  # noqa: E402
from utils.lora import add_lora  # noqa: E402
from utils.rollout import RolloutConfig  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine(device: torch.device) -> str:
    cpu = platform.processor() or "cpu"
    if os.path.exists("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        desc = f"{torch.cuda.get_device_name()} ; host: {desc}"
    return desc


def load_toy(path: str | None):
    from diffusers import StableDiffusionPipeline

    if path is None:
        from utils.toy import build_toy_pipeline

        path = str(build_toy_pipeline())
    return StableDiffusionPipeline.from_pretrained(path)


def build_sd15_random(dtype: torch.dtype):
    """SD1.5's architecture (configs of stable-diffusion-v1-5) with random weights: no download needed."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.toy import build_clip_tokenizer

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
    )
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(dtype=dtype)


def clip_h_reward(device, dtype):
    """A CLIP-H/14-sized scorer (PickScore's architecture) with random weights, as a reward."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                       "num_attention_heads": 16, "patch_size": 14, "image_size": 224},
        projection_dim=1024,
    )
    model = CLIPModel(config).to(device, dtype).eval().requires_grad_(False)
    mean = torch.tensor([0.4815, 0.4578, 0.4082], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.2686, 0.2613, 0.2758], device=device).view(1, 3, 1, 1)

    def reward(images, prompts):
        x = torch.nn.functional.interpolate(images, size=224, mode="bicubic", antialias=True)
        feats = model.get_image_features(pixel_values=((x - mean) / std).to(dtype))
        feats = getattr(feats, "pooler_output", feats)
        return feats.float().norm(dim=-1)

    return reward


def make_models(pipe, device, rank: int = 4) -> Models:
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).to(device)
    add_lora(pipe.unet, rank=rank)
    return Models(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.unet, pipe.scheduler)


def training_sample(models, reward, prompts, noise, config, kl_coeff, autocast_dtype):
    with torch.autocast(noise.device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        loss, _, _ = draftplus_step(models, reward, prompts, noise, config, kl_coeff)
    with torch.profiler.record_function("draftplus/backward"):
        loss.backward()
    for p in models.unet.parameters():
        p.grad = None


def pipeline_sample(pipe, prompts, noise, config, autocast_dtype):
    with torch.autocast(noise.device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        pipe(prompts, latents=noise.clone(), num_inference_steps=config.num_inference_steps,
             guidance_scale=config.guidance_scale, output_type="pt",
             height=noise.shape[-2] * pipe.vae_scale_factor, width=noise.shape[-1] * pipe.vae_scale_factor)


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def saved_activation_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while fn runs."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default=None, help="Pipeline dir (default: the toy).")
    p.add_argument("--sd15", action="store_true", help="SD1.5-sized random models + CLIP-H-sized reward.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="Default: bf16 on CUDA.")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 10], help="T values for the time ratio.")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kl_coeff", type=float, default=0.1)
    p.add_argument("--reward", default="redness", help="Reward spec (ignored with --sd15).")
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    if args.sd15:
        pipe, reward, label = build_sd15_random(dtype), clip_h_reward(device, dtype), "sd15"
    else:
        from rewards import build_reward

        pipe, label = load_toy(args.pretrained_model_name_or_path), "toy"
        reward = build_reward(args.reward, device=device)
    pipe.set_progress_bar_config(disable=True)
    models = make_models(pipe, device)
    if dtype != torch.float32:
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.to(dtype)
        for prm in pipe.unet.parameters():
            if prm.requires_grad:
                prm.data = prm.data.float()
    latent = pipe.unet.config.sample_size
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"][: args.batch_size]
    prompts += prompts[-1:] * (args.batch_size - len(prompts))
    noise = torch.randn(args.batch_size, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device)
    results = {"machine": machine(device), "model": label, "device": str(device), "dtype": str(dtype),
               "batch_size": args.batch_size, "image_size": latent * pipe.vae_scale_factor, "timing": [],
               "activation_bytes_vs_T": [], "activation_bytes_vs_K": [], "profile": []}

    # 1. Time ratio, interleaved so that drift of the machine hits both sides alike.
    for T in args.steps:
        config = RolloutConfig(num_inference_steps=T, guidance_scale=7.5, truncation_steps=1)
        sides = {
            "train": functools.partial(training_sample, models, reward, prompts, noise, config, args.kl_coeff, dtype),
            "pipeline": functools.partial(pipeline_sample, pipe, prompts, noise, config, dtype),
        }
        for fn in sides.values():
            fn()  # warm-up
        times = {"train": [], "pipeline": []}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
        train_s, pipe_s = statistics.median(times["train"]), statistics.median(times["pipeline"])
        results["timing"].append({"T": T, "K": 1, "train_s": train_s, "pipeline_s": pipe_s,
                                  "ratio": train_s / pipe_s, "train_all": times["train"],
                                  "pipeline_all": times["pipeline"]})
        print(f"T={T}: training sample {train_s:.3f}s, pipeline {pipe_s:.3f}s, ratio {train_s / pipe_s:.3f}")

    # 2. Activation memory against T (must be flat) and against K (with/without checkpointing).
    def activations(T, K, checkpointing):
        config = RolloutConfig(num_inference_steps=T, guidance_scale=7.5, truncation_steps=K)
        for module in (pipe.unet, pipe.vae):
            (module.enable_gradient_checkpointing if checkpointing else module.disable_gradient_checkpointing)()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            n = saved_activation_bytes(lambda: draftplus_step(models, reward, prompts, noise, config, args.kl_coeff))
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            training_sample(models, reward, prompts, noise, config, args.kl_coeff, dtype)
            peak = torch.cuda.max_memory_allocated()
        return n, peak

    for T in (5, 10, 25, 50):
        n, peak = activations(T, 1, False)
        results["activation_bytes_vs_T"].append({"T": T, "K": 1, "saved_bytes": n, "cuda_peak_bytes": peak})
        print(f"T={T} K=1: {n / 2**20:.1f} MiB saved for backward" + (f", peak {peak / 2**30:.2f} GiB" if peak else ""))
    for K in (1, 2, 4):
        for ckpt in (False, True):
            n, peak = activations(10, K, ckpt)
            results["activation_bytes_vs_K"].append({"T": 10, "K": K, "gradient_checkpointing": ckpt,
                                                     "saved_bytes": n, "cuda_peak_bytes": peak})
            print(f"K={K} ckpt={ckpt}: {n / 2**20:.1f} MiB" + (f", peak {peak / 2**30:.2f} GiB" if peak else ""))
    activations(10, 1, False)  # back to the timing configuration

    # 3. Where the time of one training sample goes.
    config = RolloutConfig(num_inference_steps=args.steps[0], guidance_scale=7.5)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        training_sample(models, reward, prompts, noise, config, args.kl_coeff, dtype)
    total = None
    for event in prof.key_averages():
        if event.key.startswith("draftplus/") or event.key == "ProfilerStep*":
            t = event.device_time_total if device.type == "cuda" else event.cpu_time_total
            results["profile"].append({"region": event.key, "time_ms": t / 1e3})
    results["profile"].sort(key=lambda r: -r["time_ms"])
    total = sum(r["time_ms"] for r in results["profile"])
    ops = prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                                    row_limit=12)
    results["top_ops"] = ops

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"speed_memory_{label}_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    lines = [f"# DRaFT+ speed and memory ({label}, {device.type})", "", f"Machine: {results['machine']}",
             f"Batch {args.batch_size}, {results['image_size']}x{results['image_size']}, {dtype}, guidance 7.5, "
             f"kl_coeff {args.kl_coeff}, LoRA rank 4.", "",
             f"Command: `python -m benchmarks.speed_memory {' '.join(sys.argv[1:])}`".replace("  ", " "), "",
             "## Training sample vs. diffusers pipeline (median of interleaved repeats)", "",
             "| T | K | training sample (s) | pipeline (s) | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['T']} | {r['K']} | {r['train_s']:.3f} | {r['pipeline_s']:.3f} | {r['ratio']:.3f} |"
              for r in results["timing"]]
    lines += ["", "## Memory kept for backward (saved activations) against T, K=1", "",
              "| T | saved (MiB) | CUDA peak (GiB) |", "|---|---|---|"]
    lines += [f"| {r['T']} | {r['saved_bytes'] / 2**20:.2f} | {gib(r['cuda_peak_bytes'])} |"
              for r in results["activation_bytes_vs_T"]]
    lines += ["", "## ... against K (T=10)", "", "| K | gradient checkpointing | saved (MiB) | CUDA peak (GiB) |",
              "|---|---|---|---|"]
    lines += [f"| {r['K']} | {r['gradient_checkpointing']} | {r['saved_bytes'] / 2**20:.2f} | "
              f"{gib(r['cuda_peak_bytes'])} |" for r in results["activation_bytes_vs_K"]]
    lines += ["", f"## Profile of one training sample (T={args.steps[0]}, K=1)", "",
              "| region | time (ms) | share |", "|---|---|---|"]
    lines += [f"| {r['region']} | {r['time_ms']:.1f} | {r['time_ms'] / total:.0%} |" for r in results["profile"]]
    lines += ["", "Top operators:", "", "```", ops, "```", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print(f"wrote {out / stem}.md")


if __name__ == "__main__":
    main()
