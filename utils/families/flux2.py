"""FLUX.2 [dev] (`Flux2Pipeline`) and FLUX.2 [klein] (`Flux2KleinPipeline`): one transformer, two pipelines.

What they share (`Flux2Family`): the FLUX.2 VAE's 32-channel latents are 2x2-patchified to 128 channels and
batch-normalised before the transformer, so the rollout's latents are the pipeline's own noise,
[B, 128, H/16, W/16] (packed to tokens only around the transformer call), and decoding undoes the batch norm and
the patches as the pipeline does; 4-axis position ids; the empirical shift `mu` from the token count and the step
count; the timestep divided by 1000; prompt embeddings from three hidden layers of an LLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from utils.families.base import License, classifier_free_guidance, register
from utils.families.flow import FlowTransformerFamily, TransformerPromptEmbeds

# The LoRA layers of diffusers' FLUX.2 and FLUX.2 [klein] scripts (train_dreambooth_lora_flux2*.py): the image
# stream's attention of the double blocks and the fused QKV+MLP input of the single blocks (their output
# `attn.to_out` is named block by block: `to_out` alone would be the double blocks' ModuleList). `attention+ff`
# adds the text stream's attention and both streams' feed-forward layers.
FLUX2_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj"),
    "attention+ff": ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", "add_q_proj", "add_k_proj",
                     "add_v_proj", "to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                     "ff_context.linear_out"),
    "diffusers": ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj"),  # train_dreambooth_lora_flux2*.py's
}


class Flux2Family(FlowTransformerFamily):
    """What FLUX.2 [dev] and [klein] share (see the module doc); the subclasses add their guidance."""

    hub_tag = "flux2"
    target_presets = FLUX2_TARGET_PRESETS
    preset_notes = {"attention": "and every single block's attn.to_out",
                    "attention+ff": "and every single block's attn.to_out",
                    "diffusers": "train_dreambooth_lora_flux2*.py's default, = attention"}
    default_max_sequence_length = 512  # both pipelines' __call__ default (and their tokenizer_max_length)
    shard_block_classes = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")  # FSDP2 (--shard) wraps each
    pipeline_sample_size = 128  # both pipelines' default_sample_size (latents; the config has none)

    @classmethod
    def native_size(cls, denoiser_config, vae_scale_factor):
        return cls.pipeline_sample_size * vae_scale_factor

    @classmethod
    def target_modules(cls, names, denoiser_config=None):
        """The presets, with the single blocks' fused output `single_transformer_blocks.<i>.attn.to_out` for every
        single block (as diffusers' scripts list them)."""
        targets = super().target_modules(names, denoiser_config)
        if any(name in cls.target_presets for name in names):
            if denoiser_config is None or "num_single_layers" not in denoiser_config:
                raise ValueError("the FLUX.2 presets need the transformer's config (num_single_layers)")
            single = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(denoiser_config["num_single_layers"])]
            targets += [t for t in single if t not in targets]
        return targets

    @property
    def vae_scale_factor(self) -> int:
        # Pixels per rollout latent: the VAE's factor times the 2x2 patches its latents are folded into.
        return 2 * self.pipe.vae_scale_factor

    def default_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def set_timesteps(self, scheduler, num_inference_steps, latent_size, device=None):
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=latent_size[0] * latent_size[1], num_steps=num_inference_steps)
        retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)

    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        # The text ids are rebuilt from the embeddings at each call (`predict`), as the pipeline builds them: they
        # are per row, and a batch repeated for DRaFT-LV keeps them in step.
        embeds, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self._device(), num_images_per_prompt=1,
                                            max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds}

    @property
    def has_guidance_embedding(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    def predict(self, denoiser, x_t, t, cond: TransformerPromptEmbeds, guidance_scale):
        from diffusers import Flux2Pipeline

        batch, channels, height, width = x_t.shape
        tokens = Flux2Pipeline._pack_latents(x_t)  # a view of x_t, as the pipeline passes it
        if not torch.is_grad_enabled():
            # A view of a latent that requires grad (K > 1) still says so without autograd: --compile's no-grad
            # graphs guard on it and would compile a second time.
            tokens = tokens.detach()
        img_ids = Flux2Pipeline._prepare_latent_ids(x_t).to(x_t.device)
        guidance = None
        if self.has_guidance_embedding:
            guidance = torch.full([1], guidance_scale, device=x_t.device, dtype=torch.float32).expand(batch)
        timestep = t.expand(batch).to(x_t.dtype) / 1000

        def call(kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
            embeds = kwargs["encoder_hidden_states"]
            return denoiser(hidden_states=tokens, timestep=timestep, guidance=guidance, encoder_hidden_states=embeds,
                            txt_ids=Flux2Pipeline._prepare_text_ids(embeds).to(x_t.device), img_ids=img_ids,
                            return_dict=False)[0]

        out = call(cond.cond)
        if cond.guided:  # [klein] base: the second pass on the negative prompt, mixed as the pipeline mixes them
            out = classifier_free_guidance(call(cond.uncond), out, guidance_scale)
        return self._untokenize(out, height, width)

    @staticmethod
    def _untokenize(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens [B, h*w, C] (row-major, as the position ids place them) as latents [B, C, h, w]."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)

    @staticmethod
    def _batch_norm(vae, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and std of the VAE's batch norm over the 128 patch channels, as the pipelines compute them."""
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                              latents.dtype)
        return mean, std

    def decode(self, vae, latents):
        """The pipelines' decoding: undo the batch norm and the 2x2 patches, then decode."""
        from diffusers import Flux2Pipeline

        from utils.rollout.loop import vae_images

        mean, std = self._batch_norm(vae, latents)
        return vae_images(vae, Flux2Pipeline._unpatchify_latents(latents * std + mean))

    @classmethod
    def pipeline_timestep(cls, pipe, timestep):
        """Both pipelines call the transformer with the timestep / 1000 (as FLUX.1's); they keep the step's own
        timestep in `current_timestep`."""
        current = getattr(pipe, "current_timestep", None)
        return current if current is not None else timestep * 1000

    @classmethod
    def option_problem(cls, args, denoiser_config):
        if (problem := super().option_problem(args, denoiser_config)) is not None:
            return problem
        if args.negative_prompt and not cls.takes_negative_prompt(denoiser_config):
            return (f"--negative_prompt does not reach {cls.pipeline_class_name} models{cls.no_negative_reason}; "
                    "leave it out")
        return None

    no_negative_reason: ClassVar[str] = ""

    def negative_prompt_kwargs(self, negative_prompt, batch_size=1):
        return {}  # Flux2Pipeline takes no negative prompt (option_problem refuses one)

    @classmethod
    def takes_negative_prompt(cls, denoiser_config: dict | None) -> bool:
        return False


@register
class Flux2(Flux2Family):
    """FLUX.2 [dev]: a Mistral3 text encoder, guidance-distilled: `--guidance_scale` is the transformer's guidance
    input, one pass per step, no negative prompt."""

    display_name = "FLUX.2 [dev]"
    name = "flux2"
    pipeline_class_name = "Flux2Pipeline"
    serves = ("Flux2Pipeline",)
    no_negative_reason = ": its guidance is distilled (one pass per step, no negative prompt)"
    # As its hub repository declares it; a LoRA of it falls under it.
    licenses = {"black-forest-labs/flux.2-dev": License(
        "other", "flux-dev-non-commercial-license",
        "https://huggingface.co/black-forest-labs/FLUX.2-dev/blob/main/LICENSE.txt")}

    @classmethod
    def rollout_defaults(cls, denoiser_config):
        return {**super().rollout_defaults(denoiser_config), "num_inference_steps": 50,
                "guidance_scale": 4.0}  # Flux2Pipeline.__call__'s

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt="", guided=True, height=None, width=None
                       ) -> TransformerPromptEmbeds:
        return TransformerPromptEmbeds(self._encode(prompts))

    def from_pipeline_latents(self, latents, height, width):
        """Flux2Pipeline's `output_type="latent"`: its tokens."""
        return self._untokenize(latents, height // self.vae_scale_factor, width // self.vae_scale_factor)


@register
class Flux2Klein(Flux2Family):
    """FLUX.2 [klein] 4B/9B: a Qwen3 text encoder, no guidance input. The base models run classifier-free guidance
    (`--guidance_scale` > 1: a second pass per step on the negative prompt, the empty one by default); the
    step-distilled ones (`is_distilled` in model_index.json) take no guidance and run 4 steps."""

    display_name = "FLUX.2 [klein] 4B/9B"
    name = "flux2-klein"
    pipeline_class_name = "Flux2KleinPipeline"
    serves = ("Flux2KleinPipeline",)
    no_negative_reason = ": a step-distilled [klein] runs no classifier-free guidance"
    _non_commercial = License("other", "flux-non-commercial-license",
                              "https://huggingface.co/black-forest-labs/FLUX.2-klein-9B/blob/main/LICENSE.md")
    # As their hub repositories declare them: the 4B models Apache-2.0, the 9B ones the FLUX Non-Commercial License.
    licenses = {"black-forest-labs/flux.2-klein-4b": License("apache-2.0"),
                "black-forest-labs/flux.2-klein-base-4b": License("apache-2.0"),
                "black-forest-labs/flux.2-klein-9b": _non_commercial,
                "black-forest-labs/flux.2-klein-base-9b": _non_commercial}

    @classmethod
    def denoiser_config_with(cls, denoiser_config, model_index):
        return {**denoiser_config, "_is_distilled": bool(model_index.get("is_distilled", False))}

    @staticmethod
    def _distilled(denoiser_config: dict | None) -> bool:
        return bool((denoiser_config or {}).get("_is_distilled", False))

    @classmethod
    def uses_guidance_scale(cls, denoiser_config):
        return not cls._distilled(denoiser_config)

    @classmethod
    def takes_negative_prompt(cls, denoiser_config):
        return not cls._distilled(denoiser_config)

    @classmethod
    def rollout_defaults(cls, denoiser_config):
        if cls._distilled(denoiser_config):  # its model card: 4 steps; guidance is ignored (1.0: off)
            return {**super().rollout_defaults(denoiser_config), "num_inference_steps": 4, "guidance_scale": 1.0}
        return {**super().rollout_defaults(denoiser_config), "num_inference_steps": 50,
                "guidance_scale": 4.0}  # Flux2KleinPipeline.__call__'s

    @property
    def is_distilled(self) -> bool:
        return bool(self.pipe.config.get("is_distilled", False))

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt="", guided=True, height=None, width=None
                       ) -> TransformerPromptEmbeds:
        # The pipeline guides only a base model, with the empty prompt unless given negative embeddings.
        guided = guided and not self.is_distilled
        return TransformerPromptEmbeds(self._encode(prompts),
                                       self._encode([negative_prompt] * len(prompts)) if guided else None)

    def from_pipeline_latents(self, latents, height, width):
        """Flux2KleinPipeline's `output_type="latent"` is the VAE's input (batch norm and patches undone): redone
        here (to rounding)."""
        from diffusers import Flux2KleinPipeline

        patches = Flux2KleinPipeline._patchify_latents(latents)
        mean, std = self._batch_norm(self.vae, patches)
        return (patches - mean) / std

    def negative_prompt_kwargs(self, negative_prompt, batch_size=1):
        # Flux2KleinPipeline takes no negative prompt text, only its embeddings (its own default: the empty prompt).
        return {"negative_prompt_embeds": self._encode([negative_prompt] * batch_size)["encoder_hidden_states"]
                } if negative_prompt else {}
