"""The estimate: the peak GPU memory of one training step of a run, per process, without a GPU or the weights.

`estimate_memory` takes the trainer's parsed and checked command line, builds its models from their configs under
fake tensors (`utils.memory.build`, `utils.memory.fake`; the reward from its architecture), sets them up as the
trainer does (dtypes, LoRA, gradient checkpointing, optimiser state from an earlier step) and traces one step
(`utils.memory.step`). The parts no CPU trace can see are computed (`utils.memory.parts`). The prefix's no-grad
steps are alike, so one of them is traced: the peak does not depend on T.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from utils.memory.autocast import cuda_autocast_policy
from utils.memory.parts import ComputedPart, adam8bit_bytes, nf4_linears, nf4_parts
from utils.memory.step import CACHED_PROMPTS, OPTIMISER, PROMPTS, traced_step
from utils.memory.trace import MemoryTrace, Peak, storage_bytes
from utils.rollout.loop import Models, RolloutConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MemoryEstimate:
    """A traced peak, the parts computed beside it, and what could not be counted."""

    peak: Peak
    phase_peaks: dict[str, int]
    computed: list[ComputedPart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    floor: int = 0  # a peak no computed part lowers (the prompt encoding's, when the text encoders are offloaded)
    encoding_apart: bool = False  # --precompute_prompt_embeddings: the prompt encoding's peak (`floor`) is before the run

    @property
    def total(self) -> int:
        """The estimated peak in bytes: the traced peak with the computed parts."""
        return max(self.peak.total + sum(part.bytes for part in self.computed), self.floor)

    @property
    def peak_phase(self) -> str:
        """The phase of the step the estimated peak comes in (the prompt encoding when the floor is the peak)."""
        return PROMPTS if self.floor > self.peak.total + sum(part.bytes for part in self.computed) else self.peak.phase

    def held(self) -> dict[str, int]:
        """What the peak holds, by part (computed parts under their own labels, corrections included)."""
        return {**self.peak.held, **{part.label: part.bytes for part in self.computed}}


def weight_dtype_of(args: Any, env: dict[str, str] | os._Environ = os.environ) -> torch.dtype:
    """The frozen weights' dtype, as the trainer's accelerator decides it (the flag, else accelerate's config)."""
    precision = args.mixed_precision or env.get("ACCELERATE_MIXED_PRECISION", "no")
    return DTYPES.get(precision, torch.float32)


def rollout_config(args: Any) -> RolloutConfig:
    """The run's rollout, with one no-grad step standing for the prefix's T - K alike steps."""
    steps = args.num_inference_steps if args.lv_samples else min(args.num_inference_steps, args.truncation_steps + 1)
    return RolloutConfig(num_inference_steps=steps, guidance_scale=args.guidance_scale,
                         truncation_steps=args.truncation_steps, eta=args.eta, lv_samples=args.lv_samples,
                         final_latent=args.final_latent)


def prepare_training(family: Any, args: Any, checked: Any) -> tuple[Models, list[torch.Tensor],
                                                                  torch.optim.Optimizer | None, list[ComputedPart]]:
    """The trainer's set-up of a loaded (or built) family: the LoRA, gradient checkpointing, the rollout's sampler,
    and the optimiser with the state an earlier step left (every later step holds it throughout); with 8-bit AdamW
    that state is computed instead."""
    import diffusers

    from utils.lora import add_lora

    computed: list[ComputedPart] = []
    if args.quantize_base:
        computed += nf4_parts(nf4_linears(family.denoiser))
    lora_params = add_lora(family.denoiser, args.rank, args.lora_alpha, args.lora_dropout, checked.lora_targets)
    if args.gradient_checkpointing:
        family.enable_gradient_checkpointing(getattr(args, "vae_block_checkpointing", False))
    scheduler = getattr(diffusers, checked.scheduler).from_config(family.pipe.scheduler.config)
    models = Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                    scheduler=scheduler)
    optimizer = None
    if args.use_8bit_adam:
        computed.append(ComputedPart(f"{OPTIMISER} (8-bit)", adam8bit_bytes(lora_params),
                                     "bitsandbytes AdamW8bit: 2 bytes per weight + an fp32 absmax per 256"))
    else:
        optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
        for p in lora_params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return models, lora_params, optimizer, computed


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(storage_bytes(t.untyped_storage()) for t in (*module.parameters(), *module.buffers()))


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors of a conditioning (`family.encode_prompts`: dataclasses of tensors, dicts and lists of them)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj):
        obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else []
    return [t for v in values for t in _tensors(v)]


def encode_apart(trace: MemoryTrace, mode: Any, family: Any, args: Any, dtype: torch.dtype) -> tuple[int, Any]:
    """--precompute_prompt_embeddings: the prompts are encoded before the run, alone on the GPU (`accelerator`: each
    text encoder there for its forward calls; `cpu`: none), and the step reads its batch's cached conditioning.
    Returns the encoding's peak (the largest text encoder's weights and the activations of encoding one prompt; with
    --quantize_base also the nf4 denoiser, which bitsandbytes loads onto the GPU) and the batch's conditioning, counted
    from then on; the text encoders are released and the trace's peak restarted without them."""
    from utils.families.text_encoders import release_text_encoders
    from utils.memory.build import ESTIMATE_PROMPT

    device_autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with trace.paused(), MemoryTrace() as encoding, mode.with_real_small_numbers(), cuda_autocast_policy("cpu"), \
            device_autocast:
        # The weights counted apart, so that an op's view of one (a linear's transposed weight) is not counted anew.
        for component in family.pipe.components.values():
            if isinstance(component, torch.nn.Module):
                encoding.register_module(component, "weights")
        weights = encoding.current
        one = family.encode_prompts([ESTIMATE_PROMPT], args.negative_prompt, rollout_config(args).guided,
                                    height=args.height, width=args.width)
    peak = 0
    if args.precompute_prompt_embeddings != "cpu":
        peak = max(_module_bytes(m) for m in family.text_encoders) + encoding.peak.total - weights
    if args.quantize_base:
        peak += _module_bytes(family.denoiser) + sum(p.bytes for p in nf4_parts(nf4_linears(family.denoiser)))
    cond = type(one).join([one] * args.train_batch_size)
    trace.register(_tensors(cond), CACHED_PROMPTS)
    release_text_encoders(family, torch.device("cpu"))
    trace.restart_peak()
    return peak, cond


def estimate_memory(args: Any, checked: Any) -> MemoryEstimate:
    """The peak of one training step of the run `args` describes (`train_draftplus.parse_args`), per process."""
    from rewards import build_reward_from_architectures, resolve_dtype
    from utils.memory.build import ESTIMATE_PROMPT, build_family
    from utils.memory.fake import WeightlessMode

    dtype = weight_dtype_of(args)
    family_cls = checked.family
    # Traced from the start: a tensor the setup keeps that no component owns (a second copy of a model) counts.
    with WeightlessMode() as mode, MemoryTrace() as trace:
        family = build_family(family_cls, args.pretrained_model_name_or_path, revision=args.revision, dtype=dtype,
                              vae_dtype=family_cls.vae_load_dtype(dtype), family_options=checked.family_options)
        if family.vae.dtype != family.vae_dtype(dtype):
            family.vae.to(dtype=family.vae_dtype(dtype))
        encoding = None
        if getattr(args, "precompute_prompt_embeddings", None):
            encoding, cond = encode_apart(trace, mode, family, args, dtype)
        models, lora_params, optimizer, computed = prepare_training(family, args, checked)
        if encoding is not None:
            models.prompt_embeddings = lambda *_, **__: cond
        reward_options = {**args.reward_options,
                          **({"gradient_checkpointing": True} if args.reward_gradient_checkpointing else {})}
        reward, notes = build_reward_from_architectures(args.reward, dtype=resolve_dtype(args.reward_dtype),
                                                        **reward_options)
        with mode.with_real_small_numbers():
            noise = torch.randn(family.latent_shape(args.train_batch_size, args.height, args.width))
            traced_step(trace, models, reward, lora_params, optimizer, [ESTIMATE_PROMPT] * args.train_batch_size,
                        noise, rollout_config(args), kl_coeff=args.kl_coeff, negative_prompt=args.negative_prompt,
                        autocast_dtype=dtype if dtype != torch.float32 else None, max_grad_norm=args.max_grad_norm)
    floor, phase_peaks = encoding or 0, dict(trace.phase_peaks)
    if encoding is not None:
        phase_peaks[PROMPTS] = encoding
        notes.append(f"--precompute_prompt_embeddings {args.precompute_prompt_embeddings}: the prompt encoding runs "
                     "before the run, alone (the step holds no text encoder)")
    elif getattr(args, "offload_text_encoders", False):  # on the GPU for the prompt encoding only
        encoders = sum(_module_bytes(m) for m in family.text_encoders)
        floor = trace.phase_peaks.get(PROMPTS, 0) + sum(part.bytes for part in computed)
        computed.append(ComputedPart("weights: text_encoders (offloaded)", -encoders,
                                     "--offload_text_encoders: on the GPU only while they encode the prompts"))
    if args.quantize_base:
        notes.append("the NF4 denoiser is computed, not traced (bitsandbytes runs on CUDA only)")
    if args.use_8bit_adam:
        notes.append("8-bit AdamW's state is computed, not traced (bitsandbytes runs on CUDA only)")
    settings = {"model": args.pretrained_model_name_or_path, "family": family_cls.name, "dtype": str(dtype),
                "height": args.height, "width": args.width, "batch": args.train_batch_size,
                "T": args.num_inference_steps, "K": args.truncation_steps,
                "gradient_checkpointing": args.gradient_checkpointing, "reward": args.reward,
                "reward_dtype": args.reward_dtype, "rank": args.rank, "quantize_base": args.quantize_base,
                "use_8bit_adam": args.use_8bit_adam}
    return MemoryEstimate(trace.peak, phase_peaks, computed, notes, settings, floor, encoding is not None)
