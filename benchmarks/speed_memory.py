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

from utils.family import family_for_class_name, load_family  # noqa: E402
from utils.lora import add_lora  # noqa: E402
from utils.rollout import Models, RolloutConfig, draftplus_step  # noqa: E402


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
    return load_family(path or "toy").pipe


def build_sd15_random(device: torch.device, dtype: torch.dtype, resolution: int = 512):
    """SD1.5's architecture (configs of stable-diffusion-v1-5) with random weights: no download needed.
    Built directly on `device` (random init of 1B parameters on a CPU takes minutes)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.toy import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=resolution,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(dtype=dtype)


def clip_h_pickscore(device: torch.device, dtype: torch.dtype, workdir: Path):
    """The real `pickscore` reward (differentiable preprocessing, cached text embeddings) on a CLIP-H/14-sized
    model (PickScore_v1's architecture and processor settings) with random weights, saved to `workdir` and
    loaded through the same `model=` path as a local checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from rewards import build_reward
    from utils.toy import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(workdir)
    CLIPImageProcessor(size={"shortest_edge": 224}, resample=3, crop_size={"height": 224, "width": 224},
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(workdir)
    config = CLIPConfig(
        text_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                     "hidden_act": "gelu", "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                       "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "hidden_act": "gelu"},
        projection_dim=1024,
    )
    with torch.device(device):
        model = CLIPModel(config).to(dtype)
    model.save_pretrained(workdir)
    del model
    return build_reward("pickscore", device=device, dtype=dtype, model=str(workdir))


def make_models(pipe, device, rank: int = 4) -> Models:
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).to(device)
    add_lora(pipe.unet, rank=rank)
    family = family_for_class_name(type(pipe).__name__)(pipe)
    return Models(family=family, unet=pipe.unet, raw_unet=pipe.unet, vae=pipe.vae, scheduler=pipe.scheduler)


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


def saved_activation_bytes(fn, modules) -> int:
    """Bytes of the distinct tensors autograd saves for backward while fn runs, weights excluded (layers save
    their frozen weights for the input gradient, but those are in memory anyway)."""
    weights = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        # Not `t` itself: a saved output packed with its own grad_fn is a reference cycle through C++ that
        # no garbage collector frees, and the whole graph would leak.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def profile_one_sample(models, reward, prompts, noise, args, dtype, results) -> None:
    """torch.profiler over one training sample: time per draftplus/* region into results["profile"]."""
    device = noise.device
    config = RolloutConfig(num_inference_steps=args.steps[0], guidance_scale=7.5)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        training_sample(models, reward, prompts, noise, config, args.kl_coeff, dtype)
    cuda = device.type == "cuda"
    # On CUDA every record_function range appears twice: the CPU-side range (its device time is the kernel time
    # of the ops launched inside it) and a GPU "user annotation" (the wall span on the GPU timeline, idle gaps
    # included). Keep the CPU-side ones; kernels launched from autograd's own thread are outside every range.
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    results["profile"] = []
    for event in events:
        if event.key.startswith("draftplus/"):
            results["profile"].append({"region": event.key, "time_ms": (event.device_time_total if cuda
                                                                         else event.cpu_time_total) / 1e3})
    if cuda:
        kernels = sum(e.self_device_time_total for e in events) / 1e3
        named = sum(r["time_ms"] for r in results["profile"])
        results["kernel_ms_total"] = kernels
        results["profile"].append({"region": "other: backward (autograd thread) and the rest",
                                   "time_ms": max(0.0, kernels - named)})
    results["profile"].sort(key=lambda r: -r["time_ms"])
    results["profile_T"] = args.steps[0]
    results["top_ops"] = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                                   row_limit=12)


SECTIONS = ("timing", "peak", "memory", "profile")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default=None, help="Pipeline dir (default: the toy).")
    p.add_argument("--sd15", action="store_true", help="SD1.5-sized random models + CLIP-H-sized PickScore reward.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="Default: bf16 on CUDA.")
    p.add_argument("--resolution", type=int, default=None, help="Image size (default: the model's own; 512 for SD1.5).")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 10], help="T values for the time ratio.")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory_steps", type=int, nargs="+", default=[5, 10, 25, 50], help="T values for memory vs T.")
    p.add_argument("--memory_truncations", type=int, nargs="+", default=[1, 2, 4], help="K values for memory vs K.")
    p.add_argument("--kl_coeff", type=float, default=0.1)
    p.add_argument("--reward", default="redness", help="Reward spec (ignored with --sd15).")
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="Measure only these; the others are kept from an earlier run's JSON of the same setup.")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.sd15:
        import tempfile

        pipe, label = build_sd15_random(device, dtype, args.resolution or 512), "sd15"
        reward = clip_h_pickscore(device, dtype, Path(tempfile.mkdtemp(prefix="draftplus-clip-h-")))
    else:
        from rewards import build_reward

        pipe, label = load_toy(args.pretrained_model_name_or_path), "toy"
        reward = build_reward(args.reward, device=device)
    print(f"models ready in {time.perf_counter() - start:.0f}s", flush=True)
    pipe.set_progress_bar_config(disable=True)
    models = make_models(pipe, device)
    if dtype != torch.float32:
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.to(dtype)
        for prm in pipe.unet.parameters():
            if prm.requires_grad:
                prm.data = prm.data.float()
    latent = (args.resolution // pipe.vae_scale_factor) if args.resolution else pipe.unet.config.sample_size
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"][: args.batch_size]
    prompts += prompts[-1:] * (args.batch_size - len(prompts))
    noise = torch.randn(args.batch_size, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device)
    command = f"python -m benchmarks.speed_memory {' '.join(sys.argv[1:])}".strip()
    setup = {"model": label, "device": str(device), "dtype": str(dtype), "batch_size": args.batch_size,
             "image_size": latent * pipe.vae_scale_factor, "kl_coeff": args.kl_coeff}
    results = {**setup, "machine": machine(device), "commands": [], "timing": [], "activation_bytes_vs_T": [],
               "activation_bytes_vs_K": [], "peak_batch1": [], "profile": []}
    out = Path(args.output_dir)
    stem = f"speed_memory_{label}_{device.type}"
    if set(args.sections) != set(SECTIONS) and (out / f"{stem}.json").exists():
        earlier = json.loads((out / f"{stem}.json").read_text())
        if all(earlier.get(k) == v for k, v in setup.items()):
            results = {**results, **earlier, "machine": results["machine"]}
    results["commands"] = [*results.get("commands", []), {"command": command, "sections": args.sections}]

    def set_checkpointing(on: bool) -> None:
        for module in (pipe.unet, pipe.vae):
            (module.enable_gradient_checkpointing if on else module.disable_gradient_checkpointing)()

    # 1. Time ratio, interleaved so that drift of the machine hits both sides alike.
    if "timing" in args.sections:
        results["timing"] = []
    for T in args.steps if "timing" in args.sections else []:
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
        print(f"T={T}: training sample {train_s:.3f}s, pipeline {pipe_s:.3f}s, ratio {train_s / pipe_s:.3f}",
              flush=True)

    # 2. The smallest real run: batch 1, K=1, T=steps[0]; whole-process peak (all weights included) on CUDA.
    if device.type == "cuda" and "peak" in args.sections:
        results["peak_batch1"] = []
        config = RolloutConfig(num_inference_steps=args.steps[0], guidance_scale=7.5, truncation_steps=1)
        for ckpt in (True, False):
            set_checkpointing(ckpt)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            training_sample(models, reward, prompts[:1], noise[:1], config, args.kl_coeff, dtype)
            row = {"T": args.steps[0], "K": 1, "batch_size": 1, "gradient_checkpointing": ckpt,
                   "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                   "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
            results["peak_batch1"].append(row)
            print(f"batch 1 ckpt={ckpt}: peak allocated {gib(row['peak_allocated_bytes'])} GiB, "
                  f"reserved {gib(row['peak_reserved_bytes'])} GiB", flush=True)
    set_checkpointing(False)

    # 3. Activation memory against T (must be flat) and against K (with/without checkpointing).
    def activations(T, K, checkpointing):
        config = RolloutConfig(num_inference_steps=T, guidance_scale=7.5, truncation_steps=K)
        set_checkpointing(checkpointing)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            n = saved_activation_bytes(lambda: draftplus_step(models, reward, prompts, noise, config, args.kl_coeff),
                                       (pipe.unet, pipe.vae, pipe.text_encoder, reward))
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            training_sample(models, reward, prompts, noise, config, args.kl_coeff, dtype)
            peak = torch.cuda.max_memory_allocated()
        return n, peak

    if "memory" in args.sections:
        results["activation_bytes_vs_T"], results["activation_bytes_vs_K"] = [], []
    for T in args.memory_steps if "memory" in args.sections else []:
        n, peak = activations(T, 1, False)
        results["activation_bytes_vs_T"].append({"T": T, "K": 1, "saved_bytes": n, "cuda_peak_bytes": peak})
        print(f"T={T} K=1: {n / 2**20:.1f} MiB saved for backward" + (f", peak {peak / 2**30:.2f} GiB" if peak else ""),
              flush=True)
    for K in args.memory_truncations if "memory" in args.sections else []:
        for ckpt in (False, True):
            try:
                n, peak = activations(10, K, ckpt)
            except torch.OutOfMemoryError:  # reported as such: the point of the K sweep is where memory runs out
                n, peak = None, None
                torch.cuda.empty_cache()
            results["activation_bytes_vs_K"].append({"T": 10, "K": K, "gradient_checkpointing": ckpt,
                                                     "saved_bytes": n, "cuda_peak_bytes": peak})
            print(f"K={K} ckpt={ckpt}: " + ("out of memory" if n is None else f"{n / 2**20:.1f} MiB")
                  + (f", peak {peak / 2**30:.2f} GiB" if peak else ""), flush=True)

    set_checkpointing(False)  # back to the timing configuration

    # 4. Where the time of one training sample goes.
    if "profile" in args.sections:
        try:
            profile_one_sample(models, reward, prompts, noise, args, dtype, results)
        except Exception as exc:  # the measurements above are worth writing out even if the profiler fails
            results["profile"], results["top_ops"] = [], f"profiler failed: {type(exc).__name__}: {exc}"
            print(results["top_ops"], flush=True)

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stem}.md").write_text(render(results))
    print(f"wrote {out / stem}.md")


def render(results: dict) -> str:
    """The Markdown report of one results JSON (sections that were never measured are left out)."""
    cuda = results["device"].startswith("cuda")
    size = results["image_size"]
    reward = ("PickScore code path on a random CLIP-H/14-sized model" if results["model"] == "sd15"
              else "a simple colour reward")
    lines = [f"# DRaFT+ speed and memory ({results['model']}, {results['device']})", "",
             f"Machine: {results['machine']}", "",
             f"Batch {results['batch_size']}, {size}x{size}, {results['dtype']}, guidance 7.5, kl_coeff "
             f"{results['kl_coeff']}, LoRA rank 4, DDIM, reward: {reward}.", "", "Commands:", ""]
    lines += [f"- `{c['command']}` ({', '.join(c['sections'])})" for c in results["commands"]]
    if results["timing"]:
        lines += ["", "## Training sample vs. diffusers pipeline (median of interleaved repeats)", "",
                  "One training sample = rollout (T-1 no-grad steps + 1 graded step + adapters-off reference) + VAE "
                  "decode + reward + penalty + backward; the pipeline generates the same images with "
                  "`StableDiffusionPipeline.__call__`.", "",
                  "| T | K | training sample (s) | pipeline (s) | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {r['T']} | {r['K']} | {r['train_s']:.3f} | {r['pipeline_s']:.3f} | {r['ratio']:.3f} |"
                  for r in results["timing"]]
    if results["peak_batch1"]:
        lines += ["", f"## Peak GPU memory of one training sample, batch 1, K=1, T={results['peak_batch1'][0]['T']}",
                  "", "All weights (UNet, VAE, text encoder, reward model, LoRA) included; the CUDA context "
                  "(~0.5 GiB) is not: 'fits' means reserved + 0.5 GiB <= 12 GB.", "",
                  "| gradient checkpointing | peak allocated (GiB) | peak reserved (GiB) | fits a 12 GB card |",
                  "|---|---|---|---|"]
        lines += [f"| {r['gradient_checkpointing']} | {gib(r['peak_allocated_bytes'])} | "
                  f"{gib(r['peak_reserved_bytes'])} | {r['peak_reserved_bytes'] + 2**29 <= 12e9} |"
                  for r in results["peak_batch1"]]
    if results["activation_bytes_vs_T"]:
        lines += ["", f"## Memory kept for backward (saved activations, weights excluded) against T, K=1, "
                      f"batch {results['batch_size']}", "", "| T | saved (MiB) | CUDA peak (GiB) |", "|---|---|---|"]
        lines += [f"| {r['T']} | {r['saved_bytes'] / 2**20:.2f} | {gib(r['cuda_peak_bytes'])} |"
                  for r in results["activation_bytes_vs_T"]]
    if results["activation_bytes_vs_K"]:
        lines += ["", "## ... against K (T=10)", "", "| K | gradient checkpointing | saved (MiB) | CUDA peak (GiB) |",
                  "|---|---|---|---|"]
        lines += [f"| {r['K']} | {r['gradient_checkpointing']} | "
                  + ("out of memory" if r["saved_bytes"] is None else f"{r['saved_bytes'] / 2**20:.2f}")
                  + f" | {gib(r['cuda_peak_bytes'])} |" for r in results["activation_bytes_vs_K"]]
    if results["profile"] or results.get("top_ops"):
        total = sum(r["time_ms"] for r in results["profile"]) or 1.0
        lines += ["", f"## Profile of one training sample (T={results.get('profile_T')}, K=1, "
                      f"batch {results['batch_size']})", "",
                  f"Time is {'GPU kernel time' if cuda else 'CPU time'} per region (torch.profiler)"
                  + (f"; all kernels together: {results['kernel_ms_total']:.0f} ms" if "kernel_ms_total" in results
                     else "") + ".", "", "| region | time (ms) | share |", "|---|---|---|"]
        lines += [f"| {r['region']} | {r['time_ms']:.1f} | {r['time_ms'] / total:.0%} |" for r in results["profile"]]
        lines += ["", "Top operators:", "", "```", results.get("top_ops", ""), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
