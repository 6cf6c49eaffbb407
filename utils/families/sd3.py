"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`)."""

from __future__ import annotations

from typing import Any

import torch

from utils.families.base import classifier_free_guidance, register
from utils.families.flow import TRANSFORMER_TARGET_PRESETS, FlowTransformerFamily, TransformerPromptEmbeds


@register
class StableDiffusion3(FlowTransformerFamily):
    """SD3 / SD3.5: CLIP-L + CLIP-G + T5, classifier-free guidance on an [uncond, cond] batch with
    `--negative_prompt`, the timestep in [0, 1000], the scheduler's static shift."""

    display_name = "Stable Diffusion 3/3.5"
    name = "sd3"
    hub_tag = "stable-diffusion-3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    serves = ("StableDiffusion3Pipeline",)
    default_max_sequence_length = 256  # StableDiffusion3Pipeline.__call__'s
    shard_block_classes = ("JointTransformerBlock",)  # SD3 and SD3.5 (dual attention) alike
    ui_lora_loads_in_diffusers = False  # its loader wants 'lora' in every key: the alpha tensors are refused
    # train_dreambooth_lora_sd3.py's default: `attn.` names, so SD3.5's second attention (`attn2`) is left alone
    target_presets = {**TRANSFORMER_TARGET_PRESETS,
                      "diffusers": ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")}
    preset_notes = {"attention": "short names: on SD3.5 also the second attention, attn2",
                    "attention+ff": "short names: on SD3.5 also attn2",
                    "diffusers": "train_dreambooth_lora_sd3.py's default: attn only, not SD3.5's attn2"}

    @classmethod
    def native_size(cls, denoiser_config, vae_scale_factor):
        # StableDiffusion3Pipeline: the transformer's sample_size, 128 where it has none
        return super().native_size(denoiser_config, vae_scale_factor) or 128 * vae_scale_factor

    @classmethod
    def rollout_defaults(cls, denoiser_config):
        return {**super().rollout_defaults(denoiser_config), "guidance_scale": 7.0}  # the pipeline's default

    def set_timesteps(self, scheduler, num_inference_steps, latent_size, device=None):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", None):  # not on SD3/SD3.5's own scheduler configs
            patch = self.denoiser.config.patch_size
            config = scheduler.config
            kwargs["mu"] = calculate_shift((latent_size[0] // patch) * (latent_size[1] // patch),
                                           config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                           config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        retrieve_timesteps(scheduler, num_inference_steps, device, **kwargs)

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt="", guided=True, height=None, width=None
                       ) -> TransformerPromptEmbeds:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self._device(), num_images_per_prompt=1,
            do_classifier_free_guidance=guided, negative_prompt=self._negatives(prompts, negative_prompt),
            max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled} if guided else None
        return TransformerPromptEmbeds(cond, uncond)

    def predict(self, denoiser, x_t, t, cond: TransformerPromptEmbeds, guidance_scale):
        if cond.guided:
            kwargs, x_in = cond.batched, torch.cat([x_t, x_t])
        else:
            kwargs, x_in = cond.cond, x_t
        out = denoiser(hidden_states=x_in, timestep=t.expand(x_in.shape[0]), return_dict=False, **kwargs)[0]
        return classifier_free_guidance(*out.chunk(2), guidance_scale) if cond.guided else out

