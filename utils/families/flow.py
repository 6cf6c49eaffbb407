"""What the flow-matching transformers share (SD3/SD3.5, FLUX.1 and later): rectified flow sampled by the
pipeline's own FlowMatchEulerDiscreteScheduler, prompt embeddings as the transformer's keyword arguments,
`--max_sequence_length`, and the ComfyUI LoRA file (diffusers' keys with per-module alpha tensors)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch

from utils.families.base import ModelFamily
from utils.lora.exports import export_comfyui
from utils.lora.files import COMFYUI_WEIGHTS_NAME, LORA_WEIGHTS_NAME

# Keyword arguments that are one tensor for the whole batch, not a row per prompt: FLUX.1's per-token ids ([L, 3]).
SHARED_KWARGS = ("txt_ids",)


@dataclass
class TransformerPromptEmbeds:
    """Transformer conditioning for a batch: the keyword arguments of the denoiser call besides the latents and
    the timestep, for the prompts (`cond`) and, when guided, for the negative or empty prompt (`uncond`)."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    @cached_property
    def batched(self) -> dict[str, torch.Tensor]:
        """The [uncond, cond] rows of every argument, for one call on a doubled batch (SD3's guidance): built
        on first use and kept, so a rollout's many denoiser calls do not copy the prompt embeddings each time."""
        return {k: torch.cat([self.uncond[k], self.cond[k]]) for k in self.cond}

    def repeat_interleave(self, n: int) -> TransformerPromptEmbeds:
        """Each prompt n times; per-token ids (FLUX's `txt_ids`, one [L, 3] for the batch) are shared."""

        def rep(kwargs: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            if kwargs is None:
                return None
            return {k: v if k in SHARED_KWARGS else v.repeat_interleave(n, dim=0) for k, v in kwargs.items()}

        return TransformerPromptEmbeds(rep(self.cond), rep(self.uncond))

    @classmethod
    def join(cls, parts: Sequence[TransformerPromptEmbeds]) -> TransformerPromptEmbeds:
        """The conditioning of a batch from its prompts' own (each encoded alone, `--precompute_prompt_embeddings`):
        every argument's rows in prompt order, the shared ones (`SHARED_KWARGS`) once."""

        def cat(kwargs: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
            if kwargs[0] is None:
                return None
            return {k: v if k in SHARED_KWARGS else torch.cat([d[k] for d in kwargs]) for k, v in kwargs[0].items()}

        return cls(cat([p.cond for p in parts]), cat([p.uncond for p in parts]))



# The attention projections of both streams, and with `+ff` the feed-forward layers of both streams. Short
# names match every block: `to_q` also adapts SD3.5's dual-attention `attn2` and FLUX's single blocks' attention
# (diffusers' scripts name `attn.to_q`, which does not: each family's `diffusers` preset).
TRANSFORMER_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    "attention+ff": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
}


class FlowTransformerFamily(ModelFamily):
    """The flow-matching transformers (SD3/SD3.5, FLUX.1): rectified flow sampled by the pipeline's own
    FlowMatchEulerDiscreteScheduler over its sigmas, CLIP + T5 prompts (`--max_sequence_length` T5 tokens),
    image sizes in multiples of 16 (VAE factor 8 x 2x2 patches), LoRA files with the PEFT keys as they are
    (`transformer.<module>.lora_A/B.weight`, as diffusers' FLUX/SD3 scripts save them)."""

    denoiser_name = "transformer"
    size_multiple = 16
    rollout_schedulers = ("FlowMatchEulerDiscreteScheduler",)
    default_scheduler = "model"
    target_presets = TRANSFORMER_TARGET_PRESETS
    options = ("max_sequence_length",)
    ui_lora_name = COMFYUI_WEIGHTS_NAME
    ui_lora_tools = "ComfyUI"
    default_max_sequence_length: ClassVar[int]
    max_sequence_length_limit: ClassVar[int] = 512  # the most prompt tokens the pipeline's encode_prompt takes

    @classmethod
    def option_problem(cls, args, denoiser_config):
        if (problem := super().option_problem(args, denoiser_config)) is not None:
            return problem
        if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= cls.max_sequence_length_limit:
            return (f"--max_sequence_length must be between 1 and {cls.max_sequence_length_limit}, got "
                    f"{args.max_sequence_length}: {cls.pipeline_class_name} takes at most "
                    f"{cls.max_sequence_length_limit} prompt tokens")
        return None

    inference_in_bf16 = True  # billions of weights

    @classmethod
    def ui_lora_card(cls, ui_lora):
        in_diffusers = (f"`{cls.pipeline_class_name}.load_lora_weights` loads it too" if cls.ui_lora_loads_in_diffusers
                        else f"diffusers' `{cls.pipeline_class_name}.load_lora_weights` refuses it: in diffusers, "
                             f"load `{LORA_WEIGHTS_NAME}`")
        return ("ComfyUI (`models/loras/`, the LoRA loader node): diffusers' keys with a per-module alpha tensor",
                f"ComfyUI needs `{ui_lora}`: it ignores the safetensors metadata, and without the alpha tensors it "
                f"would load the LoRA at alpha = rank, not at the trained strength; {in_diffusers}.")

    @classmethod
    def export_ui_lora(cls, lora_file: str | os.PathLike, output_file: str | os.PathLike | None = None) -> Path:
        """ComfyUI's FLUX and SD3 loaders read diffusers' transformer keys; they need a per-module alpha tensor
        (`utils.lora.exports.export_comfyui`). diffusers users load the plain file."""
        return export_comfyui(lora_file, output_file, component=cls.denoiser_name)

    @classmethod
    def evaluation_defaults(cls, denoiser_config):
        """The pipeline's own sampler, and the steps and guidance the trainer defaults to."""
        defaults = cls.rollout_defaults(denoiser_config)
        return {"scheduler": "model", "num_inference_steps": defaults["num_inference_steps"],
                "guidance_scale": defaults["guidance_scale"]}

    def pipeline_kwargs(self):
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def sample_latents(self, prompt, generators, *, negative_prompt="", num_inference_steps, guidance_scale, eta=0.0,
                       height, width):
        """Image k starts from the noise the rollout would draw for it ([1, C, h, w] from `generators[k]`, fp32),
        handed to the pipeline as its `latents` (FLUX: packed, as `FluxPipeline` takes and returns them). The
        flow-matching sampler takes no `eta`."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(self.latent_shape(len(generators), height, width), generator=list(generators),
                             device=self._device(), dtype=torch.float32)
        latents = self.pipe(prompt=prompt, num_images_per_prompt=len(generators),
                            latents=self.to_pipeline_latents(noise), num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, height=height, width=width, output_type="latent",
                            **self.negative_prompt_kwargs(negative_prompt), **self.pipeline_kwargs()).images
        return self.from_pipeline_latents(latents, height, width)

    def to_pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] latents as the pipeline's `__call__` takes them."""
        return latents

    def from_pipeline_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's `output_type="latent"` result for height x width images as [B, C, h, w]."""
        return latents

    def __init__(self, pipe, max_sequence_length: int | None = None) -> None:
        super().__init__(pipe)
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length

    @classmethod
    def rollout_defaults(cls, denoiser_config):
        return {"num_inference_steps": 28, "max_sequence_length": cls.default_max_sequence_length}

    def parametrisation(self, scheduler, config, latent_size, device, generator=None):
        from utils.rollout.parametrisation import RectifiedFlow

        self.set_timesteps(scheduler, config.num_inference_steps, latent_size, device)
        return RectifiedFlow(scheduler, generator)

    def set_timesteps(self, scheduler, num_inference_steps: int, latent_size: tuple[int, int],
                      device: torch.device | str | None = None) -> None:
        """The scheduler's timesteps and sigmas exactly as the pipeline's `__call__` sets them."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        return self.execution_device or self.pipe.text_encoder.device

