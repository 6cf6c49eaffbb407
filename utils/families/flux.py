"""FLUX.1 [dev] and [schnell] (`FluxPipeline`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from utils.families.base import License, classifier_free_guidance, register
from utils.families.flow import TRANSFORMER_TARGET_PRESETS, FlowTransformerFamily, TransformerPromptEmbeds


@register
class Flux(FlowTransformerFamily):
    """FLUX.1: CLIP-L (pooled) + T5, 2x2-packed latents with position ids, the timestep divided by 1000, the
    dynamic shift `mu` from the image's token count. FLUX.1-dev has a guidance embedding: `--guidance_scale`
    is its distilled guidance, one forward pass per step; FLUX.1-schnell has none. True classifier-free
    guidance (a second pass on the negative prompt) only with `--true_cfg_scale` > 1 and a negative prompt,
    as FluxPipeline does."""

    display_name = "FLUX.1 [dev]/[schnell]"
    name = "flux"
    hub_tag = "flux"
    pipeline_class_name = "FluxPipeline"
    serves = ("FluxPipeline",)
    default_max_sequence_length = 512  # FluxPipeline.__call__'s
    options = (*FlowTransformerFamily.options, "true_cfg_scale")
    shard_block_classes = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    # train_dreambooth_lora_flux.py's default: `attn.` names (both streams' attention, and the single blocks'
    # to_q to_k to_v) and the double blocks' feed-forward layers
    target_presets = {**TRANSFORMER_TARGET_PRESETS,
                      "diffusers": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                                    "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                                    "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")}
    preset_notes = {"attention": "short names: also the single blocks' to_q to_k to_v",
                    "attention+ff": "and the single blocks' proj_mlp and proj_out",
                    "diffusers": "train_dreambooth_lora_flux.py's default"}
    pipeline_sample_size = 128  # FluxPipeline's default_sample_size (its transformer config has no sample_size)
    # A LoRA of FLUX.1-dev falls under its non-commercial license (schnell is Apache-2.0, its card says so).
    licenses = {"black-forest-labs/flux.1-dev": License(
        "other", "flux-1-dev-non-commercial-license",
        "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md")}

    def __init__(self, pipe, max_sequence_length: int | None = None, true_cfg_scale: float = 1.0) -> None:
        super().__init__(pipe, max_sequence_length)
        self.true_cfg_scale = true_cfg_scale

    @classmethod
    def native_size(cls, denoiser_config, vae_scale_factor):
        return cls.pipeline_sample_size * vae_scale_factor

    @classmethod
    def uses_guidance_scale(cls, denoiser_config):
        return bool((denoiser_config or {}).get("guidance_embeds", True))

    @classmethod
    def rollout_defaults(cls, denoiser_config):
        if cls.uses_guidance_scale(denoiser_config):  # FLUX.1-dev: BFL's recipe
            defaults = {**super().rollout_defaults(denoiser_config), "guidance_scale": 3.5}
        else:  # FLUX.1-schnell: 4 steps and a 256-token prompt (its model card), no guidance
            defaults = {"num_inference_steps": 4, "max_sequence_length": 256, "guidance_scale": 0.0}
        return {**defaults, "true_cfg_scale": 1.0}  # FluxPipeline's: off

    @classmethod
    def option_problem(cls, args, denoiser_config):
        if (problem := super().option_problem(args, denoiser_config)) is not None:
            return problem
        # FluxPipeline runs true CFG only with both; either alone would be silently ignored.
        true_cfg = args.true_cfg_scale is not None and args.true_cfg_scale > 1
        if true_cfg and not args.negative_prompt:
            return "--true_cfg_scale needs --negative_prompt: FLUX's true CFG guides away from the negative prompt"
        if args.negative_prompt and not true_cfg:
            return ("--negative_prompt acts on FLUX only with --true_cfg_scale > 1 (true CFG, a second pass per "
                    "step, as FluxPipeline); --guidance_scale is FLUX's distilled guidance and takes no negative prompt")
        return None

    @classmethod
    def target_modules(cls, names, denoiser_config=None):
        """The presets, and with `attention+ff` the single blocks' MLP input (`proj_mlp`) and fused output
        (`proj_out`), named block by block: a bare `proj_out` would also adapt the transformer's final layer."""
        targets = super().target_modules(names, denoiser_config)
        if "attention+ff" in names:
            if denoiser_config is None or "num_single_layers" not in denoiser_config:
                raise ValueError("the attention+ff preset of FLUX needs the transformer's config (num_single_layers)")
            single = [f"single_transformer_blocks.{i}.proj_out" for i in range(denoiser_config["num_single_layers"])]
            targets += [t for t in ("proj_mlp", *single) if t not in targets]
        return targets

    @property
    def has_guidance_embedding(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4  # the transformer sees 2x2 patches of the latent

    def set_timesteps(self, scheduler, num_inference_steps, latent_size, device=None):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        config = scheduler.config
        mu = calculate_shift((latent_size[0] // 2) * (latent_size[1] // 2),  # the packed image's token count
                             config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)

    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self._device(), num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt="", guided=True, height=None, width=None
                       ) -> TransformerPromptEmbeds:
        # The distilled guidance needs no negative rows (`guided` is about CFG, which FLUX.1 does not use);
        # true CFG does, when asked.
        true_cfg = self.true_cfg_scale > 1 and bool(negative_prompt)
        return TransformerPromptEmbeds(self._encode(prompts),
                                       self._encode([negative_prompt] * len(prompts)) if true_cfg else None)

    def predict(self, denoiser, x_t, t, cond: TransformerPromptEmbeds, guidance_scale):
        from diffusers import FluxPipeline

        batch, channels, height, width = x_t.shape
        packed = FluxPipeline._pack_latents(x_t, batch, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x_t.device, x_t.dtype)
        guidance = None
        if self.has_guidance_embedding:
            guidance = torch.full([1], guidance_scale, device=x_t.device, dtype=torch.float32).expand(batch)
        timestep = t.expand(batch).to(x_t.dtype) / 1000

        def call(kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
            return denoiser(hidden_states=packed, timestep=timestep, guidance=guidance, img_ids=img_ids,
                            return_dict=False, **kwargs)[0]

        out = call(cond.cond)
        if cond.guided:
            out = classifier_free_guidance(call(cond.uncond), out, self.true_cfg_scale)
        scale = self.vae_scale_factor
        return FluxPipeline._unpack_latents(out, height * scale, width * scale, scale)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, h/2 * w/2, 4C]: the latents `FluxPipeline(latents=...)` takes."""
        from diffusers import FluxPipeline

        return FluxPipeline._pack_latents(latents, *latents.shape)

    def to_pipeline_latents(self, latents):
        return self.pack(latents)

    def from_pipeline_latents(self, latents, height, width):
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(latents, height, width, self.vae_scale_factor)

    def pipeline_kwargs(self):
        return {**super().pipeline_kwargs(), "true_cfg_scale": self.true_cfg_scale}

    @classmethod
    def pipeline_timestep(cls, pipe, timestep):
        """FluxPipeline calls its transformer with the timestep / 1000, cast to the latents' dtype (in bf16 two
        neighbouring steps can round to one number); it keeps the step's own timestep in `current_timestep`."""
        current = getattr(pipe, "current_timestep", None)
        return current if current is not None else timestep * 1000

