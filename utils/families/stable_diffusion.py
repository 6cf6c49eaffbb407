"""The UNet generation: SD 1.x/2.x and SDXL. A variance-preserving noise schedule, any diffusers sampler,
classifier-free guidance on an [uncond, cond] batch, LoRA files in diffusers' UNet key style."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from utils.families.base import ModelFamily, classifier_free_guidance, register
from utils.rollout.schedulers import ROLLOUT_SCHEDULERS


@dataclass
class PromptEmbeds:
    """UNet conditioning for a batch; with guidance, the unconditional rows come first."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None  # SDXL: {"text_embeds", "time_ids"}
    guided: bool = True

    def repeat_interleave(self, n: int) -> PromptEmbeds:
        """Repeat each prompt n times, keeping the [uncond..., cond...] layout."""

        def rep(x: torch.Tensor) -> torch.Tensor:
            if not self.guided:
                return x.repeat_interleave(n, dim=0)
            uncond, cond = x.chunk(2)
            return torch.cat([uncond.repeat_interleave(n, dim=0), cond.repeat_interleave(n, dim=0)])

        extra = {k: rep(v) for k, v in self.added_cond_kwargs.items()} if self.added_cond_kwargs else None
        return PromptEmbeds(rep(self.encoder_hidden_states), extra, self.guided)

    @classmethod
    def join(cls, parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """The conditioning of a batch from its prompts' own (each encoded alone, `--precompute_prompt_embeddings`),
        in `encode_prompts`' layout: [uncond..., cond...] when guided."""
        guided = parts[0].guided

        def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
            if not guided:
                return torch.cat(tensors)
            halves = [t.chunk(2) for t in tensors]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves])

        extra = parts[0].added_cond_kwargs
        extra = {k: cat([p.added_cond_kwargs[k] for p in parts]) for k in extra} if extra else None
        return cls(cat([p.encoder_hidden_states for p in parts]), extra, guided)




# diffusers' LoRA training scripts (train_dreambooth_lora_sdxl.py, train_text_to_image_lora.py) adapt the
# attention projections; NeMo-Aligner adds the feed-forward layers.
UNET_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_k", "to_q", "to_v", "to_out.0"),
    "attention+ff": ("to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    "diffusers": ("to_k", "to_q", "to_v", "to_out.0"),
}


class UNetFamily(ModelFamily):
    """The UNet generation (SD 1.x/2.x, SDXL): a variance-preserving noise schedule, any diffusers sampler,
    classifier-free guidance on an [uncond, cond] batch."""

    denoiser_name = "unet"
    rollout_schedulers = ROLLOUT_SCHEDULERS
    default_scheduler = "ddim"
    target_presets = UNET_TARGET_PRESETS
    preset_notes = {"attention": "self- and cross-attention of every block, as diffusers' scripts",
                    "diffusers": "= attention"}

    def predict(self, denoiser, x_t, t, cond: PromptEmbeds, guidance_scale):
        """One UNet call on the [uncond, cond] batch at the (scaled) model input x_t, combined with
        classifier-free guidance."""
        out = denoiser(
            torch.cat([x_t, x_t]) if cond.guided else x_t,
            t,
            encoder_hidden_states=cond.encoder_hidden_states,
            added_cond_kwargs=cond.added_cond_kwargs,
            return_dict=False,
        )[0]
        if not cond.guided:
            return out
        return classifier_free_guidance(*out.chunk(2), guidance_scale)

    def parametrisation(self, scheduler, config, latent_size, device, generator=None):
        from utils.rollout.parametrisation import VariancePreserving

        return VariancePreserving(scheduler, config.num_inference_steps, device, config.eta, generator)

    @classmethod
    def lora_layers(cls, denoiser):
        # The UNet LoRA key style of diffusers' SD/SDXL scripts (`convert_state_dict_to_diffusers`).
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(super().lora_layers(denoiser))

    @classmethod
    def peft_lora_state_dict(cls, state_dict):
        from diffusers.utils import convert_unet_state_dict_to_peft

        return convert_unet_state_dict_to_peft(super().peft_lora_state_dict(state_dict))


@register
class StableDiffusion(UNetFamily):
    """SD 1.x / 2.x: one CLIP text encoder, cross-attention conditioning only."""

    display_name = "Stable Diffusion 1.x/2.x"
    name = "sd"
    hub_tag = "stable-diffusion"
    pipeline_class_name = "StableDiffusionPipeline"
    serves = ("StableDiffusionPipeline",)
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = "", guided: bool = True,
                       height: int | None = None, width: int | None = None) -> PromptEmbeds:
        cond, uncond = self.pipe.encode_prompt(list(prompts), self._device(), 1, guided,
                                               negative_prompt=self._negatives(prompts, negative_prompt))
        return PromptEmbeds(torch.cat([uncond, cond]) if guided else cond, guided=guided)


@register
class StableDiffusionXL(UNetFamily):
    """SDXL: two text encoders (penultimate hidden states concatenated), the second one's pooled
    embedding and the (original size, crop, target size) time ids as added conditioning."""

    display_name = "SDXL"
    name = "sdxl"
    hub_tag = "stable-diffusion-xl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    serves = ("StableDiffusionXLPipeline",)
    load_kwargs = {"add_watermarker": False}  # a watermark would change the pixels the reward grades
    upcast_vae_in_fp16 = True

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = "", guided: bool = True,
                       height: int | None = None, width: int | None = None) -> PromptEmbeds:
        height, width = height or self.default_size(), width or self.default_size()
        # An empty negative prompt is passed as None, so `force_zeros_for_empty_prompt` gives zero
        # unconditional embeddings, as StableDiffusionXLPipeline does by default.
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            list(prompts), device=self._device(), num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=self._negatives(prompts, negative_prompt))
        projection_dim = (self.pipe.text_encoder_2.config.projection_dim if self.pipe.text_encoder_2 is not None
                          else int(pooled.shape[-1]))
        time_ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.dtype,
                                               text_encoder_projection_dim=projection_dim)
        time_ids = time_ids.to(cond.device).repeat(len(prompts) * (2 if guided else 1), 1)
        if guided:
            cond, pooled = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])
        return PromptEmbeds(cond, {"text_embeds": pooled, "time_ids": time_ids}, guided=guided)

