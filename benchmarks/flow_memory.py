"""Peak GPU memory and time of one DRaFT+ training sample on SD3.5-Medium- and FLUX.1-dev-sized models.

    python -m benchmarks.flow_memory --model sd35m --device cuda                    # SD3.5-Medium, bf16
    python -m benchmarks.flow_memory --model flux1dev --device cuda --quantize_base nf4
    python -m benchmarks.flow_memory --model flux1dev --device cuda                 # FLUX.1-dev, bf16
    python -m benchmarks.flow_memory --model flux1dev --smoke --device cpu          # the same code paths, tiny widths

Every component is built from its real config (below: the configs of stabilityai/stable-diffusion-3.5-medium and
black-forest-labs/FLUX.1-dev, T5-XXL included) with random weights, directly on the device, in bf16 on CUDA. The
trainer's setting of the memory goals (GOAL_GB): 1024x1024, batch 1, K=1, LoRA rank 4 on the `attention` preset (fp32),
gradient checkpointing of the transformer and the VAE decoder, the family's rollout defaults (28 steps; guidance
7.0 for SD3.5, 3.5 for FLUX.1-dev), kl_coeff 0.1, and the `pickscore` reward on a CLIP-H/14-sized model
(`benchmarks.speed_memory.clip_h_pickscore`, as the SD1.5/SDXL stages). With `--quantize_base nf4` the transformer's
Linear layers are bitsandbytes 4-bit NF4 (computing in bf16), the layers diffusers' quantizer converts at load time,
quantized here from the weights in memory (`quantize_nf4`): the trainer loads a checkpoint the same way.

Measured: the whole-process peak GPU memory of one training sample (every weight, the reward model and the CUDA
caching allocator's reserve included; the CUDA context, ~0.5 GiB, is not) against the goal (SD3.5-Medium <= 24 GB
unquantized; FLUX.1-dev <= 24 GB with nf4, <= 80 GB without); and the median time of a training sample against the
family's pipeline `__call__` generating the same image from the same noise with the same (LoRA-carrying)
transformer, at 28 steps. Writes <output_dir>/flow_memory_<label>_<device>.{json,md} (label: the model, `_nf4`,
`_smoke`). `--smoke`: tiny widths at 64 px: a dry run of the code paths on any machine; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed_memory import clip_h_pickscore, gib, machine, sync  # noqa: E402
from rewards import resolve_dtype  # noqa: E402
from utils.families import family_for_class_name  # noqa: E402
from utils.lora import add_lora  # noqa: E402
from utils.rollout.loop import Models, RolloutConfig, draftplus_step  # noqa: E402

MODELS = ("sd35m", "flux1dev")
# The memory goals: the largest peak (GB, 1e9 bytes) one training sample may take, by model and quantization.
GOAL_GB = {("sd35m", None): 24, ("flux1dev", "nf4"): 24, ("flux1dev", None): 80}
GOAL_TEXT = {"sd35m": "SD3.5-Medium <= 24 GB without quantization",
             "flux1dev": "FLUX.1-dev <= 24 GB with --quantize_base nf4, <= 80 GB without"}
PROMPT = "a photo of a red fox in the snow"

# diffusers' configs of the real models' components (transformer/, vae/, text_encoder*/ config.json).
SD35_MEDIUM_TRANSFORMER = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
    "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
    "sample_size": 128}
FLUX_1_DEV_TRANSFORMER = {
    "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768}
FLOW_VAE = {  # both models' 16-channel VAE; the latent normalisation differs
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": False,
    "use_post_quant_conv": False}
VAE_FACTORS = {"sd35m": {"scaling_factor": 1.5305, "shift_factor": 0.0609},
               "flux1dev": {"scaling_factor": 0.3611, "shift_factor": 0.1159}}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "hidden_act": "gelu", "projection_dim": 1280}
CLIP_VOCAB = 49408
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
          "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False}
SCHEDULERS = {"sd35m": {"shift": 3.0},
              "flux1dev": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                           "base_image_seq_len": 256, "max_image_seq_len": 4096}}
# --smoke: the same structure at tiny widths (a dry run). Widths are multiples of 64, as the real ones: bitsandbytes'
# CPU kernels for 4-bit layers want whole 64-weight blocks per row.
SMOKE = {
    "sd35m": {"attention_head_dim": 16, "caption_projection_dim": 64, "dual_attention_layers": [0],
              "joint_attention_dim": 128, "num_attention_heads": 4, "num_layers": 2, "pooled_projection_dim": 128,
              "pos_embed_max_size": 32, "sample_size": 16},
    "flux1dev": {"attention_head_dim": 32, "axes_dims_rope": [8, 12, 12], "joint_attention_dim": 64,
                 "num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1, "pooled_projection_dim": 64},
    "vae": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "sample_size": 64},
    "clip": {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "projection_dim": 64},
    "t5": {"d_ff": 64, "d_kv": 16, "num_heads": 4, "num_layers": 2, "relative_attention_num_buckets": 8},
}
SMOKE_T5_WIDTH = {"sd35m": 128, "flux1dev": 64}  # the tiny transformer's joint_attention_dim


# ---------------------------------------------------------------------------------- models


def build_pipeline(model: str, device: torch.device, dtype: torch.dtype, smoke: bool = False):
    """The model's diffusers pipeline from the real configs (random weights; `smoke`: tiny widths), built on
    `device` and cast to `dtype`."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from utils.toys.tiny_models import build_clip_tokenizer, build_t5_tokenizer, clip_text_config

    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()

    def clip_config(sizes: dict, smoke_sizes: dict):
        config = clip_text_config(clip_tokenizer, **{**sizes, **(smoke_sizes if smoke else {})})
        if not smoke:
            config.vocab_size = CLIP_VOCAB  # the real embedding table; the generated tokenizer's ids fit in it
        return config

    t5_sizes = {**T5_XXL, **({**SMOKE["t5"], "d_model": SMOKE_T5_WIDTH[model], "vocab_size": len(t5_tokenizer)}
                             if smoke else {})}
    t5_config = T5Config(**t5_sizes, pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id,
                         decoder_start_token_id=t5_tokenizer.pad_token_id)
    vae_config = {**FLOW_VAE, **VAE_FACTORS[model], **(SMOKE["vae"] if smoke else {})}
    transformer_config = {**(SD35_MEDIUM_TRANSFORMER if model == "sd35m" else FLUX_1_DEV_TRANSFORMER),
                          **(SMOKE[model] if smoke else {})}
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[model])
    with torch.device(device):
        vae = AutoencoderKL(**vae_config)
        t5 = T5EncoderModel(t5_config)
        if model == "sd35m":
            transformer = SD3Transformer2DModel(**transformer_config)
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, scheduler=scheduler, vae=vae,
                text_encoder=CLIPTextModelWithProjection(clip_config(CLIP_L, SMOKE["clip"])),
                tokenizer=clip_tokenizer,
                text_encoder_2=CLIPTextModelWithProjection(clip_config(CLIP_G, SMOKE["clip"])),
                tokenizer_2=clip_tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer)
        else:
            transformer = FluxTransformer2DModel(**transformer_config)
            clip_l = {k: v for k, v in CLIP_L.items() if k != "projection_dim"}
            pipe = FluxPipeline(
                transformer=transformer, scheduler=scheduler, vae=vae,
                text_encoder=CLIPTextModel(clip_config(clip_l, SMOKE["clip"])),
                tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def quantize_nf4(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace the model's Linear layers with bitsandbytes 4-bit NF4 ones holding its own weights, quantized where
    they are: the layers and the quantization diffusers' bitsandbytes quantizer applies when a checkpoint is loaded
    with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` (`ModelFamily.quantization_config`),
    done from weights already in memory. Runs wherever bitsandbytes' 4-bit layers run (CUDA, and its CPU backend).
    Returns the number of layers converted."""
    import bitsandbytes as bnb
    from diffusers import BitsAndBytesConfig
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    weights = dict(model.named_parameters())
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])  # as the quantizer: kept in their dtype
    replace_with_bnb_linear(model, modules_to_not_convert=keep, quantization_config=config)
    converted = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = weights.pop(f"{name}.weight").detach()
        module._parameters["weight"] = bnb.nn.Params4bit(weight, requires_grad=False,
                                                         **module.weight.__dict__).to(weight.device)
        if module.bias is not None:
            module._parameters["bias"] = torch.nn.Parameter(weights.pop(f"{name}.bias").detach(), requires_grad=False)
        del weight
        converted += 1
    model.is_loaded_in_4bit = True
    model.config.quantization_config = config
    return converted


def cpu_4bit_layers_in_training_mode(model: torch.nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for its inference kernel at the first
    call without autograd in eval mode, and a later call with autograd (the graded step) then fails. The 4-bit
    layers read their train/eval mode for that choice alone: in training mode they keep the differentiable path.
    CUDA has no such repacking."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.device.type == "cpu":
            module.train()


# ---------------------------------------------------------------------------------- what is measured


def training_sample(models: Models, reward, noise: torch.Tensor, config: RolloutConfig, dtype: torch.dtype) -> None:
    with torch.autocast(noise.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss, _, _ = draftplus_step(models, reward, [PROMPT], noise, config, kl_coeff=0.1)
    loss.backward()
    for p in models.raw_denoiser.parameters():
        p.grad = None


def pipeline_sample(family, noise: torch.Tensor, config: RolloutConfig, dtype: torch.dtype) -> None:
    """The family's pipeline generating the image of the same noise (its LoRA-carrying transformer, under autocast
    for the fp32 adapters, as validation renders)."""
    height, width = (s * family.vae_scale_factor for s in noise.shape[-2:])
    with torch.no_grad(), torch.autocast(noise.device.type, dtype=dtype, enabled=dtype != torch.float32):
        family.pipe(PROMPT, latents=family.to_pipeline_latents(noise), height=height, width=width,
                    num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                    output_type="pt", **family.pipeline_kwargs())


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, required=True, help="sd35m (SD3.5-Medium) or flux1dev (FLUX.1-dev).")
    p.add_argument("--quantize_base", choices=["nf4"], default=None, help="The transformer in 4-bit NF4 (QLoRA).")
    p.add_argument("--smoke", action="store_true", help="Tiny widths at 64 px: the code paths only (a dry run).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="Default: bf16 on CUDA, fp32 on CPU.")
    p.add_argument("--resolution", type=int, default=None, help="Image size (default 1024; 64 with --smoke).")
    p.add_argument("--steps", type=int, default=28, help="T (the pipelines' default, 28).")
    p.add_argument("--repeats", type=int, default=3, help="Timed repeats per side, after one warm-up (median).")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    p.add_argument("--sides", nargs="+", choices=["peak", "timing"], default=["peak", "timing"])
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    resolution = args.resolution or (64 if args.smoke else 1024)
    label = args.model + (f"_{args.quantize_base}" if args.quantize_base else "") + ("_smoke" if args.smoke else "")
    torch.manual_seed(0)
    start = time.perf_counter()
    pipe = build_pipeline(args.model, device, dtype, smoke=args.smoke)
    converted = quantize_nf4(pipe.transformer, dtype) if args.quantize_base else 0
    family = family_for_class_name(type(pipe).__name__)(pipe)
    for module in (family.denoiser, family.vae, *family.text_encoders):
        module.requires_grad_(False).eval()
    add_lora(family.denoiser, rank=args.rank, target_modules=family.target_modules(["attention"]))
    if args.quantize_base:
        cpu_4bit_layers_in_training_mode(family.denoiser)
    family.denoiser.enable_gradient_checkpointing()
    family.vae.enable_gradient_checkpointing()
    reward = clip_h_pickscore(device, dtype, Path(tempfile.mkdtemp(prefix="draftplus-clip-h-")), smoke=args.smoke)
    built_s = time.perf_counter() - start
    print(f"models ready in {built_s:.0f}s ({converted} Linear layers in 4-bit)", flush=True)

    defaults = family.rollout_defaults(dict(family.denoiser.config))
    config = RolloutConfig(num_inference_steps=args.steps, guidance_scale=defaults["guidance_scale"],
                           truncation_steps=1)
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    models = Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                    scheduler=scheduler)
    noise = torch.randn(family.latent_shape(1, resolution, resolution), generator=torch.Generator().manual_seed(0))
    noise = noise.to(device)

    goal = GOAL_GB.get((args.model, args.quantize_base))
    results = {"model": args.model, "quantize_base": args.quantize_base, "smoke": args.smoke, "device": str(device),
               "dtype": str(dtype), "machine": machine(device), "image_size": resolution, "T": args.steps, "K": 1,
               "batch_size": 1, "rank": args.rank, "guidance_scale": config.guidance_scale,
               "gradient_checkpointing": True, "goal_gb": goal, "build_s": built_s, "quantized_layers": converted,
               "command": f"python -m benchmarks.flow_memory {' '.join(sys.argv[1:] if argv is None else argv)}"}
    training_sample(models, reward, noise, config, dtype)  # warm-up (allocator, kernels)
    if "peak" in args.sides and device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        training_sample(models, reward, noise, config, dtype)
        results["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        results["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        results["fits_goal"] = results["peak_reserved_bytes"] + 2**29 <= goal * 1e9
        print(f"peak allocated {gib(results['peak_allocated_bytes'])} GiB, reserved "
              f"{gib(results['peak_reserved_bytes'])} GiB (goal {goal} GB)", flush=True)
    if "timing" in args.sides:
        pipeline_sample(family, noise, config, dtype)  # warm-up
        times = {"train": [], "pipeline": []}
        for _ in range(args.repeats):  # interleaved, so that drift of the machine hits both alike
            times["train"].append(timed(lambda: training_sample(models, reward, noise, config, dtype), device))
            times["pipeline"].append(timed(lambda: pipeline_sample(family, noise, config, dtype), device))
        results["times_s"] = times
        results["median_s"] = {side: statistics.median(ts) for side, ts in times.items()}
        results["train_over_pipeline"] = results["median_s"]["train"] / results["median_s"]["pipeline"]
        print(f"training sample {results['median_s']['train']:.2f} s, pipeline {results['median_s']['pipeline']:.2f} s"
              f": ratio {results['train_over_pipeline']:.2f}", flush=True)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"flow_memory_{label}_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stem}.md").write_text(render(results))
    print(f"wrote {out / stem}.md", flush=True)
    return results


def render(results: dict) -> str:
    """The Markdown report of one results JSON."""
    name = {"sd35m": "SD3.5-Medium", "flux1dev": "FLUX.1-dev"}[results["model"]]
    quantized = f", transformer in {results['quantize_base']}" if results["quantize_base"] else ""
    lines = [f"# DRaFT+ training sample on {name} size{quantized} ({results['device']})", "",
             f"Machine: {results['machine']}", "",
             f"{results['image_size']}x{results['image_size']}, {results['dtype']}, batch 1, K=1, T={results['T']}, "
             f"guidance {results['guidance_scale']:g}, LoRA rank {results['rank']} (attention preset), gradient "
             "checkpointing (transformer and VAE decoder), reward: PickScore code path on a random CLIP-H/14-sized "
             "model. Random weights from the real configs.", "", f"Command: `{results['command']}`"]
    if results["smoke"]:
        lines += ["", "**Smoke run**: tiny widths, the code paths of the real benchmark only; the numbers mean nothing."]
    if "peak_reserved_bytes" in results:
        lines += ["", "| peak allocated (GiB) | peak reserved (GiB) | goal | met |", "|---|---|---|---|",
                  f"| {gib(results['peak_allocated_bytes'])} | {gib(results['peak_reserved_bytes'])} | "
                  f"<= {results['goal_gb']} GB | {'yes' if results['fits_goal'] else 'no'} |", "",
                  "Whole-process peak of one training sample; 'met' means reserved + 0.5 GiB (CUDA context) <= goal."]
    else:
        lines += ["", f"Peak GPU memory: not measured (no CUDA device). Goal: {GOAL_TEXT[results['model']]}."]
    if "median_s" in results:
        med = results["median_s"]
        lines += ["", "| training sample (s) | pipeline `__call__` (s) | training / pipeline |", "|---|---|---|",
                  f"| {med['train']:.3f} | {med['pipeline']:.3f} | {results['train_over_pipeline']:.2f} |", "",
                  "Medians of interleaved repeats after one warm-up; the pipeline generates the same image from the "
                  "same noise with the same LoRA-carrying transformer."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
