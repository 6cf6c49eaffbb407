"""Z-Image and Z-Image-Turbo (`ZImagePipeline`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.families.base import License, register
from utils.families.flow import FlowTransformerFamily

# The key prefix of Z-Image's ComfyUI file (see `ZImage.export_ui_lora`).
COMFYUI_PREFIX = "diffusion_model."


@dataclass
class ZImagePromptEmbeds:
    """Z-Image's conditioning: one [L_i, D] tensor per prompt, only its real tokens (the pipeline drops the
    padding, so prompts have their own lengths and the transformer takes them as a list), and when guided the
    negative prompts' tensors."""

    cond: list[torch.Tensor]
    uncond: list[torch.Tensor] | None = None

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    def repeat_interleave(self, n: int) -> ZImagePromptEmbeds:
        def rep(embeds: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if embeds is None else [e for e in embeds for _ in range(n)]

        return ZImagePromptEmbeds(rep(self.cond), rep(self.uncond))

    @classmethod
    def join(cls, parts: Sequence[ZImagePromptEmbeds]) -> ZImagePromptEmbeds:
        """A batch's conditioning from its prompts' own (`--precompute_prompt_embeddings`): the lists joined."""
        uncond = None if parts[0].uncond is None else [e for p in parts for e in p.uncond]
        return cls([e for p in parts for e in p.cond], uncond)


@register
class ZImage(FlowTransformerFamily):
    """Z-Image (6B): a Qwen3 text model (its second-to-last hidden states, padding dropped), a single-stream
    transformer on 2x2 patches that takes lists of latents and prompt embeddings, the timestep as (1000 - t) /
    1000 and a prediction of minus the velocity. Guidance is ZImagePipeline's own: with `--guidance_scale` s > 0
    it is pos + s (pos - neg) (diffusers' CFG at s + 1), optionally with the guided prediction's norm capped at
    `--cfg_normalization` times the positive's, and switched off at the steps whose (1000 - t) / 1000 exceeds
    `--cfg_truncation`. Z-Image-Turbo is distilled: 8-9 steps, `--guidance_scale 0`."""

    display_name = "Z-Image / Z-Image-Turbo"
    name = "z-image"
    shard_block_classes = ("ZImageTransformerBlock",)  # FSDP2 (--shard) wraps each

    @classmethod
    def native_size(cls, denoiser_config, vae_scale_factor):
        return 1024  # ZImagePipeline.__call__'s default height and width, whatever the VAE
    hub_tag = "z-image"
    pipeline_class_name = "ZImagePipeline"
    serves = ("ZImagePipeline",)
    default_max_sequence_length = 512  # ZImagePipeline.__call__'s
    options = (*FlowTransformerFamily.options, "cfg_normalization", "cfg_truncation")
    # diffusers' Z-Image LoRA script's default targets (its README's attention+ff example names FLUX's `ff.net`
    # layers, which Z-Image does not have: its feed-forward layers are SwiGLU `feed_forward.w1/w2/w3`).
    target_presets = {
        "attention": ("to_q", "to_k", "to_v", "to_out.0"),
        "attention+ff": ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
        "diffusers": ("to_q", "to_k", "to_v", "to_out.0"),  # train_dreambooth_lora_z_image.py's default
    }
    preset_notes = {"diffusers": "train_dreambooth_lora_z_image.py's default, = attention"}
    # Apache-2.0, as Z-Image-Turbo's model pages (Hugging Face, ModelScope) state it; Z-Image was released
    # under the same license.
    licenses = {"tongyi-mai/z-image": License("apache-2.0"), "tongyi-mai/z-image-turbo": License("apache-2.0")}

    def __init__(self, pipe, max_sequence_length: int | None = None, cfg_normalization: float | None = None,
                 cfg_truncation: float | None = None) -> None:
        super().__init__(pipe, max_sequence_length)
        self.cfg_normalization = float(cfg_normalization or 0.0)
        self.cfg_truncation = 1.0 if cfg_truncation is None else float(cfg_truncation)

    @classmethod
    def rollout_defaults(cls, denoiser_config):
        # ZImagePipeline.__call__'s defaults (Z-Image); Z-Image-Turbo's recipe is 9 steps at guidance 0, which its
        # checkpoint cannot tell apart from Z-Image's: the recipe passes them.
        return {"num_inference_steps": 50, "guidance_scale": 5.0, "max_sequence_length": cls.default_max_sequence_length,
                "cfg_normalization": 0.0, "cfg_truncation": 1.0}

    @classmethod
    def option_problem(cls, args, denoiser_config):
        if (problem := super().option_problem(args, denoiser_config)) is not None:
            return problem
        # ZImagePipeline guides at any scale > 0; the rollout's prompts carry negatives only above 1.
        if args.guidance_scale is not None and 0 < args.guidance_scale <= 1:
            return (f"--guidance_scale for ZImagePipeline models is 0 (no guidance, as Z-Image-Turbo) or > 1, got "
                    f"{args.guidance_scale:g}: the pipeline's pos + s (pos - neg) is diffusers' CFG at s + 1")
        if getattr(args, "cfg_normalization", None) is not None and args.cfg_normalization < 0:
            return f"--cfg_normalization must be >= 0 (0: off), got {args.cfg_normalization:g}"
        if getattr(args, "cfg_truncation", None) is not None and not 0 <= args.cfg_truncation <= 1:
            return f"--cfg_truncation must be in [0, 1] (1: guidance at every step), got {args.cfg_truncation:g}"
        return None

    def default_size(self) -> int:
        return 1024  # ZImagePipeline.__call__'s height and width

    def parametrisation(self, scheduler, config, latent_size, device, generator=None):
        # The transformer fills its RoPE table on its first call, under `with torch.device("cpu")`, which
        # torch.compile cannot trace (--compile's first call is a compiled one): fill it before, on the device.
        rope = self.denoiser.rope_embedder
        if rope.freqs_cis is None:
            rope(torch.zeros(1, len(rope.axes_dims), dtype=torch.long, device=device))
        return super().parametrisation(scheduler, config, latent_size, device, generator)

    def set_timesteps(self, scheduler, num_inference_steps, latent_size, device=None):
        from diffusers.pipelines.z_image.pipeline_z_image import (
            calculate_shift,
            get_default_z_image_sigmas,
            retrieve_timesteps,
        )

        config = scheduler.config
        # mu from the patch count (2x2 patches); the scheduler uses it only with use_dynamic_shifting.
        mu = calculate_shift((latent_size[0] // 2) * (latent_size[1] // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=get_default_z_image_sigmas(num_inference_steps),
                           mu=mu)

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt="", guided=True, height=None, width=None) -> ZImagePromptEmbeds:
        # encode_prompt rewrites its prompt lists in place (the chat template): hand it copies.
        embeds, negative = self.pipe.encode_prompt(
            prompt=list(prompts), device=self._device(), do_classifier_free_guidance=guided,
            negative_prompt=self._negatives(prompts, negative_prompt), max_sequence_length=self.max_sequence_length)
        return ZImagePromptEmbeds(embeds, negative if guided else None)

    def guidance_at(self, t: torch.Tensor, guidance_scale: float, guided: bool) -> float:
        """The scale ZImagePipeline applies at timestep t: 0 without negatives, and past `cfg_truncation`."""
        if not guided or guidance_scale <= 0:
            return 0.0
        if self.cfg_truncation <= 1 and float((1000 - t.float()) / 1000) > self.cfg_truncation:
            return 0.0
        return guidance_scale

    def predict(self, denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: ZImagePromptEmbeds,
                guidance_scale: float) -> torch.Tensor:
        """The velocity v (x0 = x_t - sigma v) as ZImagePipeline steps with it: minus the transformer's output,
        in fp32, guided as the pipeline guides."""
        batch = x_t.shape[0]
        scale = self.guidance_at(t, guidance_scale, cond.guided)
        latents = x_t.to(self.denoiser.dtype)  # the pipeline casts its fp32 latents to the transformer's dtype
        timestep = (1000 - t.expand(batch)) / 1000
        embeds = cond.cond
        if scale > 0:
            latents, timestep, embeds = latents.repeat(2, 1, 1, 1), timestep.repeat(2), cond.cond + cond.uncond
        out = denoiser(x=list(latents.unsqueeze(2).unbind(dim=0)), t=timestep, cap_feats=embeds,
                       return_dict=False)[0]
        if scale > 0:
            prediction = torch.stack([self._guided(out[j].float(), out[batch + j].float(), scale) for j in range(batch)])
        else:
            prediction = torch.stack([o.float() for o in out])
        return -prediction.squeeze(2)

    def _guided(self, pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
        """One image's guided output, as ZImagePipeline computes it (image by image: the norms are per image)."""
        pred = pos + scale * (pos - neg)
        if self.cfg_normalization > 0:
            max_norm = torch.linalg.vector_norm(pos) * self.cfg_normalization
            norm = torch.linalg.vector_norm(pred)
            if norm > max_norm:
                pred = pred * (max_norm / norm)
        return pred

    @classmethod
    def export_ui_lora(cls, lora_file: str | os.PathLike, output_file: str | os.PathLike | None = None) -> Path:
        """diffusers' module names with a per-module alpha, under `diffusion_model.` (the Z-Image LoRAs of other
        trainers, e.g. ai-toolkit): ComfyUI maps `diffusion_model.<diffusers module>` onto its NextDiT (q/k/v onto
        the fused qkv) and reads the alphas, and ZImagePipeline.load_lora_weights converts such a file with its
        alphas to the same LoRA as the plain one (under `transformer.` it would refuse the alphas)."""
        from utils.lora.exports import comfyui_state_dict
        from utils.lora.files import COMFYUI_WEIGHTS_NAME, lora_file_of, save_atomically

        source = lora_file_of(lora_file)
        target = Path(output_file) if output_file is not None else source.with_name(COMFYUI_WEIGHTS_NAME)
        prefix = cls.denoiser_name + "."
        state_dict = {COMFYUI_PREFIX + k.removeprefix(prefix): v for k, v in comfyui_state_dict(source).items()}
        return save_atomically(state_dict, target, {"format": "pt"})

    def pipeline_kwargs(self) -> dict[str, float | int]:
        return {**super().pipeline_kwargs(), "cfg_normalization": self.cfg_normalization,
                "cfg_truncation": self.cfg_truncation}

    @classmethod
    def pipeline_timestep(cls, pipe, timestep):
        """ZImagePipeline calls its transformer with (1000 - t) / 1000."""
        return 1000 - timestep * 1000
